"""Token ids arriving a few at a time → text that is safe to send, with stop strings cut out.

Decoding a growing id list and sending the difference is not enough on its own: a multi-byte
character split across tokens decodes to U+FFFD until its last byte arrives, and text that may be
the start of a stop string must be held back until it is clear whether the stop string follows
(a stop string never reaches the client, not even in part).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

_REPLACEMENT = "\ufffd"


class IncrementalText:
    def __init__(self, decode: Callable[[list[int]], str], stop: Iterable[str] = ()):
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self.text = ""  # everything sent so far
        self.stopped = False  # a stop string matched: nothing more will be sent

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    def add(self, token_ids: Iterable[int]) -> str:
        """Take new ids; return the text that can be sent now (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.extend(int(t) for t in token_ids)
        full = self._decode(self._ids)
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            return self._advance(full[:cut])
        end = len(full)
        while end > len(self.text) and full[end - 1] == _REPLACEMENT:
            end -= 1  # an unfinished multi-byte character: wait for its remaining bytes
        end -= self._stop_prefix_len(full[:end])
        return self._advance(full[:max(end, len(self.text))])

    def finish(self) -> str:
        """The generation ended: whatever was held back (a partial stop string that never completed)."""
        if self.stopped:
            return ""
        full = self._decode(self._ids)
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            full = full[:cut]
        return self._advance(full)

    def _advance(self, upto: str) -> str:
        # Decoding is prefix-stable for byte-level tokenizers; if a tokenizer rewrites earlier text
        # (e.g. space clean-up), what was sent stays sent and only the new tail goes out.
        new = upto[len(self.text):]
        self.text += new
        return new

    def _first_stop(self, full: str) -> int | None:
        hits = [i for i in (full.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
