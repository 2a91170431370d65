"""The OpenAI-compatible server under load: output tokens/s, time to first token (TTFT) and time per output
token (TPOT) against offered load, with transformers' `generate` at the same batch as the baseline, and
the prefix-sharing gain on a shared-system-prompt workload. One table of medians and ratios at the end.

Load is closed-loop: C clients on loopback each send their next request when the last one ends, through
the official `openai` client, streamed (one chunk per token: logprobs=0), greedy, a fixed number of output
tokens (EOS ignored), random-id prompts of a fixed length (unique, so nothing is shared by accident).
transformers runs the same prompt length and output length as one batch of C, in the same dtype as the
server (float32 against float32, bfloat16 against torch bfloat16), its runs alternating with the server's
passes so that a busy machine slows both alike; tok/s are medians over the repeats.

    python benchmarks/serve_throughput.py                              # SmolLM2-135M-Instruct, CPU, fp32 and bf16
    python benchmarks/serve_throughput.py --dtypes bfloat16            # one dtype only
    python benchmarks/serve_throughput.py --config qwen2-0.5b-random   # Qwen2-0.5B-shaped, random, bf16, GPU
    python benchmarks/serve_throughput.py --dry-run                    # tiny random model: seconds (a test)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny offline tokenizer and model builders
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import openai  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from serving.api_server import ServerThread, create_app  # noqa: E402
from serving.async_engine import AsyncEngine  # noqa: E402
from serving.launch import EngineOptions, build_engine, make_scheduler_for  # noqa: E402
from serving.step import StepRunner  # noqa: E402

SERVED_NAME = "bench"


@dataclasses.dataclass(frozen=True)
class Workload:
    prompt_tokens: int
    output_tokens: int
    loads: tuple[int, ...]  # concurrent clients
    min_requests: int  # per load level (at least 2 per client)
    system_tokens: int  # prefix-sharing workload: shared system prompt, then a short question
    question_tokens: int
    prefix_requests: int
    prefix_clients: int
    repeats: int  # timed passes per load level, server and transformers alike (median)


WORKLOADS = {
    "smollm2-135m": Workload(100, 64, (1, 8), 4, 256, 16, 16, 8, 3),
    "qwen2-0.5b-random": Workload(128, 128, (1, 8, 32), 8, 1024, 32, 64, 32, 3),
    "dry-run": Workload(20, 6, (1, 4), 4, 48, 6, 8, 4, 1),
}
OPTIONS = {
    "smollm2-135m": EngineOptions(num_pages=512, page_size=16, max_running=32, token_budget=256),
    "qwen2-0.5b-random": EngineOptions(num_pages=4096, page_size=16, max_running=64, token_budget=1024),
    "dry-run": EngineOptions(num_pages=64, page_size=16, max_running=4, token_budget=8),
}


DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}


def in_dtype(graphdef, state, dtype):
    """The model with its parameters and compute in `dtype` (as jvila.load(..., dtype=...) builds it)."""
    model = nnx.merge(graphdef, state)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(model, nnx.Param)))
    model.compute_dtype = dtype
    return nnx.split(model)


def build(config: str, dtype: str):
    """(graphdef, state, tokenizer, transformers model, torch device, description), both sides in `dtype`."""
    from live_server import tiny_model, tiny_tokenizer

    jax_dtype, torch_dtype = DTYPES[dtype]
    if config == "dry-run":
        tokenizer = tiny_tokenizer()
        hf, graphdef, state = tiny_model(tokenizer.vocab_size)
        return (*in_dtype(graphdef, state, jax_dtype), tokenizer, hf.to(torch_dtype), "cpu",
                "tiny random Llama (dry run)")
    if config == "smollm2-135m":
        from jvila.checkpoints.known_models import resolve_gguf
        from jvila.checkpoints.pretrained import load_pretrained
        from jvila.processing.tokenizer import Tokenizer

        model, tok_dir = load_pretrained("smollm2-135m-instruct", param_dtype=jax_dtype)
        path = resolve_gguf("smollm2-135m-instruct")
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval().to(torch_dtype)
        return *nnx.split(model), Tokenizer.from_dir(tok_dir), hf, "cpu", "SmolLM2-135M-Instruct"
    if config == "qwen2-0.5b-random":
        from jvila.checkpoints.convert import hf_to_params
        from jvila.checkpoints.hf_form import HFCheckpoint
        from jvila.models.params import model_from_params

        hf_config = transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                             num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                             max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True)
        torch.manual_seed(0)
        hf = transformers.Qwen2ForCausalLM(hf_config).eval()
        tensors = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
        cfg, params = hf_to_params(HFCheckpoint(hf.config.to_dict(), tensors))
        model = model_from_params(cfg, params, param_dtype=jax_dtype, compute_dtype=jax_dtype)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        hf = hf.to(device=device, dtype=torch_dtype)
        # Only decoding for the stream needs a tokenizer: ids past its vocabulary decode to nothing.
        return *nnx.split(model), tiny_tokenizer(), hf, device, "Qwen2-0.5B-shaped, random weights"
    raise ValueError(f"unknown config {config!r}")


def random_prompts(rng, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[int(t) for t in rng.integers(3, vocab, length)] for _ in range(n)]


def stream_one(client: openai.OpenAI, prompt: list[int], output_tokens: int) -> tuple[float, float, int]:
    """(TTFT s, mean TPOT s, tokens) of one streamed completion."""
    start = time.perf_counter()
    stamps = []
    for chunk in client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=output_tokens,
                                           temperature=0, logprobs=0, stream=True, extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.token_logprobs:
                stamps += [time.perf_counter()] * len(choice.logprobs.token_logprobs)
    if len(stamps) != output_tokens:
        raise RuntimeError(f"expected {output_tokens} tokens, streamed {len(stamps)}")
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return stamps[0] - start, tpot, len(stamps)


def closed_loop(client, prompts, output_tokens: int, clients: int) -> dict:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: stream_one(client, p, output_tokens), prompts))
    wall = time.perf_counter() - start
    ttft, tpot, tokens = zip(*results)
    return {"wall": wall, "tok_s": sum(tokens) / wall, "ttft": np.asarray(ttft), "tpot": np.asarray(tpot)}


def transformers_pass(hf, device: str, batch: int, prompt_tokens: int, output_tokens: int):
    """A function that runs transformers' `generate` on one batch and returns its output tokens/s."""
    ids = torch.randint(3, hf.config.vocab_size, (batch, prompt_tokens), device=device)

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=output_tokens, min_new_tokens=output_tokens, do_sample=False,
                              pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompt_tokens + output_tokens
        return batch * output_tokens / (time.perf_counter() - start)

    return run


def warm_up(run, max_passes: int = 4) -> None:
    """Run until a pass compiles nothing new: every step shape the load produces is compiled before timing."""
    for _ in range(max_passes):
        before = StepRunner.num_compilations()
        run()
        if StepRunner.num_compilations() == before:
            return


def measured(run, max_runs: int = 3) -> dict:
    """The first run that compiled nothing (or the last one; its compilations are shown in the table)."""
    for _ in range(max_runs):
        before = StepRunner.num_compilations()
        result = run()
        result["compiles"] = StepRunner.num_compilations() - before
        if result["compiles"] == 0:
            break
    return result


def timed(run) -> dict:
    before = StepRunner.num_compilations()
    result = run()
    result["compiles"] = StepRunner.num_compilations() - before
    return result


def pooled(passes: list[dict]) -> dict:
    """Median tok/s over the passes; latency percentiles over all their requests; compilations summed."""
    return {"tok_s": statistics.median(p["tok_s"] for p in passes),
            "ttft": np.concatenate([p["ttft"] for p in passes]), "tpot": np.concatenate([p["tpot"] for p in passes]),
            "compiles": sum(p["compiles"] for p in passes), "passes": len(passes)}


def pct(values, q) -> float:
    return float(np.percentile(values, q)) * 1e3


class Served:
    """One dtype's side: the engine behind its server, an `openai` client on it, and transformers' model."""

    def __init__(self, config: str, dtype: str, options: EngineOptions):
        graphdef, state, tokenizer, self.hf, self.device, description = build(config, dtype)
        self.dtype, self.description = dtype, f"{description} {dtype}"
        self.vocab = min(self.hf.config.vocab_size, nnx.merge(graphdef, state).config.vocab_size)
        self.engine = build_engine(graphdef, state, tokenizer, scheduler=make_scheduler_for("fcfs"), options=options)
        app = create_app(AsyncEngine(self.engine), tokenizer, model_name=SERVED_NAME,
                         max_context=self.engine.max_context, vocab_size=self.engine.vocab_size)
        self.server = ServerThread(app).start()
        self.client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="none", max_retries=0, timeout=3600)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("smollm2-135m", "qwen2-0.5b-random"),
                        help="default: qwen2-0.5b-random on a GPU (as the GPU suite runs it), else smollm2-135m")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES),
                        help="default: bfloat16 for qwen2-0.5b-random, float32 and bfloat16 otherwise")
    parser.add_argument("--repeats", type=int, help="timed passes per load level (default: the workload's)")
    parser.add_argument("--loads", type=int, nargs="+", help="client counts (default: the workload's)")
    parser.add_argument("--skip-prefix", action="store_true", help="leave out the prefix-sharing run")
    parser.add_argument("--dry-run", action="store_true", help="tiny random model, tiny load: checks the script")
    args = parser.parse_args(argv)
    default = "qwen2-0.5b-random" if jax.default_backend() == "gpu" else "smollm2-135m"
    config = "dry-run" if args.dry_run else args.config or default
    work, options = WORKLOADS[config], OPTIONS[config]
    dtypes = args.dtypes or (["bfloat16"] if config == "qwen2-0.5b-random" else ["float32", "bfloat16"])
    repeats = args.repeats or work.repeats
    torch.set_num_threads(os.cpu_count())
    sides = [Served(config, dtype, options) for dtype in dtypes]
    rng = np.random.default_rng(0)
    rows, prefix = [], {}
    try:
        for clients in args.loads or work.loads:
            n = max(work.min_requests, 2 * clients)

            def load(side, clients=clients, n=n):
                prompts = random_prompts(rng, n, work.prompt_tokens, side.vocab)
                return closed_loop(side.client, prompts, work.output_tokens, clients)

            baselines = {}
            for side in sides:
                warm_up(lambda side=side: load(side))
                baselines[side.dtype] = transformers_pass(side.hf, side.device, clients, work.prompt_tokens,
                                                          work.output_tokens)
                baselines[side.dtype]()  # transformers' warm-up
            passes = {side.dtype: ([], []) for side in sides}
            for _ in range(repeats):  # alternating, so that load from other processes hits every side alike
                for side in sides:
                    passes[side.dtype][1].append(baselines[side.dtype]())
                    passes[side.dtype][0].append(timed(lambda side=side: load(side)))
            for side in sides:
                served, hf_tok_s = pooled(passes[side.dtype][0]), statistics.median(passes[side.dtype][1])
                rows.append((side.dtype, clients, n, served, hf_tok_s))
                print(f"[{side.dtype} load {clients}] {served['tok_s']:.1f} tok/s served, transformers "
                      f"{hf_tok_s:.1f} tok/s", flush=True)

        metrics = {s.dtype: s.engine.metrics() for s in sides}
        if args.skip_prefix:
            return report(rows, prefix, metrics, sides, dtypes, work, repeats)
        # Prefix sharing on the first dtype's server.
        side = sides[0]

        def system_prompt_load(kind: str):
            shared = random_prompts(rng, 1, work.system_tokens, side.vocab)[0]
            prompts = [(shared if kind == "shared" else random_prompts(rng, 1, work.system_tokens, side.vocab)[0])
                       + random_prompts(rng, 1, work.question_tokens, side.vocab)[0]
                       for _ in range(work.prefix_requests)]
            return closed_loop(side.client, prompts, work.output_tokens, work.prefix_clients)

        warm_up(lambda: [system_prompt_load(kind) for kind in ("unique", "shared")])
        for kind in ("unique", "shared"):
            prefix[kind] = measured(lambda kind=kind: system_prompt_load(kind))
        metrics = {s.dtype: s.engine.metrics() for s in sides}
    finally:
        for s in sides:
            s.server.stop()
    return report(rows, prefix, metrics, sides, dtypes, work, repeats)


def report(rows, prefix, metrics, sides, dtypes, work, repeats) -> int:
    print(f"\n{sides[0].description.rsplit(' ', 1)[0]} on {sides[0].device} ({os.cpu_count()} CPU cores), jax "
          f"{jax.__version__} {jax.devices()[0].platform}, torch {torch.__version__}; prompts {work.prompt_tokens} "
          f"tokens, {work.output_tokens} out, greedy, streamed through the OpenAI server; tok/s medians of "
          f"{repeats} alternating passes, transformers in the server's dtype")
    for dtype in dtypes:
        print(f"\n{dtype} (jvila {dtype}, transformers {dtype})")
        print(f"{'clients':>8}{'requests':>9}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p90':>10}{'TPOT p50':>10}"
              f"{'TPOT p90':>10}{'compiles':>9}{'HF tok/s':>10}{'vs HF':>8}")
        for row_dtype, clients, n, s, baseline in rows:
            if row_dtype != dtype:
                continue
            print(f"{clients:>8}{n:>9}{s['tok_s']:>9.1f}{pct(s['ttft'], 50):>8.0f}ms{pct(s['ttft'], 90):>8.0f}ms"
                  f"{pct(s['tpot'], 50):>8.1f}ms{pct(s['tpot'], 90):>8.1f}ms{s['compiles']:>9}{baseline:>10.1f}"
                  f"{s['tok_s'] / baseline:>7.2f}x")
    if len(dtypes) > 1:
        print(f"\nacross dtypes: served tok/s and transformers tok/s relative to {dtypes[0]} at the same load")
        for row_dtype, clients, _, s, baseline in rows:
            first = next(r for r in rows if r[0] == dtypes[0] and r[1] == clients)
            print(f"  {row_dtype:<9} {clients:>3} clients: served {s['tok_s'] / first[3]['tok_s']:.2f}x, "
                  f"transformers {baseline / first[4]:.2f}x")
    leaked = {d: m["pages_total"] - m["pages_free"] for d, m in metrics.items() if m["pages_free"] != m["pages_total"]}
    if leaked:
        print(f"!! pages still held after the load: {leaked}")
        return 1
    if not prefix:
        return 0
    unique = prefix["unique"]
    print(f"\nprefix sharing ({sides[0].dtype}): {work.prefix_requests} requests, {work.prefix_clients} clients, "
          f"{work.system_tokens}-token system prompt + {work.question_tokens}-token question, "
          f"{work.output_tokens} out (prefix-hit tokens so far: {metrics[sides[0].dtype]['prefix_hit_tokens']})")
    print(f"{'system prompt':<15}{'wall s':>8}{'tok/s':>9}{'TTFT p50':>10}{'compiles':>9}{'speed-up':>10}")
    for kind in ("unique", "shared"):
        p = prefix[kind]
        print(f"{kind:<15}{p['wall']:>8.2f}{p['tok_s']:>9.1f}{pct(p['ttft'], 50):>8.0f}ms{p['compiles']:>9}"
              f"{unique['wall'] / p['wall']:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
