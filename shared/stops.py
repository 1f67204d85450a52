"""Stop strings: where an answer ends when the caller names text it must end before.

As OpenAI's API has it, the answer ends just before the first stop string in it, which is not
part of the answer. When the answer arrives piece by piece, text that may be the
start of a stop string is held back until the next piece says whether it is (`StopFilter`),
so what was shown never has to be taken back.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopFilter", "first_stop", "held_back"]


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the answer in `text` ends, if a stop string is in it: at the start of the one
    complete first as the text is read (the earliest to end; of two ending together, the
    longer). So it does not matter how the text arrives: a stop string seen whole ends the
    answer then, whatever longer one might have begun before it."""
    found = [(at + len(s), at) for s in stops if (at := text.find(s)) != -1]
    return min(found)[1] if found else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string (and not
    the whole of one)."""
    longest = max(map(len, stops), default=1) - 1
    for size in range(min(len(text), longest), 0, -1):
        tail = text[-size:]
        if any(s.startswith(tail) for s in stops):
            return size
    return 0


class StopFilter:
    """The pieces of an answer, cut before the first stop string.

    `feed` returns the text that can be shown now; once a stop string is seen, `stopped` is set
    and everything after it is dropped. `flush` gives what was held back at the end. `text` is
    the answer as shown.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._seen = ""
        self._shown = 0

    @property
    def text(self) -> str:
        return self._seen[: self._shown]

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        # A stop string can only begin in what was held back or in the new piece.
        start = self._shown
        self._seen += piece
        end = first_stop(self._seen[start:], self.stops)
        if end is not None:
            self.stopped = True
            self._seen = self._seen[: start + end]
            ready = len(self._seen)
        else:
            ready = max(self._shown, len(self._seen) - held_back(self._seen, self.stops))
        out = self._seen[self._shown : ready]
        self._shown = ready
        return out

    def flush(self) -> str:
        """What was held back, at the end of the answer."""
        out = self._seen[self._shown :]
        self._shown = len(self._seen)
        return out

    def cut(self, text: str) -> str:
        """`text` (the whole answer) cut before its first stop string."""
        end = first_stop(text, self.stops)
        return text if end is None else text[:end]
