"""Adapters inside the KV page pool: the layout round-trips, ranks are not padded in memory, and pages
move between adapters and KV (S-LoRA's unified paging)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jvila.config import LLMConfig
from serving.adapters.columns import column_bucket, unit_size
from serving.adapters.paged_layout import MODULES, PoolGeometry, module_dims, stream_length
from serving.adapters.resident import ResidentAdapters
from serving.adapters.store import AdapterError, AdapterStore, StoredAdapter
from serving.adapters.working_set import WorkingSet
from serving.page_allocator import OutOfPages, PageAllocator

# hidden 24 and kv width 2 x 5 = 10: no row width or stream length divides a page (5 x 10 x 2 = 100 values).
CFG = LLMConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=5)
PAGE_SIZE = 5


def random_adapter(rng, rank, modules=MODULES, scale=None):
    dims = module_dims(CFG)
    layers = tuple({m: (rng.standard_normal((dims[m][0], rank)).astype(np.float32),
                        rng.standard_normal((rank, dims[m][1])).astype(np.float32)) for m in modules}
                   for _ in range(CFG.num_layers))
    return StoredAdapter(rank=rank, scale=float(rng.uniform(0.1, 2.0)) if scale is None else scale,
                         modules=tuple(modules), layers=layers)


class NumpyPool:
    """The per-layer K/V pools as the engine holds them, written by ResidentAdapters."""

    def __init__(self, num_pages):
        shape = (num_pages, PAGE_SIZE, CFG.num_kv_heads, CFG.head_dim)
        rng = np.random.default_rng(99)  # garbage everywhere: a gather that reads outside its pages shows
        self.k = [rng.standard_normal(shape).astype(np.float32) for _ in range(CFG.num_layers)]
        self.v = [rng.standard_normal(shape).astype(np.float32) for _ in range(CFG.num_layers)]

    def write(self, pages, values):
        # Page i holds values [2iE, 2iE + E) in K and the next E in V (E values per page half), zeros past the values.
        half = PAGE_SIZE * CFG.num_kv_heads * CFG.head_dim
        for layer in range(CFG.num_layers):
            for i, page in enumerate(pages):
                for pool, start in ((self.k, 2 * i * half), (self.v, (2 * i + 1) * half)):
                    page_values = np.zeros(half, np.float32)
                    chunk = values[layer][start: start + half]
                    page_values[: len(chunk)] = chunk
                    pool[layer][page] = page_values.reshape(pool[layer][page].shape)


def make_resident(num_pages):
    allocator = PageAllocator(num_pages, PAGE_SIZE)
    pool = NumpyPool(num_pages)
    geometry = PoolGeometry.of(CFG, PAGE_SIZE)
    return allocator, pool, ResidentAdapters(geometry, allocator, pool.write), geometry


def working_set(store, resident, geometry, pool, layout, dtype=None):
    return WorkingSet(store, resident, geometry, lambda: (tuple(map(jnp.asarray, pool.k)),
                                                          tuple(map(jnp.asarray, pool.v))), layout=layout, dtype=dtype)


def three_resident_adapters():
    rng = np.random.default_rng(0)
    store = AdapterStore(CFG, max_rank=64)
    specs = {"r3": (3, ("q_proj", "v_proj")), "r8": (8, MODULES), "r13": (13, ("o_proj", "down_proj", "k_proj"))}
    for name, (rank, modules) in specs.items():
        store.add(name, random_adapter(rng, rank, modules))
    allocator, pool, resident, geometry = make_resident(64)
    for name in ["r13", "r3", "r8"]:
        assert resident.ensure(name, store.get(name))
    return store, allocator, pool, resident, geometry


def test_slots_layout_returns_each_adapter_zero_padded_to_the_working_rank():
    store, _allocator, pool, resident, geometry = three_resident_adapters()
    batch = working_set(store, resident, geometry, pool, "slots").step_inputs(["r8", None, "r13", "r3", "r8"],
                                                                             [1, 2, 3, 1, 4])
    assert batch.names == ("r8", "r13", "r3")
    np.testing.assert_array_equal(batch.token_adapters, [0, -1, -1, 1, 1, 1, 2, 0, 0, 0, 0])
    lora = batch.weights
    assert lora.max_rank == 16 and lora.num_adapters == 4  # 3 slots → 4, rank 13 → 16
    assert set(lora.layers[0]) == set(MODULES)
    for layer in range(CFG.num_layers):
        for m in MODULES:
            a, b = (np.asarray(x) for x in lora.layers[layer][m])
            for slot, name in enumerate(batch.names):
                adapter = store.get(name)
                want_a = np.zeros((geometry.dims[m][0], 16), np.float32)
                want_b = np.zeros((16, geometry.dims[m][1]), np.float32)
                if m in adapter.modules:
                    want_a[:, : adapter.rank], want_b[: adapter.rank] = adapter.layers[layer][m]
                # Exact: the values are copied, never computed on.
                np.testing.assert_array_equal(a[slot], want_a)
                np.testing.assert_array_equal(b[slot], want_b)
            assert not np.any(a[3]) and not np.any(b[3])  # the padded slot
    np.testing.assert_allclose(np.asarray(lora.scales)[:3], [store.get(n).scale for n in batch.names])


def test_columns_layout_puts_each_adapter_at_its_own_rank_side_by_side():
    store, _allocator, pool, resident, geometry = three_resident_adapters()
    assert unit_size(geometry) == 2  # half page 50, row widths 34/44/64: units never straddle a page half
    batch = working_set(store, resident, geometry, pool, "columns").step_inputs(["r13", "r3", None, "r8"],
                                                                               [2, 1, 1, 3])
    np.testing.assert_array_equal(batch.token_adapters, [0, 0, 1, -1, 2, 2, 2])
    lora = batch.weights
    assert lora.num_columns == 24  # ranks 13 + 3 + 8 = 24: no column of padding
    assert lora.num_adapters == 24  # the index bound is the column count: one compilation per column bucket
    owner = np.repeat([0, 1, 2], [13, 3, 8])
    np.testing.assert_array_equal(np.asarray(lora.column_adapters), owner)
    np.testing.assert_allclose(np.asarray(lora.column_scales), [store.get(batch.names[i]).scale for i in owner])
    for layer in range(CFG.num_layers):
        for m in MODULES:
            a, b = (np.asarray(x) for x in lora.layers[layer][m])
            want_a = np.zeros((geometry.dims[m][0], 24), np.float32)
            want_b = np.zeros((24, geometry.dims[m][1]), np.float32)
            start = 0
            for name in batch.names:
                adapter = store.get(name)
                if m in adapter.modules:
                    want_a[:, start: start + adapter.rank], want_b[start: start + adapter.rank] = \
                        adapter.layers[layer][m]
                start += adapter.rank
            np.testing.assert_array_equal(a, want_a.T)  # exact: copied out of the garbage-filled pool (a is Aᵀ)
            np.testing.assert_array_equal(b, want_b)
    # Padding columns (a total rank off the column buckets) are zero and belong to no adapter.
    padded = working_set(store, resident, geometry, pool, "columns").step_inputs(["r3", "r8"], [1, 1]).weights
    assert padded.num_columns == 12 == column_bucket(11)
    assert column_bucket(17) == 24 and column_bucket(25) == 32 and column_bucket(33) == 48
    np.testing.assert_array_equal(np.asarray(padded.column_adapters), np.repeat([0, 1, -1], [3, 8, 1]))
    for m in MODULES:
        assert not np.any(np.asarray(padded.layers[0][m].a)[11]) and not np.any(np.asarray(padded.layers[0][m].b)[11])


def test_working_set_is_kept_while_it_covers_the_step_and_reread_after_a_reload():
    store, allocator, pool, resident, geometry = three_resident_adapters()
    ws = working_set(store, resident, geometry, pool, "columns")
    first = ws.step_inputs(["r13", "r3"], [4, 1])
    assert ws.counts["working_set_builds"] == 1 and first.weights.num_columns == 16
    # The same adapters, another order, or fewer of them within the same column bucket: the kept copy,
    # indices as it has them.
    again = ws.step_inputs(["r3", None, "r13"], [1, 1, 1])
    assert again.weights is first.weights and ws.counts["working_set_builds"] == 1
    np.testing.assert_array_equal(again.token_adapters, [1, -1, 0])
    assert ws.step_inputs(["r13"], [2]).weights is first.weights
    # A column bucket fewer (rank 3 alone: 8 columns): laid out again, r3 copied from the kept set, not re-read.
    alone = ws.step_inputs(["r3"], [2])
    assert alone.weights.num_columns == 8
    assert ws.counts == {"working_set_builds": 1, "working_set_additions": 0, "working_set_relayouts": 1}
    columns_of(alone.weights, {"r3": 0}, store, ["r3"])
    # A bucket more (r13 back: 16 columns): laid out again, only r13 read from the pool.
    third = ws.step_inputs(["r13", "r3"], [1, 1])
    assert ws.counts["working_set_relayouts"] == 2 and ws.counts["working_set_builds"] == 1
    columns_of(third.weights, {"r13": 0, "r3": 1}, store, ["r13", "r3"])
    # r13 evicted, other values written into its pages, and r13 loaded again: its new pages are re-read.
    resident.drop("r13")
    pages = allocator.allocate_raw("other", 8)
    pool.write(pages, np.full((CFG.num_layers, 8 * 2 * PAGE_SIZE * CFG.num_kv_heads * CFG.head_dim), 7.0))
    allocator.free("other")
    assert resident.ensure("r13", store.get("r13"))
    fourth = ws.step_inputs(["r13", "r3"], [1, 1])
    # The new load is read into the columns its old load held (the kept set stays, r3 included).
    assert ws.counts == {"working_set_builds": 1, "working_set_additions": 1, "working_set_relayouts": 2}
    columns_of(fourth.weights, dict(zip(["r13", "r3"], map(int, fourth.token_adapters))), store, ["r13", "r3"])
    # A module the set lacks (r8 targets the MLP; the set holds r13's and r3's modules only): built anew.
    ws.step_inputs(["r3"], [1])
    assert ws.step_inputs(["r8", "r3"], [1, 1]).weights.layers[0].keys() == set(MODULES)
    assert ws.counts["working_set_builds"] == 2


def columns_of(weights, name_index, store, names, dtype=np.float32):
    """Each adapter's (a, b) per layer and module as the columns hold them, checked against the store (in
    `dtype`: the store's float32 values rounded to it)."""
    owner = np.asarray(weights.column_adapters)
    scales = np.asarray(weights.column_scales)
    for name in names:
        adapter, cols = store.get(name), np.flatnonzero(owner == name_index[name])
        assert len(cols) == adapter.rank and np.all(np.diff(cols) == 1)  # its own rank, side by side
        np.testing.assert_allclose(scales[cols], adapter.scale)
        for layer in range(CFG.num_layers):
            for m, pair in weights.layers[layer].items():
                assert pair.a.dtype == pair.b.dtype == dtype
                a, b = np.asarray(pair.a)[cols].T, np.asarray(pair.b)[cols]
                if m in adapter.modules:  # exact: copied out of the garbage-filled pool
                    np.testing.assert_array_equal(a, np.asarray(jnp.asarray(adapter.layers[layer][m][0], dtype)))
                    np.testing.assert_array_equal(b, np.asarray(jnp.asarray(adapter.layers[layer][m][1], dtype)))
                else:
                    assert not np.any(a) and not np.any(b)


def test_adapters_joining_a_kept_set_are_read_into_its_free_columns_alone():
    rng = np.random.default_rng(3)
    store = AdapterStore(CFG, max_rank=64)
    modules = {"d2": ("q_proj", "up_proj"), "g3": ("q_proj",)}  # the others target every module
    names = ["a9", "b4", "c5", "d2", "e6", "f20", "g3", "p21"]
    for name in names:
        store.add(name, random_adapter(rng, int(name[1:]), modules.get(name, MODULES)))
    _allocator, pool, resident, geometry = make_resident(256)
    for name in names:
        assert resident.ensure(name, store.get(name))
    ws = working_set(store, resident, geometry, pool, "columns")
    first = ws.step_inputs(["a9", "b4", "c5"], [1, 1, 1])  # 18 columns of 24
    assert first.weights.num_columns == 24 and ws.counts["working_set_builds"] == 1
    # b4 has left and d2, e6 join: d2 into b4's columns (first fit; zeros where b4 had values in the modules
    # d2 lacks), e6 into the padding; b4 leaves the set whole.
    second = ws.step_inputs(["c5", "d2", "a9", "e6"], [1, 2, 1, 1])
    assert ws.counts == {"working_set_builds": 1, "working_set_additions": 1, "working_set_relayouts": 0}
    index = {name: int(second.token_adapters[pos]) for name, pos in [("c5", 0), ("d2", 1), ("a9", 3), ("e6", 4)]}
    columns_of(second.weights, index, store, ["a9", "c5", "d2", "e6"])
    owner = np.asarray(second.weights.column_adapters)
    assert list(np.flatnonzero(owner == index["d2"])) == [9, 10] and owner[11] == owner[12] == -1
    assert list(np.flatnonzero(owner == index["e6"])) == list(range(18, 24))
    # f20 takes the set past its bucket (29 columns: 32): laid out again, a9 copied and f20 read.
    third = ws.step_inputs(["f20", "a9"], [1, 1])
    assert ws.counts == {"working_set_builds": 1, "working_set_additions": 1, "working_set_relayouts": 1}
    assert third.weights.num_columns == 32
    columns_of(third.weights, {"f20": int(third.token_adapters[0]), "a9": int(third.token_adapters[1])}, store,
               ["f20", "a9"])
    fourth = ws.step_inputs(["g3", "f20", "a9"], [1, 1, 1])  # into the last three columns
    assert ws.counts == {"working_set_builds": 1, "working_set_additions": 2, "working_set_relayouts": 1}
    columns_of(fourth.weights, dict(zip(["g3", "f20", "a9"], map(int, fourth.token_adapters))), store,
               ["g3", "f20", "a9"])
    # p21 beside a9 (30 columns: the same bucket), but a9 sits at 20..28 and splits the free columns: laid out again.
    fifth = ws.step_inputs(["a9", "p21"], [1, 1])
    assert ws.counts == {"working_set_builds": 1, "working_set_additions": 2, "working_set_relayouts": 2}
    columns_of(fifth.weights, {"a9": 0, "p21": 1}, store, ["a9", "p21"])


@pytest.mark.parametrize("layout", ["columns", "slots"])
def test_a_bfloat16_working_set_holds_the_pools_values_rounded_through_additions_and_relayouts(layout):
    store, _allocator, pool, resident, geometry = three_resident_adapters()
    ws = working_set(store, resident, geometry, pool, layout, dtype=jnp.bfloat16)
    # Columns: built, added to (r3 over r8's columns), laid out again (24 columns), added to, laid out again (8).
    steps = [["r8"], ["r3"], ["r8", "r13"], ["r13", "r8", "r3"], ["r3"]]
    for names in steps:
        batch = ws.step_inputs(names, [1] * len(names))
        index = dict(zip(names, map(int, batch.token_adapters)))
        if layout == "columns":
            columns_of(batch.weights, index, store, names, dtype=jnp.bfloat16)
            continue
        for name in names:
            adapter = store.get(name)
            for layer in range(CFG.num_layers):
                for m in adapter.modules:
                    pair = batch.weights.layers[layer][m]
                    assert pair.a.dtype == pair.b.dtype == jnp.bfloat16
                    a, b = (jnp.asarray(w, jnp.bfloat16) for w in adapter.layers[layer][m])
                    np.testing.assert_array_equal(pair.a[index[name], :, : adapter.rank], a)
                    np.testing.assert_array_equal(pair.b[index[name], : adapter.rank], b)
    if layout == "columns":
        assert ws.counts == {"working_set_builds": 1, "working_set_additions": 2, "working_set_relayouts": 2}


def test_pages_follow_rank_not_the_largest_rank():
    geometry = PoolGeometry.of(CFG, PAGE_SIZE)
    row = sum(a + b for a, b in module_dims(CFG).values())
    per_page = 2 * PAGE_SIZE * CFG.num_kv_heads * CFG.head_dim
    for rank in (1, 8, 13, 64):
        assert geometry.pages_for(rank, MODULES) == -(-rank * row // per_page)
    q, v = module_dims(CFG)["q_proj"], module_dims(CFG)["v_proj"]
    assert geometry.pages_for(8, ("q_proj", "v_proj")) == -(-8 * (sum(q) + sum(v)) // per_page)
    assert geometry.pages_for(64, MODULES) > 6 * geometry.pages_for(8, MODULES)


def test_the_store_keeps_each_adapter_as_its_page_values_with_layers_viewing_them():
    """A checked adapter's weights are one stream [layers, values] in the pool's order (rank rows [A[:, j], B[j, :]]
    per module, canonical module order), its layers views into it: a load copies the stream as it is."""
    rng = np.random.default_rng(4)
    store = AdapterStore(CFG, max_rank=64)
    given = random_adapter(rng, 5, ("v_proj", "q_proj", "down_proj"))
    store.add("a", given)
    kept = store.get("a")
    dims = module_dims(CFG)
    values = 5 * sum(sum(dims[m]) for m in kept.modules)
    assert kept.stream.shape == (CFG.num_layers, stream_length(values)) and stream_length(values) >= values
    assert stream_length(values) < 4 * values / 3 + 1  # two sizes per doubling
    for layer in range(CFG.num_layers):
        offset = 0
        for m in ("q_proj", "v_proj", "down_proj"):
            a, b = given.layers[layer][m]
            rows = np.concatenate([a.T, b], axis=1)  # rank rows
            np.testing.assert_array_equal(kept.stream[layer, offset: offset + rows.size], rows.reshape(-1))
            offset += rows.size
            np.testing.assert_array_equal(kept.layers[layer][m][0], a)
            np.testing.assert_array_equal(kept.layers[layer][m][1], b)
            assert all(np.shares_memory(w, kept.stream) for w in kept.layers[layer][m])
        assert not np.any(kept.stream[layer, offset:])
    np.testing.assert_array_equal(given.values(dims), kept.stream)  # an unchecked adapter packs on demand
    store.add("b", kept)  # checked before: shares the stream (a thousand names over a few weights stay small)
    assert store.get("b").stream is kept.stream


def test_loading_adapters_takes_kv_pages_and_eviction_gives_them_back():
    rng = np.random.default_rng(1)
    allocator, _pool, resident, geometry = make_resident(100)
    adapters = {f"a{i}": random_adapter(rng, 8) for i in range(3)}
    need = geometry.pages_for(8, MODULES)
    for i, (name, adapter) in enumerate(adapters.items()):
        assert resident.ensure(name, adapter)
        assert allocator.num_free == 100 - (i + 1) * need
    # A prompt that needs more pages than remain: OutOfPages until idle adapters are evicted.
    prompt = list(rng.integers(0, 50, (100 - need) * PAGE_SIZE))
    with pytest.raises(OutOfPages):
        allocator.allocate("seq", prompt)
    resident.acquire("a1")  # in use: never evicted
    freed = resident.evict_idle(allocator.pages_needed(prompt))
    assert freed == 2 * need and "a1" in resident and "a0" not in resident and "a2" not in resident
    allocator.allocate("seq", prompt)
    assert allocator.num_free == 0
    # No room for another adapter while KV holds the pool; once freed, it loads again.
    assert not resident.ensure("a0", adapters["a0"])
    allocator.free("seq")
    assert resident.ensure("a0", adapters["a0"]) and allocator.num_free == 100 - 2 * need
    with pytest.raises(ValueError, match="running"):
        resident.drop("a1")
    resident.release("a1")
    assert resident.drop("a1") == need and allocator.num_free == 100 - need


def test_least_recently_used_idle_adapter_goes_first():
    rng = np.random.default_rng(2)
    _allocator, _pool, resident, _geometry = make_resident(3 * geometry_pages(8) + 1)
    adapters = {n: random_adapter(rng, 8) for n in "abcd"}
    for n in "abc":
        assert resident.ensure(n, adapters[n])
    resident.ensure("a", adapters["a"])  # touched: b is now the oldest
    assert resident.ensure("d", adapters["d"])
    assert "b" not in resident and {"a", "c", "d"} <= set(resident._pages)


def geometry_pages(rank):
    return PoolGeometry.of(CFG, PAGE_SIZE).pages_for(rank, MODULES)


def test_store_refuses_adapters_that_do_not_fit(tmp_path):
    rng = np.random.default_rng(3)
    store = AdapterStore(CFG, max_rank=16, root=str(tmp_path), reader=lambda path, cfg: random_adapter(rng, 4))
    with pytest.raises(AdapterError, match="rank 32"):
        store.add("big", random_adapter(rng, 32))
    bad = random_adapter(rng, 4)
    layers = list(bad.layers)
    layers[1] = dict(layers[1], q_proj=(layers[1]["q_proj"][0][:-1], layers[1]["q_proj"][1]))
    with pytest.raises(AdapterError, match="layer 1 q_proj"):
        store.add("bad", StoredAdapter(4, 1.0, bad.modules, tuple(layers)))
    with pytest.raises(AdapterError, match="unknown LoRA target"):
        store.add("bad", StoredAdapter(4, 1.0, ("lm_head",), ({"lm_head": None},) * 2))
    with pytest.raises(AdapterError, match="layers"):
        store.add("bad", StoredAdapter(4, 1.0, bad.modules, bad.layers[:1]))
    with pytest.raises(AdapterError, match="outside the adapter root"):
        store.read(str(tmp_path / ".." / "elsewhere"))
    with pytest.raises(AdapterError, match="not a directory"):
        store.read("missing")
    (tmp_path / "ok").mkdir()
    store.add("ok", store.read("ok"))
    with pytest.raises(AdapterError, match="already loaded"):
        store.add("ok", random_adapter(rng, 4))
    assert store.names == ["ok"]


def test_an_adapter_that_would_leave_no_room_for_a_sequence_is_refused():
    from serving.adapters.engine_adapters import EngineAdapters

    rng = np.random.default_rng(4)
    allocator, pool, _, geometry = make_resident(100)
    store = AdapterStore(CFG, max_rank=64)
    adapters = EngineAdapters(store, allocator, pool.write, page_size=PAGE_SIZE, sequence_pages=60)
    small, big = random_adapter(rng, 8), random_adapter(rng, 16)
    assert geometry.pages_for(8, MODULES) + 60 <= 100 < geometry.pages_for(16, MODULES) + 60
    adapters.add("small", small)
    with pytest.raises(AdapterError, match="full-context sequence"):
        adapters.add("big", big)
    assert store.names == ["small"]
    store.add("big", big)  # a store holding it already: refused when the engine side is built
    with pytest.raises(AdapterError, match="'big'"):
        EngineAdapters(store, allocator, pool.write, page_size=PAGE_SIZE, sequence_pages=60)


def test_engine_keeps_room_for_a_full_sequence_beside_the_largest_adapter():
    from flax import nnx

    from jvila.models.llm import LLM
    from serving.engine import Engine

    graphdef, state = nnx.split(LLM(CFG, rngs=nnx.Rngs(0)))
    largest = PoolGeometry.of(CFG, PAGE_SIZE).largest_adapter_pages(16)
    store = AdapterStore(CFG, max_rank=16)
    engine = Engine(graphdef, state, num_pages=largest + 10, page_size=PAGE_SIZE, adapters=store)
    assert engine.max_context == 10 * PAGE_SIZE  # the default context shrinks to what the adapter leaves
    with pytest.raises(ValueError, match="max_context"):
        Engine(graphdef, state, num_pages=largest + 10, page_size=PAGE_SIZE, adapters=store,
               max_context=11 * PAGE_SIZE)
    with pytest.raises(ValueError, match="cannot hold an adapter of rank 16"):
        Engine(graphdef, state, num_pages=largest, page_size=PAGE_SIZE, adapters=store)


def test_admission_evicts_idle_adapters_for_kv_and_prefetch_keeps_a_reserve():
    from serving.adapters.engine_adapters import PREFETCH_FREE_SHARE, EngineAdapters
    from serving.request import Request

    rng = np.random.default_rng(5)
    allocator, pool, _, geometry = make_resident(200)
    store = AdapterStore(CFG, max_rank=64)
    adapters = EngineAdapters(store, allocator, pool.write, page_size=PAGE_SIZE)
    for i in range(6):
        adapters.add(f"a{i}", random_adapter(rng, 8))
    need = geometry.pages_for(8, MODULES)
    requests = [Request(f"r{i}", [1, 2, 3], adapter=f"a{i}") for i in range(6)]
    # Prefetch loads queued requests' adapters in order while free pages stay above the reserve.
    adapters.prefetch(requests)
    loaded = sum(f"a{i}" in adapters.resident for i in range(6))
    assert loaded == int((200 - PREFETCH_FREE_SHARE * 200) // need)
    assert all(f"a{i}" in adapters.resident for i in range(loaded))
    assert allocator.num_free >= PREFETCH_FREE_SHARE * 200
    # Admitting r0 uses its prefetched adapter; a KV allocation larger than the free pages evicts idle ones.
    prompt = list(rng.integers(0, 50, (200 - need) * PAGE_SIZE))
    assert adapters.admit(requests[0], lambda: allocator.allocate("r0", prompt), allocator.pages_needed(prompt))
    assert "a0" in adapters.resident and adapters.resident.num_pages == need
    assert adapters.resident.counts["adapter_loads"] == loaded  # nothing was loaded twice
    # No room left for r1's adapter: not admitted, nothing changed.
    assert not adapters.admit(requests[1], lambda: allocator.allocate("r1", [1]), 1)
    assert "r1" not in allocator
    adapters.release(requests[0])
    allocator.free("r0")
    assert adapters.admit(requests[1], lambda: allocator.allocate("r1", [1]), 1)
