"""Server-sent events as TGI's `/generate_stream` and OpenAI-compatible `/chat/completions` write them: an
incremental parser."""

from __future__ import annotations


class SseParser:
    """Incremental parser for `text/event-stream` (the WHATWG rules TGI, vLLM and the others write to).

    Feed it raw chunks as they arrive; it returns the `data` of each completed event. Lines may be split
    anywhere across chunks (bytes are decoded only per complete line, so a UTF-8 character split between
    chunks is whole again); `\\r\\n`, `\\r` and `\\n` end lines; a blank line ends an event; several `data:`
    lines of one event are joined with `\\n`; lines starting with `:` are comments (keep-alives); other
    fields (`event:`, `id:`, `retry:`) are ignored. An event left without its blank line when the stream
    ends is discarded, as the spec says.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self.comments = 0
        """Comment lines seen (keep-alives); they do not count as progress."""

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events: list[str] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return events
            end, skip = cut
            raw, self._buffer = self._buffer[:end], self._buffer[end + skip:]
            line = raw.decode("utf-8", errors="replace")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                self._data.append(value)


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """(index, length) of the first line ending in `buffer`; a lone trailing `\\r` waits for more bytes."""
    for i, byte in enumerate(buffer):
        if byte == 0x0A:
            return i, 1
        if byte == 0x0D:
            if i + 1 == len(buffer):
                return None  # maybe the first half of "\r\n"
            return i, 2 if buffer[i + 1] == 0x0A else 1
    return None
