"""The engine's side of multi-LoRA serving: which requests use which adapter, admission, room, prefetch.

The engine calls in at each point of a request's life: `check` on arrival (an unknown adapter is
refused), `admit` when the scheduler offers a waiting request (its adapter is made resident
first, evicting idle adapters if needed, then its KV pages are allocated, evicting idle adapters
again if the KV does not fit), `release` when a running sequence leaves the pool (finished,
aborted, preempted), `make_room` before preempting anyone for KV, `prefetch` after each step for
the adapters of the requests queued next, and `step_inputs` to hand the step its adapters (the
working set read out of the pool, kept from step to step: `serving.adapters.working_set`). Loading and unloading by name (`add`, `remove`) run between steps.
"""

from __future__ import annotations

import collections

from serving.adapters.paged_layout import PoolGeometry
from serving.adapters.resident import ResidentAdapters
from serving.adapters.store import (
    AdapterError,
    AdapterInUse,
    AdapterStore,
    StoredAdapter,
    UnknownAdapter,
)
from serving.adapters.working_set import LoraBatch, WorkingSet
from serving.page_allocator import OutOfPages, PageAllocator
from serving.request import Request

# Prefetch never takes the pool below this share of free pages: running sequences need room to grow.
PREFETCH_FREE_SHARE = 0.25


class EngineAdapters:
    def __init__(self, store: AdapterStore, allocator: PageAllocator, write_pages, *, page_size: int,
                 sequence_pages: int = 0, read_pools=None, layout: str | None = None, dtype=None):
        """`sequence_pages`: pages one sequence of the longest context takes; an adapter must leave room for it.

        `write_pages(pages, values)` writes adapter pages into the pools (`StepRunner.write_pages`);
        `read_pools()` returns the current (K pools, V pools) the steps read adapters from; `layout`: the working set's
        (`serving.adapters.working_set.LAYOUTS`; None = the platform's); `dtype`: the working set's (None = the
        pools').
        """
        self.store = store
        self.allocator = allocator
        self.geometry = PoolGeometry.of(store.base_config, page_size)
        self.resident = ResidentAdapters(self.geometry, allocator, write_pages)
        self.working_set = WorkingSet(store, self.resident, self.geometry, read_pools, layout=layout,
                                      dtype=dtype)
        self.sequence_pages = sequence_pages
        self._requests: collections.Counter[str] = collections.Counter()  # waiting or running, per adapter
        # Each load of a name gets a fresh number: cached KV pages of an unloaded adapter must never
        # serve a later adapter loaded under the same name.
        self._loads = 0
        self._load_ids: dict[str, int] = {}
        for name in store.names:
            self._check_fits(name, store.get(name))
            self._new_load(name)

    # ---- names ---------------------------------------------------------------------------------

    def add(self, name: str, adapter: StoredAdapter) -> None:
        self._check_fits(name, adapter)
        self.store.add(name, adapter)
        self._new_load(name)

    def _new_load(self, name: str) -> None:
        self._loads += 1
        self._load_ids[name] = self._loads

    def prefix_namespace(self, request: Request) -> str:
        """The page allocator's sharing namespace of a request: KV is shared only under the same weights."""
        if request.adapter is None:
            return ""
        return f"{request.adapter}#{self._load_ids[request.adapter]}"

    def _check_fits(self, name: str, adapter: StoredAdapter) -> None:
        # An adapter that cannot share the pool with one full-length sequence would never be served.
        need = self.resident.pages_needed(adapter)
        if need + self.sequence_pages > self.allocator.num_pages:
            raise AdapterError(f"LoRA adapter {name!r} needs {need} pages of the {self.allocator.num_pages}-page pool, "
                               f"leaving less than the {self.sequence_pages} a full-context sequence needs")

    def remove(self, name: str) -> None:
        """Forget an adapter; refused (AdapterInUse) while requests wait for it or run with it."""
        self.store.get(name)  # UnknownAdapter first
        if self._requests[name]:
            raise AdapterInUse(f"LoRA adapter {name!r} is in use by {self._requests[name]} request(s); "
                               "unload it when they have finished")
        self.resident.drop(name)
        self.store.remove(name)
        del self._load_ids[name]

    def requests_using(self, name: str) -> int:
        return self._requests[name]

    # ---- a request's life ----------------------------------------------------------------------

    def check(self, request: Request) -> None:
        if request.adapter is not None and request.adapter not in self.store:
            raise UnknownAdapter(f"no LoRA adapter named {request.adapter!r} is loaded")

    def on_add(self, request: Request) -> None:
        if request.adapter is not None:
            self._requests[request.adapter] += 1

    def on_leave(self, request: Request) -> None:
        """The request is gone for good (finished or aborted)."""
        if request.adapter is not None:
            self._requests[request.adapter] -= 1
            if self._requests[request.adapter] <= 0:
                del self._requests[request.adapter]

    def admit(self, request: Request, allocate, pages_needed: int) -> bool:
        """Make the request's adapter resident, then run `allocate()` (its KV pages); False if either does not fit.

        `pages_needed`: the KV pages `allocate` takes from the free count. Idle adapters (never
        this one) are evicted, least recently used first, to make room for either.
        """
        name = request.adapter
        if name is not None and not self.resident.ensure(name, self.store.get(name)):
            return False
        if pages_needed > self.allocator.num_free:
            self.resident.evict_idle(pages_needed, keep=name)
        try:
            allocate()
        except OutOfPages:
            return False
        if name is not None:
            self.resident.acquire(name)
        return True

    def release(self, request: Request) -> None:
        """A running sequence left the pool (finished, aborted or preempted)."""
        if request.adapter is not None:
            self.resident.release(request.adapter)

    def make_room(self, pages: int) -> bool:
        """Evict idle adapters until `pages` are free; whether anything was evicted."""
        return self.resident.evict_idle(pages) > 0

    def prefetch(self, requests) -> None:
        """Load the adapters of queued requests (in the order given) while the pool has room to spare."""
        reserve = int(PREFETCH_FREE_SHARE * self.allocator.num_pages)
        for request in requests:
            name = request.adapter
            if name is None or name in self.resident:
                continue
            adapter = self.store.get(name)
            if self.allocator.num_free - self.resident.pages_needed(adapter) < reserve:
                return
            self.resident.ensure(name, adapter, evict=False)

    # ---- the step ------------------------------------------------------------------------------

    def step_inputs(self, row_requests, row_tokens) -> LoraBatch | None:
        return self.working_set.step_inputs([r.adapter for r in row_requests], row_tokens)

    def metrics(self) -> dict:
        return {"adapters_loaded": len(self.store), "adapters_resident": self.resident.num_resident,
                "adapter_pages": self.resident.num_pages, **self.resident.counts, **self.working_set.counts}
