"""Which adapters live in the page pool now: load on demand, least recently used eviction when idle.

An adapter becomes resident when a request that needs it is admitted (or prefetched for a queued
one): it takes raw pages from the engine's `PageAllocator` — the pages sequences take for their
KV — and its weights are written into them (`paged_layout`). While running sequences use it, it
stays; once idle it stays cached too, and goes, least recently used first, when the pool needs
its pages for KV or for another adapter. So loaded adapters shrink the pages left for KV, and
evicting them gives those pages back: memory moves between the two under load.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from serving.adapters.paged_layout import PoolGeometry
from serving.adapters.store import StoredAdapter
from serving.page_allocator import PageAllocator

# Allocator owners of adapter pages; the prefix keeps them apart from request ids.
_OWNER_PREFIX = "\x00lora:"


class ResidentAdapters:
    def __init__(self, geometry: PoolGeometry, allocator: PageAllocator,
                 write_pages: Callable[[list[int], object], None]):
        self.geometry = geometry
        self.allocator = allocator
        self._write_pages = write_pages  # (page ids, values [layers, n]: `paged_layout.pack_stream`'s)
        self._pages: dict[str, list[int]] = {}
        self._serials: dict[str, int] = {}  # which load of the adapter its pages hold (a copy of them stays valid)
        self._users: collections.Counter[str] = collections.Counter()  # running sequences per adapter
        self._idle: collections.OrderedDict[str, None] = collections.OrderedDict()  # resident, unused; LRU first
        self.counts = {"adapter_loads": 0, "adapter_evictions": 0}

    # ---- queries -------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._pages

    def pages_of(self, name: str) -> list[int]:
        return list(self._pages[name])

    def serial_of(self, name: str) -> int:
        """A number of this residency of the adapter, new at each load: its pages' contents are fixed until it goes."""
        return self._serials[name]

    @property
    def num_resident(self) -> int:
        return len(self._pages)

    @property
    def num_pages(self) -> int:
        return sum(len(p) for p in self._pages.values())

    @property
    def num_idle_pages(self) -> int:
        return sum(len(self._pages[n]) for n in self._idle)

    def pages_needed(self, adapter: StoredAdapter) -> int:
        return self.geometry.pages_for(adapter.rank, adapter.modules)

    # ---- residency -----------------------------------------------------------------------------

    def ensure(self, name: str, adapter: StoredAdapter, *, evict: bool = True) -> bool:
        """Make the adapter resident (evicting idle ones if `evict` and needed); False when it cannot fit now."""
        if name in self._pages:
            if name in self._idle:
                self._idle.move_to_end(name)  # recently wanted
            return True
        need = self.pages_needed(adapter)
        if need > self.allocator.num_free and evict:
            self.evict_idle(need)
        if need > self.allocator.num_free:
            return False
        pages = self.allocator.allocate_raw(_OWNER_PREFIX + name, need)
        self._write_pages(pages, adapter.values(self.geometry.dims))
        self._pages[name] = pages
        self._idle[name] = None
        self.counts["adapter_loads"] += 1
        self._serials[name] = self.counts["adapter_loads"]
        return True

    def acquire(self, name: str) -> None:
        """A running sequence uses the (resident) adapter: it cannot be evicted until released."""
        if name not in self._pages:
            raise ValueError(f"adapter {name!r} is not resident")
        self._users[name] += 1
        self._idle.pop(name, None)

    def release(self, name: str) -> None:
        if self._users[name] <= 0:
            raise ValueError(f"adapter {name!r} has no running user to release")
        self._users[name] -= 1
        if self._users[name] == 0:
            del self._users[name]
            self._idle[name] = None  # most recently used: evicted last

    def evict_idle(self, free_pages_wanted: int, *, keep: str | None = None) -> int:
        """Evict idle adapters, least recently used first, until that many pages are free; pages freed."""
        freed = 0
        for name in list(self._idle):
            if self.allocator.num_free >= free_pages_wanted:
                break
            if name != keep:
                freed += self.drop(name)
        return freed

    def drop(self, name: str) -> int:
        """Evict an idle adapter now (unload, or eviction); the pages freed (0 if it was not resident)."""
        if name not in self._pages:
            return 0
        if self._users[name]:
            raise ValueError(f"adapter {name!r} is used by {self._users[name]} running sequences")
        pages = self._pages.pop(name)
        del self._serials[name]
        self._idle.pop(name, None)
        self.allocator.free(_OWNER_PREFIX + name)
        self.counts["adapter_evictions"] += 1
        return len(pages)
