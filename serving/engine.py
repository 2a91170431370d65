"""The serving engine: continuous batching over one shared page pool.

Requests wait in a scheduler (FCFS by default, or any policy of `serving.scheduler`). Each
`step()` packs one ragged batch under a token budget: first every running sequence, oldest
first — one token for those decoding, the next chunk of the prompt for those still prefilling —
then, while budget, rows and pages remain, the next waiting requests in the scheduler's order.
Full pages of a prompt prefix already in the pool are shared instead of recomputed (the
allocator finds them by hash). When a running sequence needs a page and none is free, the
newest running sequence is preempted by recompute: its pages are freed and it goes back to the
front of its queue, keeping the tokens it has produced, so it later resumes where it stopped.
A request with media brings input embeddings for some prompt rows; its pages are shared only
up to its first media row, since the K/V past it depend on more than the token ids.

A request ends at an end-of-sequence id (unless ignore_eos), a stop token id, a stop string
(with a `detokenize`), max_tokens, or the context; `abort` ends it at once and frees its pages.

The device work is one `StepRunner.run` per step; everything here is host-side bookkeeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
from flax import nnx

from serving.adapters.engine_adapters import EngineAdapters
from serving.adapters.paged_layout import PoolGeometry
from serving.adapters.store import UnknownAdapter
from serving.page_allocator import OutOfPages, PageAllocator
from serving.request import FinishReason, Request, RequestOutput, TokenLogprob
from serving.scheduler import make_scheduler
from serving.sequence import Sequence, finish_reason
from serving.step import StepRunner
from serving.step_packing import pack_step


class Engine:
    def __init__(
        self,
        graphdef,
        state,
        *,
        eos_ids: Iterable[int] = (),
        num_pages: int = 512,
        page_size: int = 16,
        max_running: int = 32,
        token_budget: int = 256,
        max_context: int | None = None,
        scheduler=None,
        attention=None,
        detokenize: Callable[[list[int]], str] | None = None,
        cache_dtype=None,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        min_step_rows: int = 1,  # smallest row (and token) bucket of a step; see StepRunner
        adapters=None,  # serving.adapters.store.AdapterStore: LoRA adapters requests may name
        lora_dtype=None,  # the dtype steps read adapters in (None: the KV pools'); see serving.adapters.working_set
    ):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be positive, got {num_pages} and {page_size}")
        if max_running < 1 or token_budget < 1:
            raise ValueError(f"max_running and token_budget must be positive, got {max_running} and {token_budget}")
        config = nnx.merge(graphdef, state).config  # only to read the static config
        pool_tokens = num_pages * page_size
        if adapters is not None:
            # A full-context sequence and the largest adapter the store accepts always fit together, so
            # neither admission nor a growing sequence can wait forever on an adapter's pages.
            pool_tokens -= PoolGeometry.of(config, page_size).largest_adapter_pages(adapters.max_rank) * page_size
            if pool_tokens < 2:
                raise ValueError(f"a {num_pages}-page pool cannot hold an adapter of rank {adapters.max_rank} "
                                 "beside a sequence; give it more pages or lower the maximum rank")
        if max_context is None:
            max_context = min(config.max_position_embeddings, pool_tokens)
        if not 1 < max_context <= pool_tokens:
            raise ValueError(f"max_context {max_context} must lie in [2, num_pages * page_size = {pool_tokens}] "
                             "so that one sequence alone always fits the pool")
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.page_size, self.num_pages = page_size, num_pages
        self.max_running, self.token_budget, self.max_context = max_running, token_budget, max_context
        self.detokenize = detokenize
        self.allocator = PageAllocator(num_pages, page_size)
        self.scheduler = scheduler if scheduler is not None else make_scheduler("fcfs")
        self.runner = StepRunner(graphdef, state, num_pages=num_pages, page_size=page_size,
                                 max_pages_per_seq=-(-max_context // page_size), attention=attention,
                                 cache_dtype=cache_dtype, min_rows=min_step_rows, min_tokens=min_step_rows,
                                 lora_geometry=None if adapters is None else PoolGeometry.of(config, page_size))
        # Adapters share the KV page pool (unified paging): see serving/adapters.
        self.adapters = (None if adapters is None else
                         EngineAdapters(adapters, self.allocator, self.runner.write_pages, page_size=page_size,
                                        sequence_pages=-(-max_context // page_size),
                                        read_pools=lambda: (self.runner.k_pages, self.runner.v_pages),
                                        dtype=lora_dtype))
        self._clock = clock
        self._seed_rng = np.random.default_rng(seed)
        self._running: list[Sequence] = []  # admission order: the last is the first to be preempted
        # Waiting in the scheduler: new ones, and preempted ones keeping the tokens they made.
        self._waiting: dict[str, Sequence] = {}
        self._known: set[str] = set()  # ids waiting or running
        self._pending_outputs: list[RequestOutput] = []  # aborts, reported by the next step
        self._counts = {"steps": 0, "tokens_generated": 0, "prompt_tokens_computed": 0, "preemptions": 0,
                        "finished": 0, "aborted": 0, "last_step_rows": 0, "last_step_tokens": 0}

    # ---- requests in and out -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request. ValueError for a duplicate id, a prompt the context cannot hold, bad ids or params."""
        rid = request.request_id
        if rid in self._known:
            raise ValueError(f"request id {rid!r} is already in the engine")
        n = len(request.prompt_ids)
        if n >= self.max_context:
            raise ValueError(f"prompt of {n} tokens leaves no room for output in the context of "
                             f"{self.max_context} tokens")
        if any(not 0 <= t < self.vocab_size for t in request.prompt_ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if request.params.stop and self.detokenize is None:
            raise ValueError("stop strings need an engine with a detokenize function")
        if request.input_embeddings is not None and np.shape(request.input_embeddings)[-1] != self.hidden_size:
            raise ValueError(f"input_embeddings rows have width {np.shape(request.input_embeddings)[-1]}; "
                             f"the model's hidden size is {self.hidden_size}")
        if request.adapter is not None:
            if self.adapters is None:
                raise UnknownAdapter(f"no LoRA adapter named {request.adapter!r}: this engine serves none")
            self.adapters.check(request)
        self.scheduler.add(request, self._clock())  # may raise RateLimited before anything is recorded
        self._known.add(rid)
        if self.adapters is not None:
            self.adapters.on_add(request)
        # The seed is drawn on arrival, so a request's samples do not depend on when it is admitted.
        self._waiting[rid] = Sequence(request, seed=self._draw_seed(request))

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is, freeing its pages now; the next step reports it (finish ABORT).

        Unknown or already finished ids are ignored: a client may go away after its last token.
        """
        if request_id not in self._known:
            return
        seq = next((s for s in self._running if s.request_id == request_id), None)
        if seq is not None:
            self._running.remove(seq)
            self.allocator.free(request_id)
            if self.adapters is not None:
                self.adapters.release(seq.request)
        else:
            self.scheduler.remove(request_id)
            seq = self._waiting.pop(request_id)
        self._known.discard(request_id)
        if self.adapters is not None:
            self.adapters.on_leave(seq.request)
        self._counts["aborted"] += 1
        self.scheduler.on_finish(seq.request, seq.num_output)
        self._pending_outputs.append(RequestOutput(request_id, [], finish_reason=FinishReason.ABORT,
                                                   num_prompt_tokens=seq.num_prompt,
                                                   num_output_tokens=seq.num_output))

    def has_unfinished(self) -> bool:
        return bool(self._running) or self.scheduler.num_waiting > 0 or bool(self._pending_outputs)

    def run_to_completion(self, requests: Iterable[Request]) -> dict[str, list[int]]:
        """Serve `requests` to the end; their output ids by request id (aborted ones included, as far as they got)."""
        outputs: dict[str, list[int]] = {}
        for request in requests:
            self.add_request(request)
            outputs[request.request_id] = []
        while self.has_unfinished():
            for out in self.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        return outputs

    # ---- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one packed step; the new tokens of every request that got one, and every request that ended."""
        outputs, self._pending_outputs = self._pending_outputs, []
        plan, copies = self._schedule()
        if not plan:
            return outputs
        if copies:
            self.runner.copy_pages(copies)
        if self.adapters is not None:
            # Short rows first: the step's long rows then share its last tokens, which multiply just their own
            # adapters (`LoraBatch.step_weights`).
            plan.sort(key=lambda row: row[1])
        batch = pack_step(plan, self.allocator, self.hidden_size)
        if self.adapters is not None:
            batch.lora = self.adapters.step_inputs([seq.request for seq, _ in plan], [chunk for _, chunk in plan])
        result = self.runner.run(batch)
        self._counts["steps"] += 1
        self._counts["last_step_rows"] = len(plan)
        self._counts["last_step_tokens"] = sum(chunk for _, chunk in plan)
        for row, (seq, chunk) in enumerate(plan):
            written = seq.tokens[seq.num_computed: seq.num_computed + chunk]
            self.allocator.commit(seq.request_id, written)
            if seq.num_computed < seq.num_prompt:
                self._counts["prompt_tokens_computed"] += min(chunk, seq.num_prompt - seq.num_computed)
            seq.num_computed += chunk
            if seq.num_pending == 0:  # the chunk ended at the last token: its logits give the next one
                outputs.append(self._accept(seq, row, result))
        return outputs

    def _accept(self, seq: Sequence, row: int, result) -> RequestOutput:
        token = int(result.next_tokens[row])
        seq.tokens.append(token)
        self._counts["tokens_generated"] += 1
        self.scheduler.on_decode([seq.request])
        new_logprobs = None
        n_top = seq.request.params.logprobs
        if n_top is not None:
            top = [(int(t), float(lp)) for t, lp in zip(result.top_ids[row][:n_top], result.top_logprobs[row][:n_top])]
            entry = TokenLogprob(token, float(result.logprobs[row]), top)
            seq.logprobs.append(entry)
            new_logprobs = [entry]
        reason, text = finish_reason(seq, eos_ids=self.eos_ids, max_context=self.max_context,
                                     detokenize=self.detokenize)
        out = RequestOutput(seq.request_id, [token], new_logprobs, finish_reason=reason,
                            num_prompt_tokens=seq.num_prompt, num_output_tokens=seq.num_output)
        if reason is not None:
            if text is not None:
                out.text = text
            self._running.remove(seq)
            self.allocator.free(seq.request_id)
            self._known.discard(seq.request_id)
            if self.adapters is not None:
                self.adapters.release(seq.request)
                self.adapters.on_leave(seq.request)
            self._counts["finished"] += 1
            self.scheduler.on_finish(seq.request, seq.num_output)
        return out

    def _schedule(self) -> tuple[list[tuple[Sequence, int]], list[tuple[int, int]]]:
        """This step's rows (sequence, tokens to feed) and the page copies to make first."""
        budget = self.token_budget
        plan: list[tuple[Sequence, int]] = []
        copies: list[tuple[int, int]] = []
        preempted = False
        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            chunk = min(seq.num_pending, budget)
            missing = seq.num_computed + chunk - self.allocator.num_tokens(seq.request_id)
            if missing > 0:
                try:
                    copies += self.allocator.append_slots(seq.request_id, missing)
                except OutOfPages:
                    # Idle adapters give their pages back before anyone is preempted.
                    if self.adapters is not None and self.adapters.make_room(
                            self.allocator.pages_to_append(seq.request_id, missing)):
                        continue
                    # Recompute the newest: it has the least work to redo and waited the least.
                    self._preempt(self._running[-1])
                    preempted = True
                    continue  # retry this sequence (unless it was the newest itself)
            plan.append((seq, chunk))
            budget -= chunk
            i += 1
        # A step that had to preempt admits no one: the pool is full, and the preempted sequence
        # would otherwise be readmitted at once, thrashing.
        if not preempted and budget > 0 and len(self._running) < self.max_running:
            state = {"budget": budget}

            def fits(request: Request) -> bool:
                if state["budget"] <= 0 or len(self._running) >= self.max_running:
                    return False
                seq = self._waiting[request.request_id]
                if self.adapters is not None:
                    # The adapter first, then the KV; idle adapters make room for either.
                    cached = []
                    # KV pages are shared only between requests of the same adapter (or the base).
                    namespace = self.adapters.prefix_namespace(request)
                    needed = self.allocator.pages_needed(seq.tokens, cacheable_len=seq.cacheable_len,
                                                         namespace=namespace)
                    if not self.adapters.admit(request, lambda: cached.append(self.allocator.allocate(
                            request.request_id, seq.tokens, cacheable_len=seq.cacheable_len,
                            namespace=namespace)), needed):
                        return False
                    num_cached = cached[0]
                else:
                    try:
                        num_cached = self.allocator.allocate(request.request_id, seq.tokens,
                                                             cacheable_len=seq.cacheable_len)
                    except OutOfPages:
                        return False
                del self._waiting[request.request_id]
                seq.num_computed = num_cached
                chunk = min(seq.num_pending, state["budget"])
                state["budget"] -= chunk
                self._running.append(seq)
                plan.append((seq, chunk))
                return True

            self.scheduler.admit(fits, self._clock())
        if self.adapters is not None and self._waiting:
            # Requests still queued: their adapters load now, while the pool has room, not when admitted.
            self.adapters.prefetch([s.request for s in list(self._waiting.values())[: self.max_running]])
        return plan, copies

    def _preempt(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self.allocator.free(seq.request_id)
        if self.adapters is not None:
            self.adapters.release(seq.request)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self._waiting[seq.request_id] = seq
        self._counts["preemptions"] += 1
        self.scheduler.requeue(seq.request)

    def _draw_seed(self, request: Request) -> int:
        seed = request.params.seed
        return int(self._seed_rng.integers(0, 2**31 - 1)) if seed is None else int(seed)

    # ---- observation ---------------------------------------------------------------------------

    def metrics(self) -> dict:
        stats = self.allocator.stats()
        return {
            "waiting": self.scheduler.num_waiting,
            "running": len(self._running),
            "pages_total": self.num_pages,
            "pages_free": self.allocator.num_free,
            "pages_used": self.allocator.num_used,
            "pages_shared": self.allocator.num_shared,
            "prefix_hit_tokens": stats.get("prefix_hit_tokens", 0),
            **self._counts,
            **(self.adapters.metrics() if self.adapters is not None else {}),
            "client_service": self.scheduler.service(),
            "scheduler_counters": self.scheduler.counters(),
        }
