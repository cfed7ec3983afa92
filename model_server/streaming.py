"""Generated token ids to text deltas: incremental, stop-string aware, never half a character."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextAssembler:
    """Turns one row's token ids into text deltas as they arrive.

    Text is decoded from all ids each time (byte-level tokens only make sense together); a delta is
    held back while it ends in an incomplete UTF-8 sequence, in whitespace, or could be the start of a stop
    string, so nothing that the final answer cuts away is ever sent.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = (),
                 already_sent: str = "", *, incremental: bool = False) -> None:
        self._decode = decode
        self._stops = tuple(s for s in stop_strings if s)
        self._incremental = incremental
        """Decode only the newest few tokens each time (text-generation-inference's `decode_token`): the
        text of the ids after `_prefix` minus the text of those up to `_read`. A token's text can depend on
        the token before it (a leading space), never further back, so this is the full decode's text, at a
        cost that does not grow with the answer. Needs `decode` to be a real tokenizer's."""
        self._raw = ""
        self._prefix = self._read = 0
        self.ids: list[int] = []
        self.sent = already_sent
        """Text handed out so far; a retried request starts from what its first attempt sent."""
        self.stopped = False

    def _visible(self, raw: str) -> str:
        return raw.lstrip()

    def add(self, token_id: int) -> str:
        """Add one token; return the new text that is safe to show (maybe empty)."""
        self.ids.append(token_id)
        raw = self._decoded()
        answer, self.stopped = cut_at_stop(raw, self._stops)
        if self.stopped:
            return self._emit(self._visible(answer).rstrip())
        safe = raw.rstrip("\ufffd")
        hold = self._held_suffix(safe)
        # Trailing whitespace waits too: the answer ends stripped, so a space before a stop string (or the end)
        # must never have been sent.
        return self._emit(self._visible(safe[: len(safe) - hold] if hold else safe).rstrip())

    def _decoded(self) -> str:
        """The text of all ids so far (up to a character still incomplete, when incremental)."""
        if not self._incremental:
            return self._decode(self.ids)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._raw += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._raw

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    best = max(best, k)
                    break
        return best

    def _emit(self, visible: str) -> str:
        if len(visible) <= len(self.sent) or not visible.startswith(self.sent):
            return ""
        delta = visible[len(self.sent):]
        self.sent = visible
        return delta

    def finish(self) -> str:
        """Flush what was held back (the answer ended without completing a stop string)."""
        if self.stopped:
            return ""
        raw = self._decode(self.ids)
        return self._emit(self._visible(raw).rstrip())

    @property
    def text(self) -> str:
        return self.sent


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
