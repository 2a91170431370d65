"""Token ids arriving a few at a time → text that is safe to send, with stop strings cut out.

Decoding a growing id list and sending the difference is not enough on its own: a multi-byte
character split across tokens decodes to U+FFFD until its last byte arrives, and text that may be
the start of a stop string must be held back until it is clear whether the stop string follows
(a stop string never reaches the client, not even in part).

Only a short window of ids is decoded per step, not the whole output (which would cost O(n²) over
a long answer): the text of ids[prefix:] minus the text of ids[prefix:read] is what the new ids
add, the window's first ids giving context to tokenizers whose decoding depends on the previous
token (SentencePiece's leading spaces). The window moves on only at a whole character.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

_REPLACEMENT = "\ufffd"


class IncrementalText:
    def __init__(self, decode: Callable[[list[int]], str], stop: Iterable[str] = ()):
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._prefix = self._read = 0  # the decode window: ids[prefix:read] is already in `_decoded`
        self._decoded = ""  # text of whole characters decoded so far
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
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self._decoded += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
        # else: an unfinished multi-byte character: wait for its remaining bytes
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: whatever was held back (a partial stop string that never completed)."""
        if self.stopped:
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        self._decoded += self._decode(self._ids[self._prefix:])[len(before):]
        self._prefix = self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        cut = self._first_stop(self._decoded)
        if cut is not None:
            self.stopped = True
            end = cut
        else:
            end = len(self._decoded) - (0 if final else self._stop_prefix_len(self._decoded))
        # Decoding is prefix-stable in the window; what was sent stays sent, only the new tail goes out.
        new = self._decoded[len(self.text):max(end, len(self.text))]
        self.text += new
        return new

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
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
