"""The `jvila` command line. Results go to stdout, logs to stderr."""

from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger("jvila")

DTYPES = ("float32", "bfloat16")


def _generate(args) -> int:
    import jax.numpy as jnp
    from flax import nnx

    from jvila.checkpoints.pretrained import load_pretrained
    from jvila.generate import generate
    from jvila.processing.tokenizer import Tokenizer

    start = time.perf_counter()
    model, tok_dir = load_pretrained(args.model, param_dtype=getattr(jnp, args.dtype))
    tokenizer = Tokenizer.from_dir(tok_dir)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    # The template already writes every special token the model expects.
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                                  add_special_tokens=False)
    log.info("loaded %s in %.1fs; prompt is %d tokens", args.model, time.perf_counter() - start, len(prompt_ids))
    graphdef, state = nnx.split(model)
    start = time.perf_counter()
    (new_ids,) = generate(graphdef, state, [prompt_ids], max_new_tokens=args.max_tokens,
                          eos_ids=tokenizer.eos_ids, temperature=args.temperature, seed=args.seed)
    log.info("generated %d tokens in %.1fs (compilation included)", len(new_ids), time.perf_counter() - start)
    print(tokenizer.decode(new_ids, skip_special_tokens=True))
    return 0


def _convert(args) -> int:
    from jvila.checkpoints.convert import convert

    log.info(convert(args.src, args.dst, overwrite=args.overwrite))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jvila", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one chat prompt")
    gen.add_argument("--model", required=True, help="known model name, jvila checkpoint, GGUF file or HF dir")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--system", default=None, help="system message")
    gen.add_argument("--dtype", choices=DTYPES, default="float32")
    gen.add_argument("prompt")
    gen.set_defaults(run=_generate)

    conv = sub.add_parser("convert", help="GGUF/HF dir → jvila Orbax checkpoint, or jvila checkpoint → HF dir")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    conv.set_defaults(run=_convert)
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

    try:
        return args.run(args)
    except CheckpointError as e:
        print(f"jvila: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
