"""The `jvila` command line. Results go to stdout, logs to stderr."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

log = logging.getLogger("jvila")

DTYPES = ("float32", "bfloat16")
DEFAULT_SERVE_MODEL = "smollm2-135m-instruct"


def _generate(args) -> int:
    # The same calls a library user makes (jvila.load(...).generate(...)).
    from jvila.api import load

    if args.frames is not None and not args.video:
        print("jvila: error: --frames applies to --video", file=sys.stderr)
        return 2
    if args.frames is not None and args.frames < 1:
        print("jvila: error: --frames must be at least 1", file=sys.stderr)
        return 2
    start = time.perf_counter()
    model = load(args.model, dtype=args.dtype)
    log.info("loaded %s in %.1fs", args.model, time.perf_counter() - start)
    start = time.perf_counter()
    (new_ids,) = model.generate_token_ids(args.prompt, images=args.image, videos=args.video,
                                          max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                                          system=args.system, num_frames=args.frames)
    log.info("generated %d tokens in %.1fs (compilation included)", len(new_ids), time.perf_counter() - start)
    print(model.tokenizer.decode(new_ids, skip_special_tokens=True))
    return 0


def _convert(args) -> int:
    from jvila.checkpoints.convert import convert

    log.info(convert(args.src, args.dst, overwrite=args.overwrite))
    return 0


def _serve(args) -> int:
    # The server lives in serving/, above jvila: imported only when serving.
    from serving.api_keys import ApiKeys
    from serving.api_server import serve
    from serving.launch import EngineOptions, build_app

    try:
        api_keys = ApiKeys.from_file(args.api_keys) if args.api_keys else None
        if args.scheduler == "rpm" and args.rpm_limit is None:
            raise ValueError("--scheduler rpm needs --rpm-limit (requests per minute per client)")
        arena = _arena_options(args)
        options = EngineOptions(num_pages=args.num_pages, page_size=args.page_size, max_running=args.max_running,
                                token_budget=args.token_budget, max_context=args.max_context)
        app, _ = build_app(args.model, served_name=args.served_name, dtype=args.dtype,
                           scheduler=args.scheduler, rpm_limit=args.rpm_limit, api_keys=api_keys, options=options,
                           arena=arena, lora=_lora_options(args))
    except ValueError as e:
        print(f"jvila: error: {e}", file=sys.stderr)
        return 2
    if api_keys is None:
        log.info("no --api-keys: every request is served, as one client")
    serve(app, host=args.host, port=args.port)
    return 0


def _train(args) -> int:
    from jvila.train.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.check:
            print(f"{args.recipe}: valid ({recipe.train.steps} steps, stage {recipe.stage!r}, "
                  f"output {recipe.output_dir})")
            return 0
        from jvila.train.loop import train

        summary = train(recipe)
    except (RecipeError, FileNotFoundError) as e:
        print(f"jvila: error: {e}", file=sys.stderr)
        return 2
    if summary.losses:
        last = max(summary.losses)
        print(f"trained steps {summary.start_step + 1}-{summary.final_step}: loss {summary.losses[last]:.4f} "
              f"at step {last}")
    if summary.export_dir is not None:
        print(f"exported to {summary.export_dir}")
    return 0


def _lora_options(args):
    """LoraOptions from --lora NAME=PATH ..., --max-lora-rank, --lora-root; None when none is given."""
    if not args.lora and args.lora_root is None:
        return None
    from serving.launch import LoraOptions

    pairs = []
    for item in args.lora:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora takes NAME=PATH, got {item!r}")
        if name in dict(pairs):
            raise ValueError(f"--lora names {name!r} twice")
        pairs.append((name, path))
    if args.max_lora_rank < 1:
        raise ValueError(f"--max-lora-rank must be at least 1, got {args.max_lora_rank}")
    if args.lora_root is not None and not os.path.isdir(args.lora_root):
        raise ValueError(f"--lora-root {args.lora_root!r} is not a directory")
    dtype = None if args.lora_dtype == "auto" else args.lora_dtype
    return LoraOptions(adapters=tuple(pairs), max_rank=args.max_lora_rank, root=args.lora_root, dtype=dtype)


def _arena_options(args):
    """The Arena's options, with its files checked before the model loads (None without --arena)."""
    if not args.arena:
        if args.arena_db or args.arena_contestants:
            raise ValueError("--arena-db and --arena-contestants apply to --arena")
        return None
    from serving.arena import ArenaOptions
    from serving.arena.contestants import read_contestants
    from serving.arena.store import database_url

    database = args.arena_db or "arena.db"
    database_url(database)
    if args.arena_contestants:
        read_contestants(args.arena_contestants)
    return ArenaOptions(database=database, contestants_file=args.arena_contestants)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jvila", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one chat prompt, with images or a video for NVILA models")
    gen.add_argument("--model", required=True,
                     help="known model name, jvila checkpoint, GGUF file, HF dir or NVILA dir")
    gen.add_argument("--image", action="append", default=[], metavar="IMAGE",
                     help="an image file or data: URL, placed before the prompt (repeat for several)")
    gen.add_argument("--video", action="append", default=[], metavar="VIDEO",
                     help="a video file or a folder of frames, placed before the prompt (repeat for several)")
    gen.add_argument("--frames", type=int, default=None,
                     help="frames sampled from each video (default: the checkpoint's)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--system", default=None, help="system message")
    gen.add_argument("--dtype", choices=DTYPES, default="float32")
    gen.add_argument("prompt")
    gen.set_defaults(run=_generate)

    conv = sub.add_parser("convert", help="GGUF/HF/NVILA dir → jvila Orbax checkpoint, or jvila checkpoint → "
                                           "HF dir (NVILA dir for NVILA models)")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    conv.set_defaults(run=_convert)

    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    srv.add_argument("--model", default=DEFAULT_SERVE_MODEL,
                     help="known model name, jvila checkpoint, GGUF file or HF dir (default: %(default)s)")
    srv.add_argument("--served-name", default=None, help="the model name clients send (default: --model as given)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000, help="0 picks a free port (logged)")
    srv.add_argument("--scheduler", choices=("vtc", "fcfs", "rpm", "lcf"), default="vtc",
                     help="who is served first: VTC shares tokens fairly between clients (default)")
    srv.add_argument("--rpm-limit", type=int, default=None, help="requests per minute per client (--scheduler rpm)")
    srv.add_argument("--api-keys", default=None, metavar="FILE",
                     help='JSON {"<key>": {"client": "<name>", "weight": 1.0}, ...}; without it no key is asked')
    srv.add_argument("--dtype", choices=DTYPES, default="float32")
    srv.add_argument("--num-pages", type=int, default=1024, help="KV cache pages shared by all requests")
    srv.add_argument("--page-size", type=int, default=16)
    srv.add_argument("--max-running", type=int, default=32, help="most requests decoding at once")
    srv.add_argument("--token-budget", type=int, default=256, help="most tokens in one engine step")
    srv.add_argument("--max-context", type=int, default=None, help="default: the model's, as far as the pool holds")
    srv.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                     help="serve a PEFT LoRA adapter under NAME (repeat for several); requests name it as `model`")
    srv.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted (default: 64)")
    srv.add_argument("--lora-root", default=None, metavar="DIR",
                     help="POST /v1/load_lora_adapter may load adapters from under DIR (off without it)")
    srv.add_argument("--lora-dtype", choices=("auto", *DTYPES), default="auto",
                     help="the dtype steps read adapters in (auto: the KV cache's); bfloat16 beside a float32 "
                          "model halves their memory traffic")
    srv.add_argument("--arena", action="store_true",
                     help="also serve the Chatbot Arena pages at /arena (battles, votes, leaderboard)")
    srv.add_argument("--arena-db", default=None, metavar="URL_OR_PATH",
                     help="where votes are kept: a SQLite file path or any SQLAlchemy URL (default: arena.db)")
    srv.add_argument("--arena-contestants", default=None, metavar="FILE",
                     help="JSON/YAML list of {name, model, system?, temperature?} (default: every served model; "
                          "the Arena needs two)")
    srv.set_defaults(run=_serve)

    trn = sub.add_parser("train", help="train with a YAML recipe (see recipes/); resumes from its latest checkpoint")
    trn.add_argument("recipe", help="a recipe file, e.g. recipes/nvila_image_sft.yaml")
    trn.add_argument("overrides", nargs="*", metavar="key=value",
                     help="override recipe keys, values as YAML (train.steps=20 optimizer.learning_rate=1e-4)")
    trn.add_argument("--check", action="store_true", help="validate the recipe and exit without training")
    trn.set_defaults(run=_train)

    from jvila.eval.cli import add_parser as add_eval_parser
    add_eval_parser(sub)
    return parser


def main(argv=None) -> int:
    # Our progress at INFO; libraries (JAX, Orbax) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    if getattr(args, "max_tokens", 1) < 1:
        print("jvila: error: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    from jvila.checkpoints.errors import CheckpointError
    from jvila.processing.errors import MediaError

    try:
        return args.run(args)
    except (CheckpointError, MediaError) as e:
        print(f"jvila: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
