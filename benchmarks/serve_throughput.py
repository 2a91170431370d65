"""The OpenAI-compatible server under load: output tokens/s, time to first token (TTFT) and time per output
token (TPOT) against offered load, with transformers' `generate` at the same batch as the baseline, and
the prefix-sharing gain on a shared-system-prompt workload. One table of medians and ratios at the end.

Load is closed-loop: C clients on loopback each send their next request when the last one ends, through
the official `openai` client, streamed (one chunk per token: logprobs=0), greedy, a fixed number of output
tokens (EOS ignored), random-id prompts of a fixed length (unique, so nothing is shared by accident).
transformers runs the same prompt length and output length as one batch of C.

    python benchmarks/serve_throughput.py                              # SmolLM2-135M-Instruct, CPU
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
    repeats: int  # transformers timing repeats (median)


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


def build(config: str):
    """(graphdef, state, tokenizer, transformers model, torch device, description)."""
    from live_server import tiny_model, tiny_tokenizer

    if config == "dry-run":
        tokenizer = tiny_tokenizer()
        hf, graphdef, state = tiny_model(tokenizer.vocab_size)
        return graphdef, state, tokenizer, hf, "cpu", "tiny random Llama (dry run)"
    if config == "smollm2-135m":
        from jvila.checkpoints.known_models import resolve_gguf
        from jvila.checkpoints.pretrained import load_pretrained
        from jvila.processing.tokenizer import Tokenizer

        model, tok_dir = load_pretrained("smollm2-135m-instruct")
        path = resolve_gguf("smollm2-135m-instruct")
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
        return *nnx.split(model), Tokenizer.from_dir(tok_dir), hf, "cpu", "SmolLM2-135M-Instruct fp32"
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
        model = model_from_params(cfg, params, param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        hf = hf.to(device=device, dtype=torch.bfloat16)
        # Only decoding for the stream needs a tokenizer: ids past its vocabulary decode to nothing.
        return *nnx.split(model), tiny_tokenizer(), hf, device, "Qwen2-0.5B-shaped, random weights, bf16"
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


def transformers_tok_s(hf, device: str, batch: int, prompt_tokens: int, output_tokens: int, repeats: int) -> float:
    ids = torch.randint(3, hf.config.vocab_size, (batch, prompt_tokens), device=device)

    def run():
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=output_tokens, min_new_tokens=output_tokens, do_sample=False,
                              pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompt_tokens + output_tokens

    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return batch * output_tokens / statistics.median(times)


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


def pct(values, q) -> float:
    return float(np.percentile(values, q)) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("smollm2-135m", "qwen2-0.5b-random"),
                        help="default: qwen2-0.5b-random on a GPU (as the GPU suite runs it), else smollm2-135m")
    parser.add_argument("--dry-run", action="store_true", help="tiny random model, tiny load: checks the script")
    args = parser.parse_args(argv)
    default = "qwen2-0.5b-random" if jax.default_backend() == "gpu" else "smollm2-135m"
    config = "dry-run" if args.dry_run else args.config or default
    work, options = WORKLOADS[config], OPTIONS[config]
    torch.set_num_threads(os.cpu_count())
    graphdef, state, tokenizer, hf, device, description = build(config)
    vocab = min(hf.config.vocab_size, nnx.merge(graphdef, state).config.vocab_size)
    # The baseline first, while nothing else runs in this process.
    baselines = {clients: transformers_tok_s(hf, device, clients, work.prompt_tokens, work.output_tokens,
                                             work.repeats) for clients in work.loads}
    del hf
    engine = build_engine(graphdef, state, tokenizer, scheduler=make_scheduler_for("fcfs"), options=options)
    app = create_app(AsyncEngine(engine), tokenizer, model_name=SERVED_NAME, max_context=engine.max_context,
                     vocab_size=engine.vocab_size)
    server = ServerThread(app).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=3600)
    rng = np.random.default_rng(0)
    rows, prefix = [], {}
    try:
        for clients in work.loads:
            n = max(work.min_requests, 2 * clients)

            def load(clients=clients, n=n):
                prompts = random_prompts(rng, n, work.prompt_tokens, vocab)
                return closed_loop(client, prompts, work.output_tokens, clients)

            warm_up(load)
            served = measured(load)
            baseline = baselines[clients]
            rows.append((clients, n, served, baseline))
            print(f"[load {clients}] {served['tok_s']:.1f} tok/s served, transformers {baseline:.1f} tok/s",
                  flush=True)

        def system_prompt_load(kind: str):
            shared = random_prompts(rng, 1, work.system_tokens, vocab)[0]
            prompts = [(shared if kind == "shared" else random_prompts(rng, 1, work.system_tokens, vocab)[0])
                       + random_prompts(rng, 1, work.question_tokens, vocab)[0] for _ in range(work.prefix_requests)]
            return closed_loop(client, prompts, work.output_tokens, work.prefix_clients)

        warm_up(lambda: [system_prompt_load(kind) for kind in ("unique", "shared")])
        for kind in ("unique", "shared"):
            prefix[kind] = measured(lambda kind=kind: system_prompt_load(kind))
        metrics = engine.metrics()
    finally:
        server.stop()

    print(f"\n{description} on {device} ({os.cpu_count()} CPU cores), jax {jax.__version__} "
          f"{jax.devices()[0].platform}, torch {torch.__version__}; prompts {work.prompt_tokens} tokens, "
          f"{work.output_tokens} out, greedy, streamed through the OpenAI server")
    print(f"{'clients':>8}{'requests':>9}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p90':>10}{'TPOT p50':>10}"
          f"{'TPOT p90':>10}{'compiles':>9}{'HF tok/s':>10}{'vs HF':>8}")
    for clients, n, s, baseline in rows:
        print(f"{clients:>8}{n:>9}{s['tok_s']:>9.1f}{pct(s['ttft'], 50):>8.0f}ms{pct(s['ttft'], 90):>8.0f}ms"
              f"{pct(s['tpot'], 50):>8.1f}ms{pct(s['tpot'], 90):>8.1f}ms{s['compiles']:>9}{baseline:>10.1f}"
              f"{s['tok_s'] / baseline:>7.2f}x")
    unique = prefix["unique"]
    print(f"\nprefix sharing: {work.prefix_requests} requests, {work.prefix_clients} clients, "
          f"{work.system_tokens}-token system prompt + {work.question_tokens}-token question, "
          f"{work.output_tokens} out (prefix-hit tokens so far: {metrics['prefix_hit_tokens']})")
    print(f"{'system prompt':<15}{'wall s':>8}{'tok/s':>9}{'TTFT p50':>10}{'compiles':>9}{'speed-up':>10}")
    for kind in ("unique", "shared"):
        p = prefix[kind]
        print(f"{kind:<15}{p['wall']:>8.2f}{p['tok_s']:>9.1f}{pct(p['ttft'], 50):>8.0f}ms{p['compiles']:>9}"
              f"{unique['wall'] / p['wall']:>9.2f}x")
    if metrics["pages_free"] != metrics["pages_total"]:
        print(f"!! {metrics['pages_total'] - metrics['pages_free']} pages still held after the load")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
