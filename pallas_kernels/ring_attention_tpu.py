"""Ring attention as one fused Mosaic TPU kernel: K/V rotate by remote DMA inside it.

Call ``ring_attention_tpu`` inside ``jax.shard_map`` over a 1-D ring axis where
device ``r`` holds the ``r``-th contiguous chunk of the sequence for q, k and v
(LightSeq / LongVILA sequence parallelism). It returns ``(out, lse)`` of the
local queries against the whole sequence, with the semantics of
``flash_attention_reference`` on the unsharded arrays (fp32 ``lse``).

Why one kernel. A ring built from ``ppermute`` and one flash call per step
leaves the overlap of transfer and compute to XLA's scheduler and writes the
partial results to HBM at every step. Here each device, for each ring step,
starts a remote async copy of the K/V block it holds into its right
neighbour's other slot, computes its local queries against that block while
the copy flies, then waits for the block arriving from its left neighbour.
The fp32 online-softmax state never leaves VMEM between steps.

Kernel layout. The grid is ``(batch, kv_heads)``; one program runs a whole
ring for one kv head and the ``group`` query heads that share it (GQA: K/V
are never repeated, neither in HBM nor on the wire). Per program, VMEM holds

* K and V slots ``[2, len, head_dim]`` each: the block being computed on and
  the one being received;
* the carried state: the fp32 accumulator ``[group, len, head_dim]`` and the
  running max / sum as lane-dense rows ``[group, q_blocks, 1, block_q]`` (16x
  smaller than a lane-replicated ``[rows, 128]`` column per query row); each
  (step, q block) turns its rows into columns by a transpose and back;
* two ``[block_q, head_dim]`` buffers each for q and out: q stays in HBM and
  streams in block by block (the next block is fetched while one computes),
  out goes back block by block at the end.

That is about ``(4 * group + 4 * kv_itemsize) * len * head_dim`` bytes: 12 MiB
for 4096 bf16 tokens per shard, group 4, head_dim 128, inside v4's 16 MiB.

Inside a step the queries go block by block against the K/V slot, with the
same masked online softmax as ``flash_attention_tpu``. Causal: a block from
origin device ``j`` is fully visible if ``j < r``, masked at the diagonal if
``j == r`` (kv blocks past it skipped), skipped if ``j > r`` -- but still
forwarded.

Synchronisation. Device ``r`` writes into ``r + 1``'s VMEM, so it may only
start a send once ``r + 1`` is inside the kernel (the barrier semaphore, once,
before the first send) and has finished with the slot being overwritten (a
"ready" semaphore that ``r + 1`` signals to ``r`` at the end of every step
followed by a send, after its compute and its own send out of that slot are
done). Each send is matched by exactly one signal, so every semaphore is back
at zero when the kernel ends, and no device signals a neighbour that has
already left. Every grid axis is "arbitrary": all devices must walk the
programs in the same order for the rings to pair up (so on megacore chips,
v4 and v5p, one TensorCore does the work).

Lengths per shard that do not divide the blocks are padded; padded keys are
masked and padded query rows dropped. On a real TPU, keep ``block_q`` and
``block_k`` multiples of 128 (the defaults are, up to 512): ``block_k`` is the
lane dim of the score tile and ``block_q`` of the carried rows.

Gradients: ``jax.custom_vjp`` whose backward differentiates the unfused ring
``ring_attention_jnp`` (``lax.ppermute`` + one flash call + a merge of partials
per step). On a TPU those are the Mosaic flash kernels with their Pallas
backward, so memory stays O(block) per step; but the transfers are XLA's
collectives, not overlapped inside one kernel as in the forward -- there is no
fused backward kernel yet.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._mosaic_tpu import (
    LANES,
    SQUEEZED,
    SUBLANES,
    CompilerParams,
    DeviceIdType,
    interpret_params,
    out_struct,
    pad_axis,
    round_up,
    semaphore_signal,
    semaphore_wait,
)
from pallas_kernels.flash_attention import (
    _check_shapes,
    flash_attention_with_lse,
    merge_attention_partials,
)

# m and l of the block being computed are replicated across one vreg's lanes,
# as in flash_attention_tpu: full-width tiles avoid narrow-layout relayouts.
_DEFAULT_BLOCK = 512
# Remote writes into a neighbour's VMEM need a kernel-wide barrier semaphore,
# which XLA allocates per collective id.
_COLLECTIVE_ID = 0



@dataclasses.dataclass(frozen=True)
class _Config:
    """Static facts the kernel closes over (hashable: a custom_vjp nondiff arg)."""

    axis_name: str
    ring_size: int
    mesh_rank: int  # axes of the enclosing shard_map mesh
    ring_dim: int  # position of axis_name among them
    causal: bool
    sm_scale: float
    seq_len: int  # per shard, unpadded; keys at or past it are padding
    padded_len: int
    group: int
    block_q: int
    block_k: int
    interpret: object  # False, or the InterpretParams to run under

    @property
    def q_blocks(self):
        return self.padded_len // self.block_q

    @property
    def kv_blocks(self):
        return self.padded_len // self.block_k


def _row_to_column(row):
    """``[1, n]`` -> ``[n, 128]``, each row holding one entry across the lanes."""
    return jnp.transpose(jnp.broadcast_to(row, (LANES, row.shape[1])))


def _column_to_row(column):
    """``[n, 128]`` (lanes replicated) -> ``[1, n]``."""
    return jnp.transpose(column)[:1]


@dataclasses.dataclass(frozen=True)
class _Refs:
    """The refs of one program that the compute helpers share."""

    q_hbm: object  # [batch, q_heads, len, d] in HBM
    out_hbm: object  # same shape, written by DMA from out_buf
    lse: object  # [group, q_blocks, 1, block_q] output block
    k_buf: object  # [2, len, d]: slot computed on / slot being received
    v_buf: object
    q_buf: object  # [2, block_q, d]: q block computed on / next one arriving
    out_buf: object  # [2, block_q, d]: finished out blocks on their way to HBM
    acc: object  # [group, len, d] fp32 unnormalised output
    m: object  # [group, q_blocks, 1, block_q] running max, lane-dense
    l: object  # running sum, same layout
    m_blk: object  # [block_q, 128] m of the q block being computed
    l_blk: object
    q_sems: object  # DMA (2,), one per q_buf slot
    out_sems: object  # DMA (2,), one per out_buf slot


def _q_block_of(t, cfg):
    """Flat loop index -> (head within the group, q block)."""
    return lax.div(t, cfg.q_blocks), lax.rem(t, cfg.q_blocks)


def _rows(q_block, cfg):
    return pl.ds(pl.multiple_of(q_block * cfg.block_q, cfg.block_q), cfg.block_q)


def _attend_block(q, k, v, mask, acc_ref, refs: _Refs, cfg):
    """One online-softmax update of (m_blk, l_blk, acc) with one K/V block."""
    scores = lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    scores = scores * cfg.sm_scale
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    m_prev = refs.m_blk[...]
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    # A row with no visible key so far keeps m = -inf; shifting it by 0
    # instead gives exp(-inf) = 0 rather than exp(-inf + inf) = NaN.
    m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    probs = jnp.exp(scores - m_shift[:, :1])
    rescale = jnp.exp(m_prev - m_shift)
    refs.l_blk[...] = rescale * refs.l_blk[...] + jnp.sum(probs, axis=1, keepdims=True)
    refs.m_blk[...] = m_next
    pv = lax.dot_general(
        probs.astype(v.dtype),
        v,
        (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )
    acc_ref[...] = rescale[:, :1] * acc_ref[...] + pv


def _attend_slot(slot, shift, batch, kv_head, refs: _Refs, cfg: _Config):
    """All local queries against the K/V block in ``slot``, extending the state.

    ``shift`` is the causal shift of this block: 0 on the diagonal, the padded
    length for a block wholly in the past (every key visible). q blocks stream
    in from HBM two-deep: block ``t + 1`` is fetched while ``t`` computes
    (q stays in HBM so that long shards fit v4's 16 MiB of VMEM).
    """
    num_q_blocks = cfg.group * cfg.q_blocks

    def q_copy(t):
        head, q_block = _q_block_of(t, cfg)
        src = refs.q_hbm.at[batch, kv_head * cfg.group + head, _rows(q_block, cfg)]
        buf = lax.rem(t, 2)
        return pltpu.make_async_copy(src, refs.q_buf.at[buf], refs.q_sems.at[buf])

    q_copy(0).start()

    def q_block_body(t, carry):
        head, q_block = _q_block_of(t, cfg)
        q_start = q_block * cfg.block_q
        q_copy(t).wait()

        @pl.when(t + 1 < num_q_blocks)
        def _prefetch():
            q_copy(t + 1).start()

        q = refs.q_buf[lax.rem(t, 2)]
        acc = refs.acc.at[head, _rows(q_block, cfg), :]
        refs.m_blk[...] = _row_to_column(refs.m[head, q_block])
        refs.l_blk[...] = _row_to_column(refs.l[head, q_block])
        num_kv_blocks = cfg.kv_blocks
        if cfg.causal:
            last_row = q_start + cfg.block_q - 1 + shift
            num_kv_blocks = jnp.minimum(
                num_kv_blocks, lax.div(last_row, cfg.block_k) + 1
            )

        def kv_block_body(kv_block, carry):
            kv_start = pl.multiple_of(kv_block * cfg.block_k, cfg.block_k)
            k = refs.k_buf[slot, pl.ds(kv_start, cfg.block_k), :]
            v = refs.v_buf[slot, pl.ds(kv_start, cfg.block_k), :]
            shape = (cfg.block_q, cfg.block_k)
            cols = kv_start + lax.broadcasted_iota(jnp.int32, shape, 1)
            mask = None
            if cfg.causal:
                mask = (
                    cols <= q_start + lax.broadcasted_iota(jnp.int32, shape, 0) + shift
                )
            if cfg.padded_len != cfg.seq_len:
                in_range = cols < cfg.seq_len
                mask = in_range if mask is None else mask & in_range
            _attend_block(q, k, v, mask, acc, refs, cfg)
            return carry

        lax.fori_loop(0, num_kv_blocks, kv_block_body, 0)
        refs.m[head, q_block] = _column_to_row(refs.m_blk[...])
        refs.l[head, q_block] = _column_to_row(refs.l_blk[...])
        return carry

    lax.fori_loop(0, num_q_blocks, q_block_body, 0)


def _finalize(batch, kv_head, refs: _Refs, cfg: _Config):
    """Normalise the accumulator into ``out`` (via out_buf, by DMA) and write ``lse``."""
    num_q_blocks = cfg.group * cfg.q_blocks

    def out_copy(t):
        head, q_block = _q_block_of(t, cfg)
        dst = refs.out_hbm.at[batch, kv_head * cfg.group + head, _rows(q_block, cfg)]
        buf = lax.rem(t, 2)
        return pltpu.make_async_copy(refs.out_buf.at[buf], dst, refs.out_sems.at[buf])

    def body(t, carry):
        head, q_block = _q_block_of(t, cfg)
        l = refs.l[head, q_block]
        visible = l > 0  # -inf lse and a zero row for a query that saw no key
        safe_l = jnp.where(visible, l, 1.0)
        refs.lse[head, q_block] = jnp.where(
            visible, refs.m[head, q_block] + jnp.log(safe_l), -jnp.inf
        )
        inverse = _row_to_column(1.0 / safe_l)[:, :1]

        @pl.when(t >= 2)
        def _():
            out_copy(t - 2).wait()  # its buffer is about to be reused

        out = refs.acc[head, _rows(q_block, cfg), :] * inverse
        refs.out_buf[lax.rem(t, 2)] = out.astype(refs.out_buf.dtype)
        out_copy(t).start()
        return carry

    lax.fori_loop(0, num_q_blocks, body, 0)
    for t in range(max(0, num_q_blocks - 2), num_q_blocks):
        out_copy(t).wait()


def _ring_kernel(
    coords_ref,
    q_hbm,
    k_hbm,
    v_hbm,
    out_hbm,
    lse_ref,
    k_buf,
    v_buf,
    q_buf,
    out_buf,
    acc_ref,
    m_ref,
    l_ref,
    m_blk,
    l_blk,
    local_sems,
    q_sems,
    out_sems,
    send_sems,
    recv_sems,
    ready_sem,
    *,
    cfg: _Config,
):
    refs = _Refs(
        q_hbm,
        out_hbm,
        lse_ref,
        k_buf,
        v_buf,
        q_buf,
        out_buf,
        acc_ref,
        m_ref,
        l_ref,
        m_blk,
        l_blk,
        q_sems,
        out_sems,
    )
    batch, kv_head = pl.program_id(0), pl.program_id(1)
    first_program = (batch == 0) & (kv_head == 0)
    last_program = (batch == pl.num_programs(0) - 1) & (
        kv_head == pl.num_programs(1) - 1
    )
    n = cfg.ring_size
    # Neighbours are named by full mesh coordinates read from SMEM: a dict naming only the
    # ring axis makes Pallas fill in the other axes with in-kernel axis_index calls, which
    # Mosaic cannot lower under shard_map's varying-axes checks on a multi-axis mesh.
    coords = [coords_ref[i] for i in range(cfg.mesh_rank)]
    me = coords[cfg.ring_dim]

    def along_ring(position):
        return tuple(position if i == cfg.ring_dim else c for i, c in enumerate(coords))

    # lax.rem, not %: operands are >= 0, and floor-mod lowers to a sign fix-up.
    right = along_ring(lax.rem(me + 1, n))
    left = along_ring(lax.rem(me + n - 1, n))
    mesh_ids = DeviceIdType.MESH

    # This program's own K/V block goes into slot 0 (a local DMA from HBM).
    local_copies = [
        pltpu.make_async_copy(src.at[batch, kv_head], buf.at[0], local_sems.at[i])
        for i, (src, buf) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf)))
    ]
    for copy in local_copies:
        copy.start()
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    for copy in local_copies:
        copy.wait()

    if n > 1:
        # Tell the left neighbour we are inside the kernel: from now on it may
        # write into our slots. Waited for just before our own first send.
        @pl.when(first_program)
        def _announce():
            semaphore_signal(
                pltpu.get_barrier_semaphore(),
                1,
                device_id=left,
                device_id_type=mesh_ids,
            )

    def ring_step(step, carry):
        slot = lax.rem(step, 2)
        sends = [
            pltpu.make_async_remote_copy(
                buf.at[slot],
                buf.at[1 - slot],
                send_sems.at[i],
                recv_sems.at[i],
                device_id=right,
                device_id_type=mesh_ids,
            )
            for i, buf in enumerate((k_buf, v_buf))
        ]
        forwards = step < n - 1  # the last block of the ring goes nowhere

        @pl.when(forwards)
        def _send():
            @pl.when(first_program & (step == 0))
            def _():
                semaphore_wait(pltpu.get_barrier_semaphore(), 1)

            @pl.when(~first_program | (step > 0))
            def _():
                semaphore_wait(ready_sem, 1)

            for copy in sends:
                copy.start()

        # The block in `slot` started on device `origin`.
        origin = lax.rem(me - step + n, n)
        attend = functools.partial(
            _attend_slot, slot, batch=batch, kv_head=kv_head, refs=refs, cfg=cfg
        )
        if cfg.causal:
            shift = jnp.where(origin < me, cfg.padded_len, 0)
            pl.when(origin <= me)(lambda: attend(shift))
        else:
            attend(0)

        @pl.when(forwards)
        def _receive():
            for copy in sends:
                copy.wait_recv()  # the next block, from the left neighbour
                copy.wait_send()  # our slot has been read out

        if n > 1:
            # Both our slots are free again except the one just received: the
            # left neighbour's next send (if any) may overwrite the other.
            next_step_forwards = (step + 1 < n - 1) | ((step == n - 1) & ~last_program)

            @pl.when(next_step_forwards)
            def _ready():
                semaphore_signal(ready_sem, 1, device_id=left, device_id_type=mesh_ids)

        return carry

    lax.fori_loop(0, n, ring_step, 0)
    _finalize(batch, kv_head, refs, cfg)


def _vmem_bytes(cfg: _Config, head_dim, q_dtype, kv_dtype):
    """VMEM the kernel asks for (slots, state, q/out staging, score temporaries)."""
    q_item, kv_item = jnp.dtype(q_dtype).itemsize, jnp.dtype(kv_dtype).itemsize
    rows = cfg.group * cfg.padded_len
    slots = 2 * 2 * cfg.padded_len * head_dim * kv_item
    state = rows * head_dim * 4 + 3 * 2 * rows * SUBLANES * 4  # lse/m/l rows pad to 8
    staging = 2 * 2 * cfg.block_q * head_dim * q_item
    block = 2 * cfg.block_q * LANES * 4 + 4 * cfg.block_q * cfg.block_k * 4
    return slots + state + staging + block


def _forward(q, k, v, cfg: _Config):
    """Head-major padded inputs -> (out [b, hq, L, d], lse [b, hq, q_blocks, 1, block_q])."""
    batch, q_heads, _, head_dim = q.shape
    kv_heads = k.shape[1]
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    lse_spec = pl.BlockSpec(
        (SQUEEZED, cfg.group, cfg.q_blocks, 1, cfg.block_q),
        lambda b, h, index_ref: (b, h, 0, 0, 0),
    )
    row_state = pltpu.VMEM((cfg.group, cfg.q_blocks, 1, cfg.block_q), jnp.float32)
    column = pltpu.VMEM((cfg.block_q, LANES), jnp.float32)
    slots = pltpu.VMEM((2, cfg.padded_len, head_dim), k.dtype)
    staging = pltpu.VMEM((2, cfg.block_q, head_dim), q.dtype)
    dma_pair = pltpu.SemaphoreType.DMA((2,))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, kv_heads),
        in_specs=[hbm, hbm, hbm],
        out_specs=[hbm, lse_spec],
        scratch_shapes=[
            slots,  # K: the block computed on, the block arriving
            slots,  # V
            staging,  # q blocks
            staging,  # out blocks
            pltpu.VMEM(
                (cfg.group, cfg.padded_len, head_dim), jnp.float32
            ),  # accumulator
            row_state,  # running max m
            row_state,  # running sum l
            column,  # m of the q block being computed
            column,  # l of the q block being computed
            dma_pair,  # local HBM -> slot 0 copies (K, V)
            dma_pair,  # q block copies
            dma_pair,  # out block copies
            dma_pair,  # sends (K, V)
            dma_pair,  # receives (K, V)
            pltpu.SemaphoreType.REGULAR,  # "your next send may land", from the right
        ],
    )
    vmem = _vmem_bytes(cfg, head_dim, q.dtype, k.dtype)
    return pl.pallas_call(
        functools.partial(_ring_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[
            out_struct(q.shape, q.dtype, like=q),
            out_struct(
                (batch, q_heads, cfg.q_blocks, 1, cfg.block_q), jnp.float32, like=q
            ),
        ],
        compiler_params=CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary"),
            collective_id=_COLLECTIVE_ID,
            # Scoped VMEM defaults to 16-32 MiB; long shards need more.
            vmem_limit_bytes=max(32 << 20, int(vmem * 1.25) + (4 << 20)),
        ),
        interpret=cfg.interpret,
        name="ring_attention_tpu",
    )(_mesh_coords(), q, k, v)


def _mesh_coords():
    """This device's coordinate along every axis of the enclosing shard_map mesh, int32."""
    axes = jax.sharding.get_abstract_mesh().axis_names
    return jnp.stack([lax.axis_index(axis) for axis in axes]).astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ring_attention(q, k, v, cfg: _Config):
    """Model layout in, model layout out; transposes and pads around the kernel."""
    batch, seq_len, q_heads, _ = q.shape

    def head_major(x):
        return pad_axis(jnp.swapaxes(x, 1, 2), 2, cfg.padded_len)

    out, lse = _forward(head_major(q), head_major(k), head_major(v), cfg)
    lse = lse.reshape(batch, q_heads, cfg.padded_len)[:, :, :seq_len]
    return jnp.swapaxes(out[:, :, :seq_len], 1, 2), lse


def ring_attention_jnp(q, k, v, *, axis_name, causal=True, sm_scale=None, implementation=None):
    """The same ring unfused: ``ppermute`` K/V, one flash call per step, merge partials.

    Differentiable, and the fused kernel's backward. Each step is
    ``flash_attention_with_lse`` with that block's offsets and ``implementation``
    (None dispatches: the Mosaic TPU flash kernels, forward and backward, on a
    TPU; the dense reference on CPU), so on a TPU no step materialises scores.
    """
    n = lax.axis_size(axis_name)
    me = lax.axis_index(axis_name)
    seq_len = q.shape[1]
    rotate = [(i, (i + 1) % n) for i in range(n)]
    out = lse = None
    for step in range(n):
        origin = lax.rem(me - step + n, n)
        part = flash_attention_with_lse(
            q,
            k,
            v,
            causal=causal,
            sm_scale=sm_scale,
            q_offset=me * seq_len,
            kv_offset=origin * seq_len,
            implementation=implementation,
        )
        out, lse = part if out is None else merge_attention_partials(out, lse, *part)
        if step < n - 1:
            k, v = (
                lax.ppermute(k, axis_name, rotate),
                lax.ppermute(v, axis_name, rotate),
            )
    return out, lse


def _ring_attention_fwd(q, k, v, cfg):
    return _ring_attention(q, k, v, cfg), (q, k, v)


def _ring_attention_bwd(cfg, residuals, cotangents):
    ring = functools.partial(
        ring_attention_jnp,
        axis_name=cfg.axis_name,
        causal=cfg.causal,
        sm_scale=cfg.sm_scale,
        # This kernel runs only on a TPU (or its interpreter, in tests): so do the flash calls.
        implementation="pallas_tpu_interpret" if cfg.interpret else "pallas_tpu",
    )
    _, vjp = jax.vjp(ring, *residuals)
    return vjp(cotangents)


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def ring_attention_tpu(
    q,
    k,
    v,
    *,
    axis_name,
    causal=True,
    sm_scale=None,
    block_q=None,
    block_k=None,
    interpret=False,
):
    """Ring attention ``(out, lse)`` of the local query shard, in one Pallas TPU kernel.

    Call inside ``jax.shard_map`` over the 1-D ring axis ``axis_name``; q, k
    and v are this device's ``[batch, len, heads, head_dim]`` chunk (the same
    ``len`` for all three: device ``r`` holds tokens ``[r * len, (r+1) * len)``).
    ``interpret=True`` runs the kernel in the TPU interpreter with race
    detection (slow; for tests); an ``InterpretParams`` is used as given.
    ``block_q``/``block_k`` default to min(512, len rounded up to 128); they
    must be multiples of 8, and of 128 on a real TPU.
    """
    _check_shapes(q, k, v)
    seq_len, q_heads, head_dim = q.shape[1:]
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.shape[1] != seq_len:
        raise ValueError(
            f"ring attention needs equal local q and kv lengths, got {seq_len} and {k.shape[1]}"
        )
    default_block = min(_DEFAULT_BLOCK, round_up(seq_len, LANES))
    block_q = block_q or default_block
    block_k = block_k or default_block
    if block_q % SUBLANES or block_k % SUBLANES:
        raise ValueError(
            f"block_q={block_q} and block_k={block_k} must be multiples of {SUBLANES}"
        )
    if interpret is True:
        interpret = interpret_params()
    mesh_axes = tuple(jax.sharding.get_abstract_mesh().axis_names)
    if axis_name not in mesh_axes:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the enclosing shard_map mesh {mesh_axes}")
    cfg = _Config(
        axis_name=axis_name,
        ring_size=lax.axis_size(axis_name),
        mesh_rank=len(mesh_axes),
        ring_dim=mesh_axes.index(axis_name),
        causal=bool(causal),
        sm_scale=1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale),
        seq_len=seq_len,
        padded_len=round_up(seq_len, math.lcm(block_q, block_k)),
        group=q_heads // k.shape[2],
        block_q=block_q,
        block_k=block_k,
        interpret=interpret,
    )
    return _ring_attention(q, k, v, cfg)
