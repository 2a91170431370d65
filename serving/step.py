"""The engine's device step: one jitted call that appends a packed batch of tokens to the page
pools, runs the model and picks every row's next token.

A step's tokens are the new tokens of its rows back to back (a running request's one decode
token, a chunk of a new prompt, ...), described host-side by a `StepBatch` of numpy arrays.
`StepRunner` owns the per-layer K/V page pools (donated to each call, so they are updated in
place), pads each batch to a small set of bucket sizes (tokens and rows round up to a power of
two, the page-table width to a power of two or three quarters of one) so the number of
compilations stays bounded, and returns numpy
results. Page ids and their sharing are the caller's business (see `serving.page_allocator`);
`copy_pages` performs the copy-on-write copies it asks for.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jvila.models import functional
from jvila.models.kernel_attention import default_attention
from jvila.models.kv_cache import KVCache
from serving.adapters.working_set import LoraBatch
from serving.buckets import bucket, page_bucket
from serving.host_staging import staging_buffers
from serving.sampling import SampleOutput, SamplingArrays, sample

# Smallest token bucket of a step with more tokens than rows (prompt chunks): short chunks share one
# compilation. A step with no more tokens than its row bucket (decode) pads to the row bucket instead.
MIN_TOKENS = 8
# Smallest page-table bucket, in tokens: short contexts share one compilation (gathering a few
# more pages than needed costs less than compiling the whole model again).
MIN_CONTEXT = 64


@dataclasses.dataclass
class StepBatch:
    """One step's work, unpadded. B rows (sequences), T packed tokens.

    Row b's new tokens are token_ids[cu_q_lens[b]:cu_q_lens[b+1]] (possibly none); they continue
    the context_lens[b] tokens already in its pages, and its page_table row names its pages in
    order (entries past the pages it needs are ignored). Every row gets a next token, chosen
    from the logits at its last new token; the caller keeps those it wants (a row that took no
    tokens, or stopped mid-prompt, gets a meaningless one).
    Sampling fields are per row; None means greedy for every row.
    """

    token_ids: np.ndarray  # [T] int
    cu_q_lens: np.ndarray  # [B + 1] int, starts at 0, non-decreasing, ends at T
    context_lens: np.ndarray  # [B] int: tokens already cached per row
    page_table: np.ndarray  # [B, P] int, P <= max_pages_per_seq
    temperature: np.ndarray | None = None  # [B] float, 0 = greedy
    top_k: np.ndarray | None = None  # [B] int, 0 = off
    top_p: np.ndarray | None = None  # [B] float in (0, 1], 1 = off
    seeds: np.ndarray | None = None  # [B] int, used modulo 2**32 (the caller draws one for a request without)
    output_index: np.ndarray | None = None  # [B] int: how many tokens the row's request has produced so far
    num_logprobs: int = 0  # top-N logprobs wanted (the largest N any row asks for); 0 = none
    input_embeddings: np.ndarray | None = None  # [T, hidden] float: media rows
    embedding_mask: np.ndarray | None = None  # [T] bool: which tokens take input_embeddings
    lora: LoraBatch | None = None  # the step's adapters (serving.adapters): a working set read from the page pools

    @property
    def num_rows(self) -> int:
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class StepResult:
    next_tokens: np.ndarray  # [B] int32
    logprobs: np.ndarray  # [B] float32: log_softmax of the model's logits at the chosen token
    top_ids: np.ndarray  # [B, batch.num_logprobs] int32, most likely first
    top_logprobs: np.ndarray  # [B, batch.num_logprobs] float32


class _Static:
    """A static jit argument hashed once: a model's graphdef hashes its whole module tree in Python,
    and jit hashes its static arguments on every call (about a millisecond per step for SmolLM2)."""

    __slots__ = ("_hash", "value")

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _Static) and (self.value is other.value or self.value == other.value)


@functools.partial(jax.jit, static_argnames=("model_def", "attention", "num_top"),
                   donate_argnames=("k_pages", "v_pages"))
def _step(model_def: _Static, state_leaves, k_pages, v_pages, tokens, cu_q_lens, context_lens, page_table,
          params: SamplingArrays, input_embeddings, embedding_mask, lora=None, token_adapters=None, *,
          attention, num_top) -> tuple[SampleOutput, tuple, tuple]:
    # The state travels as its flat leaves (flattening an nnx.State on the host costs more than the
    # call itself); model_def holds the graphdef and the state's treedef.
    graphdef, state_treedef = model_def.value
    state = jax.tree.unflatten(state_treedef, state_leaves)
    # `lora`: the batch's adapters, already read out of the pools (unified paging) and kept between
    # steps while the batch's adapters stay the same (serving.adapters.working_set).
    cache = KVCache(k_pages, v_pages, page_table, context_lens)
    logits, cache = functional.extend_packed(graphdef, state, tokens, cu_q_lens, cache, attention=attention,
                                             input_embeddings=input_embeddings, embedding_mask=embedding_mask,
                                             lora=lora, token_adapters=token_adapters)
    return sample(logits, params, num_top=num_top), cache.k_pages, cache.v_pages


@functools.partial(jax.jit, donate_argnames=("k_pages", "v_pages"))
def _copy_pages(k_pages, v_pages, src, dst):
    # All reads see the pools before any write; padding pairs have dst out of range and are dropped.
    def copy(pool):
        return pool.at[dst].set(pool[src], mode="drop")

    return tuple(map(copy, k_pages)), tuple(map(copy, v_pages))


@functools.partial(jax.jit, donate_argnames=("k_pages", "v_pages"))
def _write_pages(k_pages, v_pages, pages, k_data, v_data):
    # k_data, v_data [layers, pages, ...]; padding entries have a page id out of range and are dropped.
    def write(pools, data):
        return tuple(pool.at[pages].set(data[i], mode="drop") for i, pool in enumerate(pools))

    return write(k_pages, k_data), write(v_pages, v_data)


class StepRunner:
    """Owns the page pools and runs `StepBatch`es through the jitted step.

    `attention` defaults to the platform's best (`default_attention`: the dense reference on
    CPU, the Pallas kernels elsewhere); `cache_dtype` to the model's compute dtype.
    On CPU a 16-bit model's pools default to float32 (see `_default_cache_dtype`).
    `max_logprobs` is the one static top-N computed whenever a batch asks for any.
    `min_rows`/`min_tokens` raise the smallest row and token buckets: a caller that knows its
    batch (`generate`) keeps one shape while rows finish, trading padded rows for compilations.
    """

    def __init__(self, graphdef, state, *, num_pages: int, page_size: int, max_pages_per_seq: int, attention=None,
                 cache_dtype=None, max_logprobs: int = 20, min_rows: int = 1, min_tokens: int = MIN_TOKENS,
                 lora_geometry=None):
        if num_pages < 1 or page_size < 1 or max_pages_per_seq < 1:
            raise ValueError(f"num_pages, page_size and max_pages_per_seq must be positive, got "
                             f"{num_pages}, {page_size}, {max_pages_per_seq}")
        model = nnx.merge(graphdef, state)  # only to read its static config and dtype
        cfg = model.config
        self.graphdef = graphdef
        self.state = state  # also flattens it for the step (see the property)
        self.config = cfg
        self.num_pages, self.page_size, self.max_pages_per_seq = num_pages, page_size, max_pages_per_seq
        self.attention = attention or default_attention()
        self.max_logprobs = max_logprobs
        self.lora_geometry = lora_geometry  # serving.adapters.paged_layout.PoolGeometry when adapters are served
        self.min_rows, self.min_tokens = bucket(min_rows), bucket(min_tokens, MIN_TOKENS)
        dtype = cache_dtype or _default_cache_dtype(model.compute_dtype)
        shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        self.k_pages = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        self.v_pages = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))

    # ------------------------------------------------------------------ the step

    def run(self, batch: StepBatch) -> StepResult:
        rows, num_tokens = batch.num_rows, batch.num_tokens
        q_lens = self._check(batch)
        rows_b = bucket(rows, self.min_rows)
        # A step with no more tokens than its row bucket (decode only, say) pads its tokens to the row
        # bucket, not to min_tokens: the matmuls then run on as many rows as the batch has (a lone
        # decode row is one matrix-vector product per weight, not eight), and at one token per
        # block the attention takes its decode path.
        tokens_b = rows_b if num_tokens <= rows_b else bucket(num_tokens, self.min_tokens)
        # Only as many table columns as the longest row needs: the dense attention reads them all.
        pages_needed = int(np.max(-(-(batch.context_lens + q_lens) // self.page_size), initial=1))
        pages_b = min(page_bucket(pages_needed, -(-MIN_CONTEXT // self.page_size)), self.max_pages_per_seq)

        tokens = _pad(np.asarray(batch.token_ids, np.int32), tokens_b)
        cu_q_lens = _pad(np.asarray(batch.cu_q_lens, np.int32), rows_b + 1, fill=num_tokens)
        context_lens = _pad(np.asarray(batch.context_lens, np.int32), rows_b)
        table = np.zeros((rows_b, pages_b), np.int32)
        width = min(pages_b, batch.page_table.shape[1])
        table[:rows, :width] = batch.page_table[:, :width]
        params = self._sampling_arrays(batch, rows_b)
        media = media_mask = None
        if batch.input_embeddings is not None:
            media = _pad(np.asarray(batch.input_embeddings), tokens_b)
            media_mask = _pad(np.asarray(batch.embedding_mask, bool), tokens_b)
        num_top = self.max_logprobs if batch.num_logprobs > 0 else 0
        lora = token_adapters = None
        if batch.lora is not None:
            if self.lora_geometry is None:
                raise ValueError("this step runner was built without adapters (lora_geometry)")
            if batch.lora.token_adapters.shape != (num_tokens,):
                raise ValueError(f"lora.token_adapters must be [T] = [{num_tokens}]")
            token_adapters = _pad(batch.lora.token_adapters.astype(np.int32), tokens_b, fill=-1)
            lora = batch.lora.step_weights(token_adapters, rows_b)

        out, self.k_pages, self.v_pages = _step(
            self._model_def, self._state_leaves, self.k_pages, self.v_pages, tokens, cu_q_lens, context_lens, table,
            params,
            media, media_mask, lora, token_adapters, attention=self.attention, num_top=num_top)
        out = jax.device_get(out)
        n = batch.num_logprobs
        return StepResult(np.asarray(out.tokens[:rows]), np.asarray(out.logprobs[:rows]),
                          np.asarray(out.top_ids[:rows, :n]), np.asarray(out.top_logprobs[:rows, :n]))

    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, state) -> None:
        """The weights the step runs (swappable between steps for a state of the same structure)."""
        self._state = state
        self._state_leaves, treedef = jax.tree.flatten(state)
        self._model_def = _Static((self.graphdef, treedef))

    def copy_pages(self, pairs) -> None:
        """Copy whole pages src → dst in every layer's K and V pools (copy-on-write)."""
        pairs = np.asarray(list(pairs), np.int64).reshape(-1, 2)
        if len(pairs) == 0:
            return
        if pairs.min() < 0 or pairs.max() >= self.num_pages:
            raise ValueError(f"page ids must lie in [0, {self.num_pages}), got {pairs.tolist()}")
        if len(set(pairs[:, 1].tolist())) != len(pairs):
            raise ValueError("copy destinations must be distinct")
        size = bucket(len(pairs))
        src = _pad(pairs[:, 0].astype(np.int32), size)
        dst = _pad(pairs[:, 1].astype(np.int32), size, fill=self.num_pages)  # out of range: dropped
        self.k_pages, self.v_pages = _copy_pages(self.k_pages, self.v_pages, src, dst)

    def write_pages(self, pages, values) -> None:
        """Overwrite whole pages of every layer's pools with `values` [layers, n]: page i takes values
        [2iE, 2iE + E) in K and the next E in V (E = page_size * kv_heads * head_dim), zeros past n.

        Adapter weights enter the pool this way (unified paging: `paged_layout.pack_stream`'s values); the
        page count is bucketed (two sizes per doubling; the padding pages are dropped). The values are laid out
        in pages on the host, in buffers kept for the process (`serving.host_staging`); padding and splitting
        them on the device instead compiled 3x slower and ran no faster.
        """
        pages = np.asarray(pages, np.int32)
        if len(pages) == 0:
            return
        if pages.min() < 0 or pages.max() >= self.num_pages:
            raise ValueError(f"page ids must lie in [0, {self.num_pages})")
        page_values = 2 * int(np.prod(self.k_pages[0].shape[1:]))
        if values.ndim != 2 or values.shape[0] != len(self.k_pages):
            raise ValueError(f"values must be [layers = {len(self.k_pages)}, n], got {values.shape}")
        room = len(pages) * page_values
        if values.shape[1] > room and np.any(values[:, room:]):  # past the room: the stream's zero padding only
            raise ValueError(f"{values.shape[1]} values per layer do not fit {len(pages)} pages of {page_values}")
        size = page_bucket(len(pages))
        padded = _pad(pages, size, fill=self.num_pages)  # out of range: dropped
        layers, half = len(self.k_pages), page_values // 2
        width = min(values.shape[1], room)
        whole = width // page_values  # pages the values fill; the rest (if any) get them in part, then zeros
        with staging_buffers(self.k_pages[0].dtype, (layers, size, *self.k_pages[0].shape[1:])) as (k_data, v_data):
            k_rows, v_rows = k_data.reshape(layers, size, half), v_data.reshape(layers, size, half)
            split = values[:, : whole * page_values].reshape(layers, whole, 2, half)
            k_rows[:, :whole], v_rows[:, :whole] = split[:, :, 0], split[:, :, 1]
            if whole < len(pages):
                rest = np.zeros((layers, (len(pages) - whole) * page_values), values.dtype)
                rest[:, : width - whole * page_values] = values[:, whole * page_values: width]
                rest = rest.reshape(layers, -1, 2, half)
                k_rows[:, whole: len(pages)], v_rows[:, whole: len(pages)] = rest[:, :, 0], rest[:, :, 1]
            self.k_pages, self.v_pages = _write_pages(self.k_pages, self.v_pages, padded, k_data, v_data)
            jax.block_until_ready(self.k_pages)  # the buffers may be read until the write is done

    @staticmethod
    def num_compilations() -> int:
        """Compiled variants of the step so far (all runners together)."""
        return _step._cache_size()

    # ------------------------------------------------------------------ host-side checks

    def _check(self, batch: StepBatch) -> np.ndarray:
        rows, num_tokens = batch.num_rows, batch.num_tokens
        if rows < 1:
            raise ValueError("a step needs at least one row")
        cu = np.asarray(batch.cu_q_lens)
        if cu.shape != (rows + 1,) or cu[0] != 0 or cu[-1] != num_tokens or np.any(np.diff(cu) < 0):
            raise ValueError(f"cu_q_lens must be [rows + 1] = [{rows + 1}] offsets from 0 to the {num_tokens} tokens, "
                             f"non-decreasing; got {cu.tolist()}")
        if num_tokens < 1:
            raise ValueError("a step needs at least one token")
        tokens = np.asarray(batch.token_ids)
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        table = np.asarray(batch.page_table)
        if table.ndim != 2 or table.shape[0] != rows or table.shape[1] > self.max_pages_per_seq:
            raise ValueError(f"page_table must be [rows, ≤ {self.max_pages_per_seq}] = [{rows}, ...], "
                             f"got {table.shape}")
        context = np.asarray(batch.context_lens)
        if np.any(context < 0):
            raise ValueError("context_lens must not be negative")
        q_lens = np.diff(cu)
        needed = -(-(context + q_lens) // self.page_size)
        if np.any(needed > table.shape[1]):
            b = int(np.argmax(needed > table.shape[1]))
            raise ValueError(f"row {b} holds {int(context[b] + q_lens[b])} tokens, more than its "
                             f"{table.shape[1]} pages of {self.page_size} can hold")
        used = np.arange(table.shape[1])[None, :] < needed[:, None]
        if np.any(used & ((table < 0) | (table >= self.num_pages))):
            raise ValueError(f"page ids in use must lie in [0, {self.num_pages})")
        if (batch.input_embeddings is None) != (batch.embedding_mask is None):
            raise ValueError("input_embeddings and embedding_mask come together")
        if batch.input_embeddings is not None and (
            np.shape(batch.input_embeddings) != (num_tokens, self.config.hidden_size)
            or np.shape(batch.embedding_mask) != (num_tokens,)
        ):
            raise ValueError(f"input_embeddings must be [T, hidden] = [{num_tokens}, {self.config.hidden_size}] "
                             f"and embedding_mask [{num_tokens}]")
        if not 0 <= batch.num_logprobs <= self.max_logprobs:
            raise ValueError(f"num_logprobs must lie in [0, {self.max_logprobs}], got {batch.num_logprobs}")
        return q_lens

    def _sampling_arrays(self, batch: StepBatch, rows_b: int) -> SamplingArrays:
        def field(values, dtype, default):
            if values is None:
                return np.full((rows_b,), default, dtype)
            values = np.asarray(values)
            if values.shape != (batch.num_rows,):
                raise ValueError(f"sampling fields need one value per row ({batch.num_rows}), got {values.shape}")
            return _pad(values.astype(dtype), rows_b, fill=default)

        if batch.seeds is not None:
            seeds = np.asarray([int(seed) % (1 << 32) for seed in batch.seeds], np.uint32)
        else:
            seeds = None
        return SamplingArrays(
            temperature=field(batch.temperature, np.float32, 0.0),
            top_k=field(batch.top_k, np.int32, 0),
            top_p=field(batch.top_p, np.float32, 1.0),
            seeds=field(seeds, np.uint32, 0),
            output_index=field(batch.output_index, np.int32, 0),
        )


def _default_cache_dtype(compute_dtype):
    """The pools' dtype when the caller names none: the model's compute dtype, except float32 for a
    16-bit model on CPU. XLA's CPU backend has no bfloat16 scatter: it widens the whole pool to
    float32 and back around each step's K/V write, a copy of every page of every layer per step
    (SmolLM2-135M, batch-8 decode: ~210 ms of CPU time on a ~90 ms step). A float32 pool holds the
    bfloat16 K/V exactly (the attention reads them as float32 anyway), at twice the memory."""
    if jax.default_backend() == "cpu" and jnp.dtype(compute_dtype).itemsize < 4:
        return jnp.float32
    return compute_dtype


def _pad(values: np.ndarray, size: int, fill=0) -> np.ndarray:
    """values padded along axis 0 to `size` with `fill`."""
    out = np.full((size, *values.shape[1:]), fill, values.dtype)
    out[: len(values)] = values
    return out
