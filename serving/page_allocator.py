"""Host-side bookkeeping of the KV page pool: page tables, reference counts, prefix sharing.

The device pools (per layer, [num_pages, page_size, kv_heads, head_dim]) belong to the engine;
this class only decides which page holds which tokens. Token t of a sequence lives in page
`page_table(seq)[t // page_size]` at slot `t % page_size`, the layout of `jvila.models.kv_cache`.

Prefix sharing. Once every slot of a page holds written KV (`commit`), the page gets a key: a
SHA-256 digest chained over the page-sized chunks of the sequence's tokens (digest of the
previous page's key and this page's token ids), so a key names the whole prefix, not just the
page's own tokens. A later prompt whose leading full pages have the same keys takes those pages
(reference count + 1) instead of fresh ones and skips recomputing them. A cryptographic digest
rather than Python's `hash`: clients of a shared server choose their token ids, and colliding
tuple hashes would let one client read another's KV.

Freed pages that carry a key stay cached: they count as free and are handed out again, least
recently used first, only when no never-used or plain free page is left. A sequence's pages are
released tail first so that, among the pages one sequence leaves behind, the deepest (least
likely to be shared) are evicted first.

Copy-on-write. `fork` makes a child share every page of its parent. A page is written only at
slots past the sequence's committed tokens, so only a shared, partially filled last page ever
needs copying: `append_slots` replaces it by a fresh copy and returns (src, dst) for the engine to
copy on the device pools before the next step.

Every method either succeeds or raises before changing anything (OutOfPages, ValueError).

The same pool can later hold LoRA adapter weights (S-LoRA's unified paging): `allocate_raw`
hands an owner plain pages that are released by `free` like a sequence's.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np


class OutOfPages(RuntimeError):
    """Not enough free pages; the allocator is unchanged."""


_ROOT_KEY = b"jvila-page-prefix-root"


def _page_key(parent_key: bytes, tokens) -> bytes:
    """The key of a full page: a digest of the previous page's key and this page's token ids."""
    return hashlib.sha256(parent_key + np.asarray(tokens, dtype=np.int64).tobytes()).digest()


def _root_key(namespace: str) -> bytes:
    """Where a sequence's key chain starts. Equal tokens under different weights (a LoRA adapter
    and its base model) have different KV, so each namespace chains from its own root."""
    return _ROOT_KEY if not namespace else hashlib.sha256(_ROOT_KEY + namespace.encode()).digest()


@dataclasses.dataclass
class _Sequence:
    pages: list[int]
    num_tokens: int  # slots reserved (written or about to be)
    committed: list[int]  # token ids whose KV is written, in order
    keys: list[bytes]  # keys of the leading full committed pages that may be shared
    cacheable_len: int | None  # no page reaching past this many tokens is ever shared (media)
    root: bytes = _ROOT_KEY  # its namespace's chain root (see _root_key)
    raw: bool = False  # pages handed out by allocate_raw: no tokens, no sharing


class PageAllocator:
    """Pages of one shared pool, handed to sequences and shared between identical prefixes."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be at least 1, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._refs = [0] * num_pages
        self._key_of: list[bytes | None] = [None] * num_pages  # set once the page is full and shareable
        self._cached: dict[bytes, int] = {}  # key -> the page that prefix lookups hand out
        self._free_plain: collections.deque[int] = collections.deque(range(num_pages))  # unreferenced, no key
        # Unreferenced pages that keep a key, least recently used first.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._seqs: dict[str, _Sequence] = {}
        self._prefix_hit_tokens = 0
        self._prefix_lookup_tokens = 0

    # ---- counts --------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Pages no sequence references (cached ones included: they are evicted when needed)."""
        return len(self._free_plain) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_shared(self) -> int:
        return sum(1 for r in self._refs if r > 1)

    @property
    def num_cached(self) -> int:
        """Unreferenced pages that still hold a shareable prefix."""
        return len(self._evictable)

    def stats(self) -> dict:
        return {
            "pages_total": self.num_pages,
            "pages_used": self.num_used,
            "pages_shared": self.num_shared,
            "pages_cached": self.num_cached,
            "pages_free": self.num_free,
            "prefix_hit_tokens": self._prefix_hit_tokens,
            "prefix_lookup_tokens": self._prefix_lookup_tokens,
            "sequences": len(self._seqs),
        }

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def page_table(self, seq_id: str) -> list[int]:
        return list(self._seq(seq_id).pages)

    def num_tokens(self, seq_id: str) -> int:
        """Token slots reserved for the sequence (its pages hold this many, the last one maybe partly)."""
        return self._seq(seq_id).num_tokens

    def num_committed(self, seq_id: str) -> int:
        return len(self._seq(seq_id).committed)

    # ---- planning without changing anything ----------------------------------------------------

    def pages_needed(self, prompt_ids, cacheable_len: int | None = None, namespace: str = "") -> int:
        """Fresh pages `allocate(..., prompt_ids, cacheable_len, namespace)` would take from the free count now."""
        hits = self._prefix_hits(prompt_ids, cacheable_len, _root_key(namespace))
        revived = sum(1 for p in hits if self._refs[p] == 0)  # cached pages leave the free count too
        return self._pages_for(len(prompt_ids)) - len(hits) + revived

    def pages_to_append(self, seq_id: str, n: int) -> int:
        """Fresh pages `append_slots(seq_id, n)` would take (copy-on-write included)."""
        seq = self._seq(seq_id)
        return self._pages_for(seq.num_tokens + n) - len(seq.pages) + int(self._needs_copy(seq, n))

    # ---- sequences -----------------------------------------------------------------------------

    def allocate(self, seq_id: str, prompt_ids, cacheable_len: int | None = None, namespace: str = "") -> int:
        """Reserve pages for the whole prompt, sharing cached full pages of the same prefix.

        Returns how many leading prompt tokens already have valid KV: a multiple of page_size and
        always less than len(prompt_ids), so the last prompt token is recomputed for its logits.
        cacheable_len (default: all) stops sharing, both ways, at that many tokens (e.g. the first
        media position, whose KV depends on embeddings, not on token ids).
        namespace: pages are shared only between sequences of the same namespace (the weights that
        computed them: "" for the base model, an adapter's name for its requests).
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already holds pages")
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if cacheable_len is not None and cacheable_len < 0:
            raise ValueError(f"cacheable_len must be non-negative, got {cacheable_len}")
        root = _root_key(namespace)
        hits = self._prefix_hits(prompt_ids, cacheable_len, root)
        fresh = self._pages_for(len(prompt_ids)) - len(hits)
        revived = sum(1 for p in hits if self._refs[p] == 0)
        if fresh + revived > self.num_free:
            raise OutOfPages(f"prompt of {len(prompt_ids)} tokens needs {fresh + revived} free pages, "
                             f"{self.num_free} left")
        keys = []
        for page in hits:
            self._incref(page)
            keys.append(self._key_of[page])
        pages = list(hits) + [self._take_fresh_page() for _ in range(fresh)]
        num_cached = len(hits) * self.page_size
        self._seqs[seq_id] = _Sequence(pages=pages, num_tokens=len(prompt_ids), committed=prompt_ids[:num_cached],
                                       keys=keys, cacheable_len=cacheable_len, root=root)
        self._prefix_hit_tokens += num_cached
        self._prefix_lookup_tokens += len(prompt_ids)
        return num_cached

    def append_slots(self, seq_id: str, n: int) -> list[tuple[int, int]]:
        """Make room for n more tokens; the (src, dst) page copies to make on device before writing."""
        if n < 0:
            raise ValueError(f"cannot append {n} slots")
        seq = self._seq(seq_id)
        if seq.raw:
            raise ValueError(f"{seq_id!r} holds raw pages, not tokens")
        needed = self.pages_to_append(seq_id, n)
        if needed > self.num_free:
            raise OutOfPages(f"{n} more tokens for {seq_id!r} need {needed} free pages, {self.num_free} left")
        copies = []
        if self._needs_copy(seq, n):
            src = seq.pages[-1]
            dst = self._take_fresh_page()
            self._decref(src)
            seq.pages[-1] = dst
            copies.append((src, dst))
        for _ in range(self._pages_for(seq.num_tokens + n) - len(seq.pages)):
            seq.pages.append(self._take_fresh_page())
        seq.num_tokens += n
        return copies

    def commit(self, seq_id: str, token_ids) -> None:
        """Record that the KV of these next tokens is written; pages it fills become shareable."""
        seq = self._seq(seq_id)
        token_ids = [int(t) for t in token_ids]
        if len(seq.committed) + len(token_ids) > seq.num_tokens:
            raise ValueError(f"{seq_id!r}: committing {len(token_ids)} tokens after {len(seq.committed)} "
                             f"overruns its {seq.num_tokens} reserved slots")
        seq.committed.extend(token_ids)
        limit = len(seq.committed) if seq.cacheable_len is None else min(len(seq.committed), seq.cacheable_len)
        # Keys chain page by page; a page past an unshareable one is never shared either.
        while len(seq.keys) < limit // self.page_size:
            i = len(seq.keys)
            parent = seq.keys[-1] if seq.keys else seq.root
            key = _page_key(parent, seq.committed[i * self.page_size:(i + 1) * self.page_size])
            seq.keys.append(key)
            page = seq.pages[i]
            if self._key_of[page] is None:
                self._key_of[page] = key
                # A page with the same prefix may already be cached (two equal prompts prefilled in
                # the same step): the first stays the one lookups find, this one is a duplicate.
                self._cached.setdefault(key, page)

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child shares every page of the parent (n > 1 sampling); later writes copy on write."""
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already holds pages")
        if parent.raw:
            raise ValueError(f"{parent_id!r} holds raw pages, not tokens")
        if len(parent.committed) != parent.num_tokens:
            # Reserved but unwritten slots in a shared page would be written by both sequences.
            raise ValueError(f"fork {parent_id!r} only when its {parent.num_tokens} reserved slots are all "
                             f"written ({len(parent.committed)} are)")
        for page in parent.pages:
            self._incref(page)
        self._seqs[child_id] = _Sequence(pages=list(parent.pages), num_tokens=parent.num_tokens,
                                         committed=list(parent.committed), keys=list(parent.keys),
                                         cacheable_len=parent.cacheable_len, root=parent.root)

    def free(self, seq_id: str) -> None:
        """Release the sequence's pages; full keyed pages stay cached until evicted."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise ValueError(f"unknown sequence {seq_id!r}")
        for page in reversed(seq.pages):  # tail first: the deepest pages are evicted first
            self._decref(page)

    def allocate_raw(self, owner: str, n: int) -> list[int]:
        """n plain pages for a non-token owner (e.g. adapter weights); released by free(owner)."""
        if owner in self._seqs:
            raise ValueError(f"{owner!r} already holds pages")
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self.num_free:
            raise OutOfPages(f"{owner!r} needs {n} free pages, {self.num_free} left")
        pages = [self._take_fresh_page() for _ in range(n)]
        self._seqs[owner] = _Sequence(pages=pages, num_tokens=0, committed=[], keys=[], cacheable_len=0, raw=True)
        return list(pages)

    # ---- internals -----------------------------------------------------------------------------

    def _seq(self, seq_id: str) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise ValueError(f"unknown sequence {seq_id!r}") from None

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _needs_copy(self, seq: _Sequence, n: int) -> bool:
        # Only the slots after num_tokens get written; they lie in the last page only when it is partly filled.
        return n > 0 and seq.num_tokens % self.page_size != 0 and self._refs[seq.pages[-1]] > 1

    def _prefix_hits(self, prompt_ids, cacheable_len: int | None, root: bytes) -> list[int]:
        """Cached pages holding the prompt's leading full pages (never the page of its last token)."""
        usable = len(prompt_ids) - 1  # the last token is always recomputed for its logits
        if cacheable_len is not None:
            usable = min(usable, cacheable_len)
        hits = []
        key = root
        for i in range(usable // self.page_size):
            key = _page_key(key, prompt_ids[i * self.page_size:(i + 1) * self.page_size])
            page = self._cached.get(key)
            if page is None:
                break
            hits.append(page)
        return hits

    def _take_fresh_page(self) -> int:
        """A page to write: a never-used or plain free one, else the least recently used cached one."""
        if self._free_plain:
            page = self._free_plain.popleft()
        else:
            page, _ = self._evictable.popitem(last=False)
            del self._cached[self._key_of[page]]
            self._key_of[page] = None
        self._refs[page] = 1
        return page

    def _incref(self, page: int) -> None:
        if self._refs[page] == 0:
            del self._evictable[page]
        self._refs[page] += 1

    def _decref(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] > 0:
            return
        key = self._key_of[page]
        if key is not None and self._cached.get(key, page) == page:
            # The page lookups find (or a duplicate whose twin was evicted: it takes over).
            self._cached[key] = page
            self._evictable[page] = None
        else:
            self._key_of[page] = None  # a duplicate of a page that stays cached
            self._free_plain.append(page)
