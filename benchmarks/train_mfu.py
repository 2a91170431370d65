"""Training throughput and MFU of the project's train step, against a plain minimal JAX step.

Both train the same Qwen2-shaped decoder with random weights (float32 master weights and AdamW
state, `--dtype` compute) on the same random batches of one sequence per row:
  ours   `jvila.train.step.make_train_step` over the functional core (the model the server runs),
         per-layer remat policies from `sharding.remat`; attention "unpacked" drops the all-ones
         segment ids (cuDNN flash on a GPU) or "packed" keeps them (the Pallas flash kernel);
  plain  a self-contained step written here (~80 lines): embedding, a `lax.scan` over stacked
         layers under `jax.checkpoint` with the dots-saveable policy, `jax.nn.dot_product_attention`
         (JAX's choice on a GPU: cuDNN flash attention for bf16), float32 cross-entropy, optax AdamW.

MFU = model FLOPs per step / step time / peak. Model FLOPs per token (PaLM's appendix B):
6 * (N - embedding table) for the matmuls (forward + backward; the LM head counts, the input
embedding lookup does not) + 6 * layers * heads * head_dim * seq for attention (PaLM's
12 * L * H * Q * T halved for the causal mask). Tokens = rows x seq, every position (the model
computes them all). Peak: the card's dense bf16 tensor-core rate, 989 TFLOP/s for H100/H200 SXM;
on a CPU there is no stated peak and MFU prints n/a. Each step time is the median of `--steps`
timed steps after two untimed ones (compile, warm-up).

    python benchmarks/train_mfu.py             # GPU: 1.33B Qwen2 shape, batch 8 x 2048, bf16 (gpu_suite.sh)
                                               # CPU: a tiny shape, float32
    python benchmarks/train_mfu.py --dry-run   # seconds, tiny shapes on CPU: what the dry-run test runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jvila.config import LLMConfig
from jvila.models.attention import MaskInfo
from jvila.models.kernel_attention import KernelAttention
from jvila.models.llm import LLM
from jvila.models.params import abstract_model
from jvila.train import optimizer as opt
from jvila.train.metrics import peak_tflops
from jvila.train.step import init_train_state, make_train_step

# Qwen2-shaped, 1.33B parameters (311M of them the input embedding, lm_head untied).
GPU_MODEL = LLMConfig(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=16,
                      num_kv_heads=2, head_dim=128, family="qwen2", qkv_bias=True, max_position_embeddings=4096)
CPU_MODEL = LLMConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=64, family="qwen2", qkv_bias=True)
DRY_MODEL = LLMConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=8, family="qwen2", qkv_bias=True)
def model_flops_per_step(cfg: LLMConfig, rows: int, seq: int) -> float:
    """6 (N - embedding) per token + causal attention, see the module docstring."""
    shapes = {n: v.shape for n, v in
              ((".".join(map(str, p)), v.get_value()) for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg))))}
    non_embedding = sum(int(np.prod(s)) for s in shapes.values())
    if not cfg.tie_embeddings:  # a tied table is also the LM head, whose matmul counts
        non_embedding -= int(np.prod(shapes["embed"]))
    per_token = 6.0 * non_embedding + 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq
    return per_token * rows * seq


def random_batch(cfg: LLMConfig, rows: int, seq: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (rows, seq + 1), dtype=np.int32)
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], weights=np.ones((rows, seq), np.float32),
                positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
                segment_ids=np.ones((rows, seq), np.int32))


def unpacked(attention):
    """The attention with the (all-ones) segment ids dropped: one sequence per row, cuDNN-eligible on a GPU."""
    def attend(q, k, v, *, mask_info, cache_info):
        return attention(q, k, v, mask_info=MaskInfo(mask_info.positions, None), cache_info=cache_info)

    return attend


def time_steps(run, state, batches, steps: int) -> float:
    """Median seconds per step of `state, loss = run(state, batch)` after two untimed steps."""
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        state, loss = run(state, batches[i % len(batches)])
        loss.block_until_ready()
        if i >= 2:
            times.append(time.perf_counter() - start)
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"the loss is {float(loss)}")
    return statistics.median(times)


def time_ours(cfg, batches, *, remat, attention, dtype, steps) -> float:
    graphdef = nnx.split(abstract_model(cfg))[0]
    params = jax.jit(lambda: nnx.split(LLM(cfg, rngs=nnx.Rngs(0)))[1])()  # random init on the device
    mask = opt.trainable_mask(params, "all")
    optimizer = opt.build_optimizer(opt.OptimizerConfig(learning_rate=1e-4, weight_decay=0.1), params, mask, 1000)
    state = init_train_state(graphdef, params, optimizer, mask)
    base = KernelAttention()
    step = make_train_step(graphdef, optimizer, attention=unpacked(base) if attention == "unpacked" else base,
                           remat=remat, compute_dtype=dtype)

    def run(state, batch):
        state, metrics = step(state, batch, None)
        return state, metrics["loss"]

    return time_steps(run, state, batches, steps)


# ------------------------------------------------------------------------------------- the plain step


def plain_init(cfg: LLMConfig, key):
    e, h, kv, d, m, n = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                         cfg.num_layers)
    shapes = dict(wq=(n, e, h * d), wk=(n, e, kv * d), wv=(n, e, kv * d), wo=(n, h * d, e), wg=(n, e, m),
                  wu=(n, e, m), wd=(n, m, e))
    keys = jax.random.split(key, len(shapes) + 2)
    layers = {k: 0.02 * jax.random.normal(kk, s) for (k, s), kk in zip(shapes.items(), keys)}
    layers.update(bq=jnp.zeros((n, h * d)), bk=jnp.zeros((n, kv * d)), bv=jnp.zeros((n, kv * d)),
                  ln1=jnp.ones((n, e)), ln2=jnp.ones((n, e)))
    return dict(embed=0.02 * jax.random.normal(keys[-2], (cfg.vocab_size, e)), layers=layers,
                norm=jnp.ones((e,)), head=0.02 * jax.random.normal(keys[-1], (e, cfg.vocab_size)))


def plain_loss(params, tokens, targets, cfg: LLMConfig, dtype, implementation):
    b, s = tokens.shape
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = jax.tree.map(lambda x: x.astype(dtype), params)
    inv = 1.0 / (cfg.rope.theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = jnp.arange(s, dtype=jnp.float32)[:, None] * inv[None]
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]

    def rms(x, scale):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + cfg.rms_norm_eps) * scale).astype(dtype)

    def rope(x):
        x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(dtype)

    def layer(x, w):
        y = rms(x, w["ln1"])
        q = rope((y @ w["wq"] + w["bq"]).reshape(b, s, h, d))
        k = rope((y @ w["wk"] + w["bk"]).reshape(b, s, kv, d))
        v = (y @ w["wv"] + w["bv"]).reshape(b, s, kv, d)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
        x = x + o.reshape(b, s, h * d) @ w["wo"]
        y = rms(x, w["ln2"])
        return x + (jax.nn.silu(y @ w["wg"]) * (y @ w["wu"])) @ w["wd"], None

    layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    x, _ = jax.lax.scan(layer, p["embed"][tokens], p["layers"])
    logits = jnp.einsum("bse,ev->bsv", rms(x, p["norm"]), p["head"], preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))


def time_plain(cfg, batches, *, dtype, steps) -> float:
    optimizer = optax.adamw(1e-4, weight_decay=0.1)
    params = jax.jit(plain_init, static_argnums=0)(cfg, jax.random.key(0))
    # On a GPU, JAX's own choice: cuDNN flash attention where it applies (bf16), else XLA's.
    implementation = None if jax.default_backend() == "gpu" else "xla"

    def update(state, tokens, targets):
        params, opt_state = state
        loss, grads = jax.value_and_grad(plain_loss)(params, tokens, targets, cfg, dtype, implementation)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    update = jax.jit(update, donate_argnums=0)
    return time_steps(lambda st, bt: update(st, bt["tokens"], bt["targets"]), (params, optimizer.init(params)),
                      batches, steps)


# ------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, seconds")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--remat", default=None, help="comma-separated policies for ours (none,full,dots,lightseq)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"))
    args = parser.parse_args(argv)
    gpu = jax.default_backend() == "gpu" and not args.dry_run
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}", flush=True)
    cfg = DRY_MODEL if args.dry_run else GPU_MODEL if gpu else CPU_MODEL
    rows = args.rows or (2 if args.dry_run else 8 if gpu else 4)
    seq = args.seq or (32 if args.dry_run else 2048 if gpu else 256)
    steps = args.steps or (2 if args.dry_run else 10 if gpu else 5)
    dtype = jnp.dtype(args.dtype or ("bfloat16" if gpu else "float32"))
    remats = (args.remat or ("dots,full" if gpu else "full" if args.dry_run else "none,dots,full")).split(",")
    variants = [(r, "unpacked") for r in remats] + ([(remats[0], "packed")] if gpu else [])
    batches = [random_batch(cfg, rows, seq, i) for i in range(3)]
    flops = model_flops_per_step(cfg, rows, seq)
    peak = peak_tflops(jax.devices()[0].device_kind)
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract_model(cfg))))
    print(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {params / 1e6:.3g}M params; batch {rows} x {seq}, "
          f"{dtype.name} compute, float32 AdamW; {flops:.4e} model FLOPs per step; peak "
          f"{'n/a (no stated peak for ' + jax.devices()[0].device_kind + ')' if peak is None else f'{peak:g} TFLOP/s'}",
          flush=True)

    # Each run fails soft (an OOM or a kernel that does not apply costs its row, not the table).
    runs = [("plain", "dots", "cudnn" if gpu else "xla", lambda: time_plain(cfg, batches, dtype=dtype, steps=steps))]
    runs += [("ours", remat, attention, lambda r=remat, a=attention: time_ours(cfg, batches, remat=r, attention=a,
                                                                               dtype=dtype, steps=steps))
             for remat, attention in variants]
    results, failed = [], []
    for system, remat, attention, timed in runs:
        try:
            seconds = timed()
        except Exception as err:  # noqa: BLE001 - reported, and the exit status says so
            print(f"!! {system} remat={remat} attention={attention} failed: {type(err).__name__}: "
                  f"{str(err)[:500]}", flush=True)
            failed.append(system)
            continue
        results.append((system, remat, attention, seconds))
        print(f"timed {system} remat={remat} attention={attention}: {seconds * 1e3:.1f} ms", flush=True)

    print(f"\ntrain step, median of {steps} steps (model FLOPs: 6(N - embedding) + causal attention per token)")
    print(f"{'system':8} {'remat':8} {'attention':10} {'step ms':>9} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>7} "
          f"{'vs plain':>9}")
    plain_s = results[0][-1] if results and results[0][0] == "plain" else None
    for system, remat, attention, seconds in results:
        mfu = "n/a" if peak is None else f"{100 * flops / seconds / (peak * 1e12):.1f}%"
        ratio = "n/a" if plain_s is None else f"{plain_s / seconds:.2f}x"
        print(f"{system:8} {remat:8} {attention:10} {seconds * 1e3:9.3f} {rows * seq / seconds:11.0f} "
              f"{flops / seconds / 1e12:9.3f} {mfu:>7} {ratio:>9}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
