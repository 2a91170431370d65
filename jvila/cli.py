"""The `jvila` command line. Results go to stdout, logs to stderr."""

from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger("jvila")

DTYPES = ("float32", "bfloat16")


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
