"""SmolLM2-135M-Instruct on this CPU: jvila's jitted prefill and decode loop against transformers.

Same weights (the GGUF of the embedded default, dequantized to float32 on both sides), same
prompts, greedy, a fixed number of new tokens (EOS ignored). Prints medians and ratios last.

    python benchmarks/llm_cpu.py [--new-tokens 64] [--repeats 3] [--batches 1 8] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from jvila.checkpoints.known_models import resolve_gguf  # noqa: E402
from jvila.checkpoints.pretrained import load_pretrained  # noqa: E402
from jvila.generate import _prefill, bucket, generate  # noqa: E402
from jvila.models.attention import dense_attention  # noqa: E402
from jvila.models.kv_cache import contiguous_cache  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPT_TOKENS = 100


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompts(batch: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(100, vocab, (batch, PROMPT_TOKENS)).astype(np.int32)


def bench_jvila(dtype: str, batch: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    model, _ = load_pretrained(MODEL, param_dtype=getattr(jnp, dtype))
    graphdef, state = nnx.split(model)
    ids = prompts(batch, model.config.vocab_size)
    width = bucket(PROMPT_TOKENS)
    lengths = jnp.full((batch,), PROMPT_TOKENS, jnp.int32)
    padded = jnp.zeros((batch, width), jnp.int32).at[:, :PROMPT_TOKENS].set(ids)

    def prefill():
        cache = contiguous_cache(model.config, batch, width, dtype=getattr(jnp, dtype))
        jax.block_until_ready(_prefill(graphdef, state, padded, lengths, cache, attention=dense_attention))

    def gen():
        out = generate(graphdef, state, [list(r) for r in ids], max_new_tokens=new_tokens, eos_ids=())
        assert all(len(o) == new_tokens for o in out)

    return median_time(prefill, repeats), median_time(gen, repeats)


def bench_transformers(batch: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    path = resolve_gguf(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
    ids = torch.tensor(prompts(batch, model.config.vocab_size), dtype=torch.long)

    def prefill():
        with torch.no_grad():
            model(ids)

    def gen():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[1] == PROMPT_TOKENS + new_tokens

    return median_time(prefill, repeats), median_time(gen, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    rows = []
    for batch in args.batches:
        hf_prefill, hf_gen = bench_transformers(batch, args.new_tokens, args.repeats)
        rows.append(("transformers", "float32", batch, hf_prefill, batch * args.new_tokens / hf_gen, hf_prefill, hf_gen))
        for dtype in args.dtypes:
            pre, gen = bench_jvila(dtype, batch, args.new_tokens, args.repeats)
            rows.append(("jvila", dtype, batch, pre, batch * args.new_tokens / gen, hf_prefill, hf_gen))
    print(f"\nSmolLM2-135M-Instruct, {PROMPT_TOKENS}-token prompts, {args.new_tokens} new tokens, greedy, "
          f"{os.cpu_count()} CPU cores, jax {jax.__version__}, torch {torch.__version__}")
    print(f"{'impl':<13}{'dtype':<10}{'batch':>6}{'prefill ms':>12}{'gen tok/s':>11}"
          f"{'prefill speed-up':>18}{'gen speed-up':>14}")
    for impl, dtype, batch, pre, tps, hf_pre, hf_gen in rows:
        print(f"{impl:<13}{dtype:<10}{batch:>6}{pre * 1e3:>12.1f}{tps:>11.1f}"
              f"{hf_pre / pre:>17.2f}x{tps / (batch * args.new_tokens / hf_gen):>13.2f}x")


if __name__ == "__main__":
    main()
