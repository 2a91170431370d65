"""A Llama/Qwen2-family decoder in flax.nnx.

Every parameter carries logical axis names (`out_sharding`); `sharding/` maps them onto a mesh with
one rule table. Matmul weights are stored [in, ..., out] with heads as their own axis, so that
the "q_heads"/"kv_heads" names can shard attention by head. Attention is a callable handed in
(see `jvila.models.attention`); the KV cache is an explicit pytree (see `jvila.models.kv_cache`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jvila.config import LLMConfig
from jvila.models.attention import Attention, CacheInfo, MaskInfo
from jvila.models.kv_cache import KVCache, write_packed, write_pages
from jvila.models.lora import LoraContext
from jvila.models.rope import apply_rope, inverse_frequencies

INIT_STD = 0.02  # the Hugging Face initializer range for these families


def _param(rngs: nnx.Rngs | None, shape, names, dtype, *, fill: float | None = None) -> nnx.Param:
    """A parameter with logical axis names. Placement on a mesh happens later, in `sharding/`."""
    if fill is not None:
        value = jnp.full(shape, fill, dtype)
    else:
        value = (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.scale = _param(None, (dim,), ("norm",), dtype, fill=1.0)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs, dtype):
        e, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = _param(rngs, (e, hq, d), ("embed", "q_heads", "head_dim"), dtype)
        self.k_proj = _param(rngs, (e, hkv, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = _param(rngs, (e, hkv, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = _param(rngs, (hq, d, e), ("q_heads", "head_dim", "embed"), dtype)
        if cfg.qkv_bias:
            self.q_bias = _param(None, (hq, d), ("q_heads", "head_dim"), dtype, fill=0.0)
            self.k_bias = _param(None, (hkv, d), ("kv_heads", "head_dim"), dtype, fill=0.0)
            self.v_bias = _param(None, (hkv, d), ("kv_heads", "head_dim"), dtype, fill=0.0)
        if cfg.out_bias:
            self.o_bias = _param(None, (e,), ("embed",), dtype, fill=0.0)
        self.rope, self.head_dim, self.qkv_bias, self.out_bias = cfg.rope, d, cfg.qkv_bias, cfg.out_bias

    def __call__(self, x, *, attention: Attention, mask_info: MaskInfo, cache_info, pages, num_new, lora=None):
        q, k, v = (_project_to_heads(x, w[...], lora, name)
                   for name, w in (("q_proj", self.q_proj), ("k_proj", self.k_proj), ("v_proj", self.v_proj)))
        dt = x.dtype
        if self.qkv_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        inv_freq = inverse_frequencies(self.rope, self.head_dim)
        q = apply_rope(q, mask_info.positions, inv_freq)
        k = apply_rope(k, mask_info.positions, inv_freq)
        if pages is not None and cache_info.packed:
            slots, positions, num_real = cache_info.token_slots, mask_info.positions[0], cache_info.cu_q_lens[-1]
            k_pages = write_packed(pages[0], k[0], cache_info.page_table, slots, positions, num_real)
            v_pages = write_packed(pages[1], v[0], cache_info.page_table, slots, positions, num_real)
            pages, k, v = (k_pages, v_pages), k_pages, v_pages
        elif pages is not None:
            start = mask_info.positions[:, 0]
            k_pages = write_pages(pages[0], k, cache_info.page_table, start, num_new)
            v_pages = write_pages(pages[1], v, cache_info.page_table, start, num_new)
            pages, k, v = (k_pages, v_pages), k_pages, v_pages
        out = attention(q, k, v, mask_info=mask_info, cache_info=cache_info)
        # Heads folded into one axis first: a plain 2-D matmul, which XLA runs on the stored
        # weight as is (contracting two axes made it transpose o_proj on every call).
        batch, seq = out.shape[:2]
        o_proj = self.o_proj[...]
        heads_out = out.reshape(batch, seq, -1)
        out = _matmul(heads_out, o_proj.reshape(-1, o_proj.shape[-1]))
        if lora is not None:
            out = lora.add("o_proj", heads_out, out)
        if self.out_bias:
            out = out + self.o_bias[...].astype(dt)
        return out, pages


def _matmul(x, w, *, out_dtype=None, transposed: bool = False):
    """x [..., k] @ w [k, n] (or w [n, k] with `transposed`) → [..., n] in `out_dtype` (default x's
    dtype); w is cast to x's dtype.

    Below float32 (bfloat16) the dot accumulates in float32 and rounds its result once. On XLA's CPU
    backend that is also the fast form: a bfloat16 dot with a bfloat16 result, and a bfloat16
    matrix-vector product (one row), both take a slow path there (~10x float32's time for SmolLM2's
    shapes, measured on an AVX-512 BF16 CPU), so on CPU a lone row is padded to two.
    """
    out_dtype = out_dtype or x.dtype
    w = w.astype(x.dtype)
    low = x.dtype != jnp.float32
    accumulate = jnp.float32 if low else None

    def dot(a):  # contracts a's last axis, keeping its leading axes (and their sharding) as they are
        contract = (((a.ndim - 1,), (1 if transposed else 0,)), ((), ()))
        return jax.lax.dot_general(a, w, contract, preferred_element_type=accumulate)

    if low and math.prod(x.shape[:-1]) == 1 and jax.default_backend() == "cpu":
        y = dot(jnp.pad(x.reshape(1, -1), ((0, 1), (0, 0))))[:1].reshape(*x.shape[:-1], -1)
    else:
        y = dot(x)
    return y.astype(out_dtype)


def _project_to_heads(x, w, lora=None, name=None):
    """x [b, t, e] @ w [e, heads, d] → [b, t, heads, d], as one 2-D matmul on the stored weight.

    `lora` (a `jvila.models.lora.LayerLora`) adds module `name`'s adapters on the flat [b, t, heads * d] output.
    """
    e, heads, d = w.shape
    y = _matmul(x, w.reshape(e, heads * d))
    if lora is not None:
        y = lora.add(name, x, y)
    return y.reshape(*x.shape[:2], heads, d)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs, dtype):
        e, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _param(rngs, (e, m), ("embed", "mlp"), dtype)
        self.up_proj = _param(rngs, (e, m), ("embed", "mlp"), dtype)
        self.down_proj = _param(rngs, (m, e), ("mlp", "embed"), dtype)

    def __call__(self, x, lora=None):
        if lora is not None:
            return self._with_lora(x, lora)
        gate = jax.nn.silu(_matmul(x, self.gate_proj[...]))
        return _matmul(gate * _matmul(x, self.up_proj[...]), self.down_proj[...])

    def _with_lora(self, x, lora):
        """The same SwiGLU with `lora` (a `jvila.models.lora.LayerLora`) added after each projection."""
        gate = jax.nn.silu(lora.add("gate_proj", x, _matmul(x, self.gate_proj[...])))
        hidden = gate * lora.add("up_proj", x, _matmul(x, self.up_proj[...]))
        return lora.add("down_proj", hidden, _matmul(hidden, self.down_proj[...]))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs, dtype):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.attn = SelfAttention(cfg, rngs=rngs, dtype=dtype)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x, lora=None, **attn_kwargs):
        attn_out, pages = self.attn(self.input_norm(x), lora=lora, **attn_kwargs)
        x = x + attn_out
        return x + self.mlp(self.post_attention_norm(x), lora=lora), pages


class LLM(nnx.Module):
    """Decoder-only language model. `param_dtype` stores weights, `compute_dtype` runs the math."""

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, compute_dtype=jnp.float32):
        self.config = cfg
        self.compute_dtype = compute_dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, dtype=param_dtype) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0).astype(self.compute_dtype)

    def __call__(
        self,
        embeddings: jax.Array,
        *,
        positions: jax.Array,
        attention: Attention,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        num_new: jax.Array | None = None,
        cu_q_lens: jax.Array | None = None,
        token_slots: jax.Array | None = None,
        lora: LoraContext | None = None,
        remat: str = "none",
    ) -> tuple[jax.Array, KVCache | None]:
        """embeddings [batch, seq, hidden] → final-normed hidden states, and the updated cache.

        With a cache, `positions[:, 0]` must equal `cache.lengths` and `num_new[b]` tokens of row b
        are real (the rest is padding, neither written nor counted).
        Packed (a cache and `cu_q_lens`): embeddings are [1, T, hidden], the new tokens of the
        cache's rows back to back; token t belongs to row `token_slots[t]` at `positions[0, t]`
        (see `jvila.models.attention`), and `num_new` is not used.
        `lora` adds the adapters it carries to each token of the flattened [batch * seq] tokens
        (see `jvila.models.lora`); None runs the base model alone.
        `remat` (training, no cache) wraps each layer in the named `sharding.remat` policy.
        """
        mask_info = MaskInfo(positions=positions, segment_ids=segment_ids)
        cache_info = None
        if cache is not None and cu_q_lens is not None:
            cache_info = CacheInfo(page_table=cache.page_table, kv_lengths=cache.lengths + jnp.diff(cu_q_lens),
                                   cu_q_lens=cu_q_lens, token_slots=token_slots)
        elif cache is not None:
            cache_info = CacheInfo(page_table=cache.page_table, kv_lengths=cache.lengths + num_new)
        if remat != "none" and cache is not None:
            raise ValueError("remat applies to cache-free (training) forwards only")
        x = embeddings.astype(self.compute_dtype)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            pages = None if cache is None else (cache.k_pages[i], cache.v_pages[i])
            if remat != "none":
                x = _rematerialized_layer(layer, x, remat, attention=attention, mask_info=mask_info,
                                          lora=None if lora is None else lora.layer(i))
                continue
            x, pages = layer(
                x, attention=attention, mask_info=mask_info, cache_info=cache_info, pages=pages, num_new=num_new,
                lora=None if lora is None else lora.layer(i),
            )
            if cache is not None:
                new_k.append(pages[0])
                new_v.append(pages[1])
        if cache is not None:
            cache = KVCache(tuple(new_k), tuple(new_v), cache.page_table, cache_info.kv_lengths)
        return self.final_norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., hidden] → float32 logits [..., vocab]."""
        if self.config.tie_embeddings:  # the embedding table as stored, [vocab, hidden]
            return _matmul(hidden, self.embed[...], out_dtype=jnp.float32, transposed=True)
        return _matmul(hidden, self.lm_head[...], out_dtype=jnp.float32)


def _rematerialized_layer(layer: DecoderLayer, x, policy: str, **kwargs):
    """One cache-free decoder layer under `jax.checkpoint` with the named policy (see `sharding.remat`).

    The layer's parameters go in as an explicit argument so the backward pass recomputes from them;
    the layer is split and merged at trace time only.
    """
    from sharding.remat import rematerialized  # sharding imports the models: a module-level import would cycle

    graphdef, state = nnx.split(layer)

    def run(state, x):
        return nnx.merge(graphdef, state)(x, cache_info=None, pages=None, num_new=None, **kwargs)[0]

    return rematerialized(run, policy)(state, x)
