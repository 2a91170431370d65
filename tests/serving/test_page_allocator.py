"""The page allocator under random operation sequences, checked against a simulated device pool.

The simulated pool stores, in each slot, the whole token prefix the slot's KV would depend on
(a transformer's KV at position i depends on tokens 0..i). A sequence reading its pages must see
exactly its own prefixes: a wrong share, a missed copy-on-write or a page handed out twice shows
up as a foreign prefix.
"""

import copy
import random

import pytest

from serving.page_allocator import OutOfPages, PageAllocator


class SimulatedEngine:
    """Drives the allocator as the engine does and keeps a fake KV pool in step with it."""

    def __init__(self, alloc: PageAllocator):
        self.alloc = alloc
        self.pool = [[None] * alloc.page_size for _ in range(alloc.num_pages)]
        self.tokens: dict[str, list[int]] = {}  # every sequence's tokens so far (written ones)

    def write(self, seq_id, tokens):
        """Write KV for the next tokens (slots must be reserved) and commit them."""
        ps = self.alloc.page_size
        table = self.alloc.page_table(seq_id)
        seq = self.tokens[seq_id]
        for t in tokens:
            pos = len(seq)
            seq.append(t)
            self.pool[table[pos // ps]][pos % ps] = tuple(seq)
        self.alloc.commit(seq_id, tokens)

    def start(self, seq_id, prompt, cacheable_len=None, chunks=1, namespace=""):
        num_cached = self.alloc.allocate(seq_id, prompt, cacheable_len, namespace=namespace)
        self.tokens[seq_id] = list(prompt[:num_cached])
        rest = prompt[num_cached:]
        step = max(1, -(-len(rest) // chunks))
        for i in range(0, len(rest), step):
            self.write(seq_id, rest[i:i + step])
        return num_cached

    def decode(self, seq_id, token):
        for src, dst in self.alloc.append_slots(seq_id, 1):
            self.pool[dst] = list(self.pool[src])
        self.write(seq_id, [token])

    def fork(self, parent, child):
        self.alloc.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    def free(self, seq_id):
        self.alloc.free(seq_id)
        del self.tokens[seq_id]

    def check(self):
        alloc, ps = self.alloc, self.alloc.page_size
        refs = [0] * alloc.num_pages
        for seq_id, seq in self.tokens.items():
            table = alloc.page_table(seq_id)
            assert len(table) == -(-alloc.num_tokens(seq_id) // ps)
            assert alloc.num_committed(seq_id) == len(seq)
            for page in table:
                refs[page] += 1
            for pos in range(len(seq)):  # every written slot holds this sequence's own prefix
                assert self.pool[table[pos // ps]][pos % ps] == tuple(seq[:pos + 1]), (seq_id, pos)
        # Reference counts equal table occurrences; no page is both free and used.
        assert refs == alloc._refs
        free = list(alloc._free_plain) + list(alloc._evictable)
        assert len(free) == len(set(free)) == alloc.num_free
        assert all(refs[p] == 0 for p in free)
        assert alloc.num_used == sum(1 for r in refs if r > 0)
        assert alloc.num_shared == sum(1 for r in refs if r > 1)
        assert alloc.num_free + alloc.num_used == alloc.num_pages
        # Every cached key names a page holding that key.
        for key, page in alloc._cached.items():
            assert alloc._key_of[page] == key
        for page in alloc._evictable:
            assert alloc._cached[alloc._key_of[page]] == page


def observable(alloc):
    return copy.deepcopy((alloc._refs, alloc._key_of, alloc._cached, list(alloc._free_plain),
                          list(alloc._evictable), {k: vars(v) for k, v in alloc._seqs.items()}, alloc.stats()))


@pytest.mark.parametrize("seed", range(6))
def test_random_operation_sequences_keep_every_invariant(seed):
    rng = random.Random(seed)
    page_size = rng.choice([3, 4, 5])
    alloc = PageAllocator(num_pages=rng.randint(12, 30), page_size=page_size)
    eng = SimulatedEngine(alloc)
    # A few shared prefixes (system prompts), so that prefix hits and duplicates happen often.
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(1, 3 * page_size + 2))] for _ in range(3)]
    counter = 0
    failures = successes = 0
    for _ in range(400):
        op = rng.random()
        live = sorted(eng.tokens)
        before = observable(alloc)
        try:
            if op < 0.35 or not live:
                counter += 1
                prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(0, 2 * page_size))]
                if not prompt:
                    prompt = [rng.randrange(50)]
                cacheable = rng.choice([None, None, rng.randint(0, len(prompt))])
                num_cached = eng.start(f"s{counter}", prompt, cacheable, chunks=rng.randint(1, 3))
                assert num_cached % page_size == 0 and num_cached < len(prompt)
                if cacheable is not None:
                    assert num_cached <= cacheable
            elif op < 0.7:
                eng.decode(rng.choice(live), rng.randrange(50))
            elif op < 0.8:
                counter += 1
                eng.fork(rng.choice(live), f"s{counter}")
            else:
                eng.free(rng.choice(live))
            successes += 1
        except OutOfPages:
            failures += 1
            assert observable(alloc) == before  # a refused operation changes nothing
        eng.check()
    assert failures > 0 and successes > 100  # the pool was driven to exhaustion and back
    for seq_id in list(eng.tokens):
        eng.free(seq_id)
    assert alloc.num_free == alloc.num_pages and alloc.num_used == 0
    assert alloc.stats()["prefix_hit_tokens"] > 0


def test_prefix_hits_are_whole_pages_and_leave_the_last_token():
    alloc = PageAllocator(num_pages=16, page_size=4)
    eng = SimulatedEngine(alloc)
    system = [7, 3, 9, 1, 4, 4, 2, 8, 5]  # two full pages and one token
    assert eng.start("a", system + [11, 12]) == 0
    assert eng.start("b", system + [13]) == 8  # two shared pages
    assert alloc.page_table("a")[:2] == alloc.page_table("b")[:2]
    assert alloc.num_shared == 2
    # A prompt that is exactly the cached pages still recomputes its last token: one page short.
    assert eng.start("c", system[:8]) == 4
    # A different first page shares nothing, even though the second page's tokens match.
    assert eng.start("d", [0, 3, 9, 1] + system[4:]) == 0
    assert alloc.stats()["prefix_hit_tokens"] == 12
    # A page matches only after the same whole prefix: [5, 6, 7, 8] is cached behind [0, 3, 9, 1],
    # whose KV it depends on, so behind [7, 3, 9, 1] only the first page is shared.
    assert eng.start("f", system[:4] + [0, 3, 9, 1] + [5]) == 4
    assert eng.start("g", [0, 3, 9, 1] + system[4:]) == 8
    # cacheable_len (e.g. media at position 6) stops the sharing at the page before it.
    assert eng.start("e", system + [99], cacheable_len=6) == 4
    assert alloc.stats()["prefix_hit_tokens"] == 12 + 4 + 8 + 4
    eng.check()


def test_pages_past_the_cacheable_length_are_never_shared():
    alloc = PageAllocator(num_pages=16, page_size=4)
    eng = SimulatedEngine(alloc)
    prompt = list(range(20, 33))
    eng.start("media", prompt, cacheable_len=5)  # media from position 5: pages 1.. depend on embeddings
    eng.free("media")
    assert eng.start("text", prompt) == 4
    eng.check()


def test_pages_are_shared_only_within_a_namespace():
    # Equal tokens under other weights (a LoRA adapter, its base) have other KV: never shared across.
    alloc = PageAllocator(num_pages=16, page_size=4)
    eng = SimulatedEngine(alloc)
    prompt = list(range(40, 50))
    assert eng.start("base", prompt) == 0
    assert alloc.pages_needed(prompt, namespace="adapter#1") == 3
    assert eng.start("lora", prompt, namespace="adapter#1") == 0
    assert eng.start("lora-again", prompt, namespace="adapter#1") == 8
    assert eng.start("base-again", prompt) == 8
    assert set(alloc.page_table("lora-again")[:2]).isdisjoint(alloc.page_table("base-again")[:2])
    eng.check()


def test_copy_on_write_after_fork():
    alloc = PageAllocator(num_pages=8, page_size=4)
    eng = SimulatedEngine(alloc)
    eng.start("p", [5, 6, 7, 8, 9, 10])  # one full page, one page holding two tokens
    eng.fork("p", "c")
    assert alloc.page_table("p") == alloc.page_table("c") and alloc.num_shared == 2
    shared_tail = alloc.page_table("p")[1]
    copies = alloc.append_slots("c", 1)  # the child writes into the shared, partly filled page: copy it
    assert len(copies) == 1 and copies[0][0] == shared_tail
    assert alloc.page_table("c")[1] == copies[0][1] != shared_tail
    eng.pool[copies[0][1]] = list(eng.pool[shared_tail])
    eng.write("c", [42])
    assert alloc.append_slots("p", 1) == []  # the parent now owns the old page alone
    eng.write("p", [43])
    assert alloc.page_table("p")[0] == alloc.page_table("c")[0] and alloc.num_shared == 1
    eng.check()
    # A sequence whose slots are reserved but not yet written cannot be forked.
    alloc.append_slots("p", 2)
    with pytest.raises(ValueError, match="reserved slots"):
        alloc.fork("p", "c2")


def test_fork_at_a_page_boundary_copies_nothing():
    alloc = PageAllocator(num_pages=8, page_size=4)
    eng = SimulatedEngine(alloc)
    eng.start("p", [1, 2, 3, 4, 5, 6, 7, 8])
    eng.fork("p", "c")
    assert alloc.append_slots("c", 1) == [] and alloc.append_slots("p", 1) == []
    assert alloc.page_table("p")[2] != alloc.page_table("c")[2]


def test_out_of_pages_changes_nothing():
    alloc = PageAllocator(num_pages=4, page_size=4)
    eng = SimulatedEngine(alloc)
    eng.start("a", list(range(10)))  # 3 pages
    before = observable(alloc)
    with pytest.raises(OutOfPages):
        alloc.allocate("b", list(range(50, 59)))  # needs 3, 1 left
    with pytest.raises(OutOfPages):
        alloc.append_slots("a", 7)  # 10 + 7 tokens need 5 pages
    with pytest.raises(OutOfPages):
        alloc.allocate_raw("adapter", 2)
    assert observable(alloc) == before
    assert "b" not in alloc and alloc.pages_needed(list(range(50, 59))) == 3


def test_cached_pages_are_evicted_least_recently_used_first():
    alloc = PageAllocator(num_pages=6, page_size=2)
    eng = SimulatedEngine(alloc)
    old, new = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    eng.start("old", old)
    eng.free("old")
    eng.start("new", new)
    eng.free("new")
    assert alloc.num_free == 6 and alloc.num_cached == 4  # two full pages of each stay cached
    # Two plain free pages go first; then one more page must come from the cache: the oldest
    # sequence's deepest page (its tail is released first).
    eng.start("filler", [30, 31, 32, 33, 34])
    assert alloc.num_cached == 3
    assert alloc.pages_needed(new) == 3 - 2 + 2  # both cached pages of `new` still hit (and leave the free count)
    eng.free("filler")
    assert eng.start("new2", new) == 4
    assert eng.start("old2", old) == 2  # lost its second page
    eng.check()


def test_duplicate_pages_take_over_when_their_twin_is_evicted():
    alloc = PageAllocator(num_pages=8, page_size=2)
    eng = SimulatedEngine(alloc)
    prompt = [4, 5, 6, 7, 8]
    # Two equal prompts admitted before either is written: neither finds the other's pages.
    assert alloc.allocate("a", prompt) == 0 and alloc.allocate("b", prompt) == 0
    eng.tokens["a"], eng.tokens["b"] = [], []
    eng.write("a", prompt)
    eng.write("b", prompt)
    eng.check()
    eng.free("a")  # a's pages are the cached ones
    eng.start("c", [1, 1, 1, 1, 1, 1, 1])  # 4 pages: evicts both of a's cached pages
    eng.free("b")  # b's duplicates take over the keys
    assert eng.start("d", prompt) == 4
    eng.check()


def test_raw_pages_for_adapters_share_the_pool():
    alloc = PageAllocator(num_pages=6, page_size=4)
    pages = alloc.allocate_raw("lora:0", 4)
    assert len(set(pages)) == 4 and alloc.num_free == 2
    with pytest.raises(OutOfPages):
        alloc.allocate("s", list(range(9)))
    with pytest.raises(ValueError, match="raw pages"):
        alloc.append_slots("lora:0", 1)
    alloc.free("lora:0")
    assert alloc.num_free == 6


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(0, 4)
    alloc = PageAllocator(4, 4)
    with pytest.raises(ValueError, match="at least one"):
        alloc.allocate("s", [])
    alloc.allocate("s", [1, 2])
    with pytest.raises(ValueError, match="already"):
        alloc.allocate("s", [1, 2])
    with pytest.raises(ValueError, match="unknown"):
        alloc.free("nope")
    with pytest.raises(ValueError, match="overruns"):
        alloc.commit("s", [1, 2, 3])
