"""The engine behind an asyncio server: one background thread steps it, the event loop talks to it.

The engine is not thread-safe and need not be: only its own thread touches it. Calls from the event
loop (add a request, abort one, read metrics) are queued and applied between steps; each step's
outputs are handed to per-request asyncio queues with `loop.call_soon_threadsafe`. The thread
blocks on the command queue while there is nothing to do, so an idle server costs nothing.

If a step raises, the engine's state is unknown: the thread stops, every open stream receives the
error, and `healthy` turns False (the server's /health then says so).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from serving.request import FinishReason, Request, RequestOutput

log = logging.getLogger("jvila.serving")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (an error in a step, or shutdown) before the request finished."""


class RequestStream:
    """The outputs of one request, in order, ending with the one that carries a finish reason."""

    def __init__(self, request_id: str, owner: AsyncEngine):
        self.request_id = request_id
        self._owner = owner
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False
        self._abort_requested = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self):
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if item.finish_reason is not None:
                self.finished = True
            yield item

    def abort(self) -> None:
        """Stop the request (the client left, or a stop string ended it early); safe to call twice.

        Call from the event loop. The stream then ends with an ABORT output (unless its last output
        had already arrived), so a consumer waiting on it wakes up.
        """
        if self.finished or self._abort_requested:
            return
        self._abort_requested = True
        self._owner.abort(self.request_id)
        self._queue.put_nowait(RequestOutput(self.request_id, [], finish_reason=FinishReason.ABORT))


class AsyncEngine:
    def __init__(self, engine, *, idle_wait_s: float = 0.5):
        self.engine = engine
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        # Engine thread only: request id → (loop, stream) for every request not yet finished.
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, RequestStream]] = {}

    # ---- life cycle (any thread) -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="jvila-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._commands.put(("stop",))
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(f"the engine thread did not stop within {timeout_s}s")

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # ---- calls from the event loop -----------------------------------------------------------

    async def submit(self, request: Request) -> RequestStream:
        """Hand `request` to the engine; returns its output stream once the engine has accepted it.

        The engine's refusal (a ValueError: prompt too long, duplicate id, rate limited, ...) is
        raised here, before anything has been sent to the client.
        """
        loop = asyncio.get_running_loop()
        stream = RequestStream(request.request_id, self)
        accepted = loop.create_future()
        self._send(("add", request, loop, stream, accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request.request_id)  # queued after the add, so it finds the request if it was added
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it is; its pages are freed before the next step. Never blocks."""
        if self._thread is not None and not self._stopping:
            self._commands.put(("abort", request_id))

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run `fn(engine)` on the engine thread between steps and return its result."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._send(("call", fn, loop, done))
        return await done

    def _send(self, command) -> None:
        if not self.healthy or self._stopping:
            raise EngineDeadError(f"the engine is not running ({self.error!r})" if self.error else
                                  "the engine is not running")
        self._commands.put(command)

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                # Block only when idle; while requests run, take whatever commands arrived and step.
                wait = not self.engine.has_unfinished()
                if not self._apply_commands(block=wait):
                    break
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self._dispatch(out)
        except BaseException as e:  # noqa: BLE001 — any failure ends the engine; streams must hear of it
            log.exception("the engine stopped on an error")
            self.error = e
        finally:
            self._fail_all(self.error or EngineDeadError("the engine was shut down"))

    def _apply_commands(self, *, block: bool) -> bool:
        """Apply queued commands; False once told to stop."""
        try:
            command = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind = command[0]
            if kind == "stop":
                return False
            if kind == "add":
                self._add(*command[1:])
            elif kind == "abort":
                self._abort(command[1])
            elif kind == "call":
                _, fn, loop, done = command
                try:
                    _resolve(loop, done, result=fn(self.engine))
                except Exception as e:  # noqa: BLE001 — the caller gets the error, the engine goes on
                    _resolve(loop, done, error=e)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, request: Request, loop, stream: RequestStream, accepted) -> None:
        try:
            self.engine.add_request(request)
        except Exception as e:  # noqa: BLE001 — a refused request is the caller's error; the engine goes on
            _resolve(loop, accepted, error=e)
            return
        self._streams[request.request_id] = (loop, stream)
        _resolve(loop, accepted, result=None)

    def _abort(self, request_id: str) -> None:
        # The stream already ended itself with an ABORT output (RequestStream.abort).
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort(request_id)

    def _dispatch(self, out: RequestOutput) -> None:
        entry = self._streams.get(out.request_id)
        if entry is None:
            return  # aborted: the stream has ended already
        if out.finish_reason is not None:
            del self._streams[out.request_id]
        _deliver(entry[0], entry[1], out)

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for loop, stream in streams.values():
            _deliver(loop, stream, EngineDeadError(f"the engine stopped: {error!r}"))
        # Commands that will never be applied: wake their callers.
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                _resolve(command[2], command[4], error=EngineDeadError("the engine is not running"))
            elif command[0] == "call":
                _resolve(command[2], command[3], error=EngineDeadError("the engine is not running"))


def _deliver(loop: asyncio.AbstractEventLoop, stream: RequestStream, item) -> None:
    try:
        loop.call_soon_threadsafe(stream._queue.put_nowait, item)
    except RuntimeError:  # the loop has closed: nobody is listening any more
        pass


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, *, result=None, error=None) -> None:
    def settle():
        if future.done():  # the caller gave up (cancelled) meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass
