"""Server-sent events, framed as the WHATWG HTML standard says (pure, incremental).

"Event stream interpretation": lines end in CR, LF or CRLF; a line starting
with ``:`` is a comment (keep-alives); ``field: value`` sets ``data`` (one
line each, joined by LF), ``event``, ``id`` or ``retry``; an empty line
dispatches the event, and an event whose data is empty is not dispatched.
Bytes arrive in chunks split anywhere, even between the CR and LF of one line
end, so the decoder holds a trailing CR back until it sees what follows.

One deliberate difference: at the end of the stream the standard discards an
event that was never terminated. A model's last event is its most important
one (the usage, ``[DONE]``), so :meth:`SSEDecoder.close` dispatches it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    # The event's own bytes when they were framed canonically already (one ``data:``
    # line, LF ends): passed on as they came, not rebuilt.
    raw: bytes | None = field(default=None, compare=False, repr=False)

    def encode(self) -> bytes:
        """The event in the canonical framing (LF line ends), for the proxy's client."""
        if self.raw is not None:
            return self.raw
        head = ""
        if self.event is not None:
            head += f"event: {self.event}\n"
        if self.id is not None:
            head += f"id: {self.id}\n"
        if self.retry is not None:
            head += f"retry: {self.retry}\n"
        body = "".join(f"data: {line}\n" for line in self.data.split("\n"))
        return (head + body + "\n").encode()


@dataclass(frozen=True, slots=True)
class Comment:
    text: str

    def encode(self) -> bytes:
        return f":{self.text}\n\n".encode()


Item = Event | Comment


class SSEDecoder:
    def __init__(self) -> None:
        self._pending = b""
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[Item]:
        """The events and comments completed by ``chunk``."""
        buffer = self._pending + chunk
        out: list[Item] = []
        if b"\r" not in buffer and not self._mid_event():
            return self._feed_blocks(buffer, out)
        start = 0
        for end in LINE_END.finditer(buffer):
            if end.group() == b"\r" and end.end() == len(buffer):
                break  # perhaps the first half of a CRLF: wait for the next byte
            self._line(buffer[start : end.start()], out)
            start = end.end()
        self._pending = buffer[start:]
        return out

    def _mid_event(self) -> bool:
        return bool(self._data) or self._event is not None or self._id is not None \
            or self._retry is not None  # fmt: skip

    def _feed_blocks(self, buffer: bytes, out: list[Item]) -> list[Item]:
        """The fast path for LF-only framing (what model APIs send): split at blank lines;
        a block of one ``data:`` line is the event, passed on byte for byte; any other
        block goes through the line rules. Same result as :meth:`_line` line by line."""
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            block = buffer[start:end]
            start = end + 2
            if block.startswith(b"data:") and b"\n" not in block:
                value = block[6:] if block.startswith(b"data: ") else block[5:]
                out.append(Event(value.decode("utf-8", errors="replace"), raw=block + b"\n\n"))
                continue
            for line in block.split(b"\n"):
                self._line(line, out)
            self._dispatch(out)
        self._pending = buffer[start:]
        return out

    def close(self) -> list[Item]:
        """The end of the stream: what is left, including an unterminated last event."""
        out: list[Item] = []
        pending, self._pending = self._pending, b""
        # Complete lines the fast path kept back with an unfinished block, then the rest.
        for line in LINE_END.split(pending):
            if line:
                self._line(line, out)
        self._dispatch(out)
        return out

    def _line(self, raw: bytes, out: list[Item]) -> None:
        line = raw.decode("utf-8", errors="replace")
        if not line:
            self._dispatch(out)
            return
        if line.startswith(":"):
            out.append(Comment(line[1:]))
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\x00" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        # any other field is ignored, as the standard says

    def _dispatch(self, out: list[Item]) -> None:
        # The id is passed on with the event that set it (the client's own parser keeps the
        # last one); the standard's buffer semantics are the client's business.
        data, event, id_, retry = self._data, self._event, self._id, self._retry
        self._data, self._event, self._id, self._retry = [], None, None, None
        if data:
            out.append(Event("\n".join(data), event, id_, retry))
