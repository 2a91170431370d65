"""Serving many LoRA adapters (S-LoRA): throughput against the number of adapters, on the engine.

S-LoRA's synthetic workload (its benchmarks/trace.py semantics, re-derived here): each request's
adapter is floor(n * u) with u drawn from a power law of exponent `alpha` (density alpha *
u^(alpha-1) on [0, 1]: alpha < 1 concentrates traffic on few adapters, alpha = 1 is uniform);
arrivals form a Gamma process with coefficient of variation `cv` (shape 1/cv², scale cv²/rate;
cv = 1 is Poisson); input and output lengths are uniform integers in [8, 512), scaled here by
`--length-scale` to fit this machine. Adapters cycle through S-LoRA's S2 ranks 8, 16, 32, 64 on
q/k/v/o.

The systems serve the same trace, replayed in real time (a request is added when the clock
passes its arrival, the clock counting engine steps; the rate keeps every system backlogged):
  slora    one engine, adapters in the KV page pool, batches mixing adapters (this repository);
  slora-bf16  the same, the steps reading the adapters in bfloat16 (`Engine(lora_dtype=...)`, vLLM's
           --lora-dtype) beside the float32 model;
  peft     merge-and-unmerge per batch (PEFT-style): take the adapter of the oldest waiting request,
           merge it into the base weights, serve a batch of that adapter's waiting requests to the
           end, unmerge; requests of other adapters wait;
  merged   one adapter merged into the weights and every request served by it (the upper bound:
           no adapter cost at all).
Throughput = output tokens / wall seconds of the replay (merges and unmerges included). Each system
first serves the trace untimed (every step shape compiles), then `--repeats` times timed (median), the
systems' timed passes alternating. The last table gives each system's throughput as a ratio to
`merged` at every adapter count.

    python benchmarks/multi_lora.py                 # CPU: tiny model, 1/10/100/1000 adapters
    python benchmarks/multi_lora.py --model smollm2-135m --adapters 1000
                                                    # SmolLM2-135M's shape (random weights): an adapter
                                                    # is a small part of its projection, as at 7B
                                                    # GPU: a 1B-class shape in bf16 (benchmarks/gpu_suite.sh)
    python benchmarks/multi_lora.py --dry-run       # seconds: what the dry-run test runs
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jvila.config import LLMConfig, RopeConfig
from jvila.models.llm import LLM
from jvila.models.lora import Adapter, LoraConfig, merge, module_shape, unmerge
from serving.adapters.store import AdapterStore, stored_adapter
from serving.engine import Engine
from serving.request import Request, SamplingParams

MODEL = LLMConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=32, max_position_embeddings=1024)
# On a GPU: a 1B-class Llama shape (random weights, bf16), where adapter traffic competes with real matmuls.
GPU_MODEL = LLMConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=8, num_heads=16,
                      num_kv_heads=8, head_dim=128, max_position_embeddings=2048)
# SmolLM2-135M's shape (its config.json; random weights): hidden 576, 30 layers. A rank-64 adapter on
# q/k/v/o adds 64 x (576 + 576) MACs per token to q_proj's 576 x 576 (a fifth); ranks average 30.
SMOLLM2_MODEL = LLMConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                          num_kv_heads=3, head_dim=64, rope=RopeConfig(theta=100000.0), tie_embeddings=True,
                          max_position_embeddings=8192)
MODELS = {"tiny": MODEL, "smollm2-135m": SMOLLM2_MODEL}
DRY_MODEL = LLMConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_position_embeddings=512)
RANKS = (8, 16, 32, 64)  # S-LoRA's S2 setting
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SYSTEMS = ("slora", "slora-bf16", "peft", "merged")
DISTINCT_WEIGHTS = 64


# ---- the workload ---------------------------------------------------------------------------------


def synthetic_trace(num_adapters: int, *, alpha: float, req_rate: float, cv: float, num_requests: int,
                    input_range=(8, 512), output_range=(8, 512), seed: int = 42):
    """[(arrival s, adapter index, input len, output len)], S-LoRA's synthetic workload."""
    if num_adapters < 1 or num_requests < 1:
        raise ValueError("num_adapters and num_requests must be positive")
    if alpha <= 0 or req_rate <= 0 or cv <= 0:
        raise ValueError("alpha, req_rate and cv must be positive")
    rng = np.random.default_rng(seed)
    adapters = np.minimum((rng.power(alpha, num_requests) * num_adapters).astype(int), num_adapters - 1)
    inputs = rng.integers(input_range[0], input_range[1], num_requests)
    outputs = rng.integers(output_range[0], output_range[1], num_requests)
    gaps = rng.gamma(1.0 / (cv * cv), cv * cv / req_rate, num_requests)
    arrivals = np.cumsum(gaps)
    return [(float(t), int(a), int(i), int(o)) for t, a, i, o in zip(arrivals, adapters, inputs, outputs)]


def random_adapter(config: LLMConfig, rank: int, rng) -> Adapter:
    """Random A and B (B non-zero, unlike a fresh adapter's, so every adapter really changes the model)."""
    weights = {layer: {m: (rng.standard_normal((module_shape(config, m)[0], rank)).astype(np.float32) * 0.05,
                           rng.standard_normal((rank, module_shape(config, m)[1])).astype(np.float32) * 0.05)
                       for m in TARGETS} for layer in range(config.num_layers)}
    return Adapter(LoraConfig(rank, alpha=2.0 * rank, target_modules=TARGETS), weights)


# ---- the systems ------------------------------------------------------------------------------------


def make_requests(trace, vocab: int, *, with_adapters: bool, seed: int = 7):
    rng = np.random.default_rng(seed)
    out = []
    for i, (_, adapter, n_in, n_out) in enumerate(trace):
        prompt = [int(t) for t in rng.integers(0, vocab, n_in)]
        out.append(Request(f"q{i}", prompt, SamplingParams(max_tokens=n_out, ignore_eos=True),
                           adapter=f"a{adapter}" if with_adapters else None))
    return out


def arrival_steps(trace, steps_per_second: float) -> list[int]:
    """Arrivals on a clock of engine steps: the same trace gives the same batches, so a warm-up pass compiles
    every step shape the timed pass will meet (a wall clock would change the batches from run to run)."""
    return [int(arrival * steps_per_second) for arrival, *_ in trace]


def replay(engine, requests, arrivals) -> tuple[int, float]:
    """Serve requests as the step clock passes their arrivals; (output tokens, wall seconds, CPU seconds)."""
    pending = list(zip(arrivals, requests))
    step = tokens = 0
    start, cpu = time.perf_counter(), time.process_time()
    while pending or engine.has_unfinished():
        if not engine.has_unfinished():
            step = max(step, pending[0][0])  # idle: the clock jumps to the next arrival
        while pending and pending[0][0] <= step:
            engine.add_request(pending.pop(0)[1])
        tokens += sum(len(o.new_token_ids) for o in engine.step())
        step += 1
    return tokens, time.perf_counter() - start, time.process_time() - cpu


def replay_merge_per_batch(engine, graphdef, base_state, adapters, requests, arrivals, max_batch: int):
    """PEFT-style: one adapter at a time, merged into the weights for a batch of its requests, then unmerged."""
    pending = list(zip(arrivals, requests))
    waiting: list[Request] = []
    step = tokens = 0
    start, cpu = time.perf_counter(), time.process_time()
    while pending or waiting:
        if not waiting:
            step = max(step, pending[0][0])
        while pending and pending[0][0] <= step:
            waiting.append(pending.pop(0)[1])
        name = waiting[0].adapter
        batch = [r for r in waiting if r.adapter == name][:max_batch]
        waiting = [r for r in waiting if r not in batch]
        adapter = adapters[int(name[1:])]
        merged = merge(graphdef, base_state, adapter)
        engine.runner.state = merged  # the same engine and pools, the weights swapped
        for r in batch:
            engine.add_request(Request(r.request_id, r.prompt_ids, r.params))
        while engine.has_unfinished():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
            step += 1
        jax.block_until_ready(unmerge(graphdef, merged, adapter))  # the unmerge PEFT pays (its result unused)
        engine.runner.state = base_state
    return tokens, time.perf_counter() - start, time.process_time() - cpu


def system_pass(system, split, adapters, trace, args):
    """A function that serves the trace once on a fresh engine: ((output tokens, wall s, CPU s), engine metrics)."""
    graphdef, state = split
    kwargs = {"num_pages": args.num_pages, "page_size": args.page_size, "max_running": args.max_running,
              "token_budget": args.token_budget, "min_step_rows": args.min_step_rows}
    config = nnx.merge(graphdef, state).config
    arrivals = arrival_steps(trace, args.steps_per_second)
    store = None
    if system.startswith("slora"):  # the host store is built once: the engine never changes it
        store = AdapterStore(config, max_rank=max(args.ranks))
        kept = {}  # adapters sharing weight arrays share the store's copy of them too (`--distinct-weights`)
        for i, adapter in enumerate(adapters):
            if id(adapter) not in kept:
                kept[id(adapter)] = store.check(stored_adapter(adapter, config.num_layers))
            store.add(f"a{i}", kept[id(adapter)])
    merged_state = merge(graphdef, state, adapters[0]) if system == "merged" else None

    def run():
        requests = make_requests(trace, config.vocab_size, with_adapters=system != "merged")
        if system.startswith("slora"):
            lora_dtype = jnp.bfloat16 if system == "slora-bf16" else None
            engine = Engine(graphdef, state, adapters=store, lora_dtype=lora_dtype, **kwargs)
            result = replay(engine, requests, arrivals)
        elif system == "merged":
            engine = Engine(graphdef, merged_state, **kwargs)
            result = replay(engine, requests, arrivals)
        else:
            engine = Engine(graphdef, state, **kwargs)
            result = replay_merge_per_batch(engine, graphdef, state, adapters, requests, arrivals, args.max_running)
        return result, engine.metrics()

    return run


def run_systems(systems, split, adapters, trace, args):
    """Each system's (tokens, median wall s, median CPU s) and last metrics. Every system first serves the trace
    untimed (every step shape compiles); the timed passes then alternate between the systems, so that a change
    in the machine's speed (other work on a shared machine) hits them alike."""
    runs = {system: system_pass(system, split, adapters, trace, args) for system in systems}
    timed = {system: [] for system in systems}
    metrics = {}
    for system in systems:
        result, metrics[system] = runs[system]()
        if not args.repeats:
            timed[system].append(result)
    for _ in range(args.repeats):
        for system in systems:
            result, metrics[system] = runs[system]()
            timed[system].append(result)
    return {system: ((timed[system][0][0], *(float(np.median([r[i] for r in timed[system]])) for i in (1, 2))),
                     metrics[system]) for system in systems}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=None,
                        help="default: all (on GPU without slora-bf16: the bfloat16 model's pools already are)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of adapter popularity")
    parser.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of inter-arrivals")
    parser.add_argument("--req-rate", type=float, default=40.0, help="requests per second of the trace")
    parser.add_argument("--steps-per-second", type=float, default=10.0,
                        help="engine steps per trace second (arrivals are replayed on the step clock)")
    parser.add_argument("--length-scale", type=float, default=1 / 8, help="scales S-LoRA's [8, 512) lengths")
    parser.add_argument("--num-pages", type=int, default=1024)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up (median)")
    parser.add_argument("--min-step-rows", type=int, default=1, help="smallest row bucket of a step (fewer shapes)")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS), help="adapter i has ranks[i % len]")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny",
                        help="tiny: hidden 128 x 2 layers (an adapter costs about its projection); smollm2-135m: "
                             "SmolLM2-135M's shape, random weights (an adapter is a small part of it)")
    parser.add_argument("--distinct-weights", type=int, default=DISTINCT_WEIGHTS,
                        help="adapters past this many share weight arrays in host memory")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 2 adapters, 4 short requests, no warm-up")
    args = parser.parse_args(argv)
    config, dtype = MODELS[args.model], jnp.float32
    if jax.default_backend() == "gpu" and not args.dry_run:
        config, dtype = GPU_MODEL, jnp.bfloat16
        args.length_scale, args.num_requests, args.repeats = 1 / 2, max(args.num_requests, 256), 1
        args.num_pages, args.max_running, args.token_budget = 8192, 64, 2048
        args.systems = args.systems or [s for s in SYSTEMS if s != "slora-bf16"]
    args.systems = args.systems or list(SYSTEMS)
    if args.dry_run:
        # Few step shapes (each one a compilation): one rank bucket, one row bucket, prompts within one token bucket.
        config, args.adapters, args.num_requests, args.num_pages = DRY_MODEL, [2], 4, 256
        args.max_running = args.min_step_rows = 4
        args.repeats = 0  # the warm-up pass alone
        args.ranks, args.length_scale = [8], 1 / 128
    lo = max(2, round(8 * args.length_scale))
    hi = max(lo + 1, round(512 * args.length_scale))
    split = nnx.split(LLM(config, rngs=nnx.Rngs(0), param_dtype=dtype, compute_dtype=dtype))
    print(f"# multi_lora {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} jax {jax.__version__} "
          f"{jax.devices()[0].device_kind}; model hidden {config.hidden_size} x {config.num_layers} layers; "
          f"{args.num_requests} requests, lengths [{lo}, {hi}), alpha {args.alpha}, cv {args.cv}, "
          f"rate {args.req_rate}/s; ranks {tuple(args.ranks)} on {'/'.join(m[0] for m in TARGETS)}", flush=True)
    rng = np.random.default_rng(0)
    # Past --distinct-weights, adapters share weight arrays in host memory (1000 distinct 1B-class adapters would
    # not fit it); each is still its own adapter to the server: its own name, pages and loads.
    distinct = [random_adapter(config, args.ranks[i % len(args.ranks)], rng)
                for i in range(min(max(args.adapters), args.distinct_weights))]
    all_adapters = [distinct[i % len(distinct)] for i in range(max(args.adapters))]
    table = {}
    print(f"{'adapters':>8} {'system':>10} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'tok/cpu-s':>9} {'loads':>6} "
          f"{'evictions':>9}")
    for n in args.adapters:
        trace = synthetic_trace(n, alpha=args.alpha, req_rate=args.req_rate, cv=args.cv,
                                num_requests=args.num_requests, input_range=(lo, hi), output_range=(lo, hi))
        for system, ((tokens, seconds, cpu), metrics) in run_systems(args.systems, split, all_adapters[:n], trace,
                                                                      args).items():
            table[n, system] = (tokens / seconds, tokens / cpu)
            print(f"{n:>8} {system:>10} {tokens:>7} {seconds:>8.2f} {tokens / seconds:>8.1f} {tokens / cpu:>9.1f} "
                  f"{metrics.get('adapter_loads', '-'):>6} {metrics.get('adapter_evictions', '-'):>9}", flush=True)
    # On a machine shared with other work the CPU-time ratio is the steadier one (time descheduled does not count).
    print("\nthroughput relative to one merged model (the upper bound), by wall time | by CPU time")
    print(f"{'adapters':>8} " + " ".join(f"{s:>10}" for s in args.systems) + " | "
          + " ".join(f"{s:>10}" for s in args.systems))
    for n in args.adapters:
        cells = []
        for i in (0, 1):
            base = table.get((n, "merged"))
            cells.append(" ".join(f"{table[n, s][i] / base[i]:>9.2f}x" if base else f"{table[n, s][i]:>10.1f}"
                                  for s in args.systems))
        print(f"{n:>8} " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
