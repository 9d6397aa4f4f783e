"""Turn an agent's byte streams into coalesced output chunks and control lines.

A chatty agent must not become one event per write: bytes are gathered, and the shim takes a
chunk (cut at the last newline) when the stream's last one is old enough, or when a chunk is
big enough. Lines on stderr that start with `{"corral"` are the agent's control protocol and
are taken out of the output.
"""

import codecs
from dataclasses import dataclass
from typing import Any

import orjson

CONTROL_PREFIX = b'{"corral"'
MAX_CHUNK_BYTES = 64 * 1024
PARTIAL_LINE_BYTES = 4096  # a partial line is held back for its end until it is this long
MEMO_LINE_BYTES = 512  # a control line this short is remembered: an agent repeats its heartbeat line
MAX_CONTROL_LINE_BYTES = MAX_CHUNK_BYTES  # a longer control line is a protocol error, its bytes dropped


@dataclass(frozen=True)
class ControlLine:
    """A parsed control line, or the reason it could not be parsed."""

    raw: str
    kind: str | None
    fields: dict[str, Any]
    error: str | None = None


def oversized_control_line(head: bytes) -> ControlLine:
    """The protocol error of a control line longer than MAX_CONTROL_LINE_BYTES (its start is kept)."""
    text = head[:2000].decode(errors="replace")
    return ControlLine(text, None, {}, f"control line longer than {MAX_CONTROL_LINE_BYTES} bytes (dropped)")


def parse_control_line(line: bytes) -> ControlLine:
    """Parse one `{"corral": KIND, ...}` line."""
    if len(line.rstrip(b"\r\n")) > MAX_CONTROL_LINE_BYTES:
        return oversized_control_line(line)
    text = line.decode(errors="replace").rstrip("\r\n")
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return ControlLine(text, None, {}, f"not JSON: {exc}")
    if not isinstance(value, dict):
        return ControlLine(text, None, {}, "not a JSON object")
    kind = value.pop("corral", None)
    if not isinstance(kind, str) or not kind:
        return ControlLine(text, None, {}, 'the "corral" key must name a message kind')
    return ControlLine(text, kind, value)


class OutputCoalescer:
    """Gather one stream's bytes into text chunks, cut on line ends."""

    def __init__(self, *, max_bytes: int = 16 * 1024, parse_control: bool = False) -> None:
        self.max_bytes = max_bytes
        self.parse_control = parse_control
        self._pending = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._line_start = True
        self._partial = b""
        self._memo: tuple[bytes, ControlLine] | None = None  # the last control line parsed
        self._dropping = False  # within an oversized control line: its bytes are dropped up to its end
        # Whether flush() would return a chunk: a whole line waits (or a long partial one).
        self.flushable = False

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def feed(self, data: bytes) -> tuple[list[str], list[ControlLine]]:
        """Take bytes read from the pipe; return the chunks and control lines now complete."""
        controls: list[ControlLine] = []
        if self.parse_control:
            if (
                not self._dropping
                and self._line_start
                and not self._partial
                and data.startswith(CONTROL_PREFIX)
                and data.find(b"\n") == len(data) - 1
            ):
                controls.append(self._parse(data))  # the common case: one control line alone in a read
                return [], controls
            data = self._extract_controls(data, controls)
        if not data:
            return [], controls
        self._pending += data
        if not self.flushable and (b"\n" in data or len(self._pending) >= PARTIAL_LINE_BYTES):
            self.flushable = True
        chunks: list[str] = []
        while len(self._pending) >= self.max_bytes:
            cut = self._pending.rfind(b"\n", 0, MAX_CHUNK_BYTES)
            cut = cut + 1 if cut >= 0 else min(len(self._pending), MAX_CHUNK_BYTES)
            chunks.append(self._take(cut))
        return chunks, controls

    def finish(self) -> tuple[str | None, list[ControlLine]]:
        """Return the last chunk and a control line the stream ended with (no newline)."""
        controls = []
        self._dropping = False
        if self._partial:
            if self._partial.startswith(CONTROL_PREFIX):
                controls.append(parse_control_line(self._partial))
            else:
                self._pending += self._partial
            self._partial = b""
        return self.flush(final=True), controls

    def flush(self, *, final: bool = False) -> str | None:
        """Return everything pending (up to the last newline unless final), or None."""
        if not self._pending:
            return None
        if final:
            text = self._take(len(self._pending)) + self._decoder.decode(b"", final=True)
            return text or None
        cut = self._pending.rfind(b"\n")
        # A partial line is held back a little so a line is not split in two events.
        if cut < 0:
            if len(self._pending) < PARTIAL_LINE_BYTES:
                return None
            cut = len(self._pending) - 1
        return self._take(cut + 1) or None

    def _take(self, n: int) -> str:
        pending = self._pending
        head = bytes(pending[:n])
        del pending[:n]
        self.flushable = len(pending) >= PARTIAL_LINE_BYTES or b"\n" in pending
        return self._decoder.decode(head)

    def _parse(self, line: bytes) -> ControlLine:
        memo = self._memo
        if memo is not None and memo[0] == line:
            return memo[1]
        control = parse_control_line(line)
        if len(line) <= MEMO_LINE_BYTES:
            self._memo = (line, control)
        return control

    def _extract_controls(self, data: bytes, controls: list[ControlLine]) -> bytes:
        # Control lines are whole lines starting at a line start; a partial line that may
        # still become one is held back until its newline arrives.
        buf = self._partial + data
        self._partial = b""
        out = bytearray()
        pos = 0
        if self._dropping:  # the rest of an oversized control line
            end = buf.find(b"\n")
            if end < 0:
                return b""
            self._dropping = False
            self._line_start = True
            pos = end + 1
        while pos < len(buf):
            end = buf.find(b"\n", pos)
            piece = buf[pos:] if end < 0 else buf[pos : end + 1]
            maybe_control = self._line_start and (piece.startswith(CONTROL_PREFIX) or CONTROL_PREFIX.startswith(piece))
            if end < 0:
                if maybe_control and len(piece) <= MAX_CONTROL_LINE_BYTES:
                    self._partial = piece
                elif maybe_control:  # a control line too long to take: one protocol error, its bytes dropped
                    controls.append(oversized_control_line(piece))
                    self._dropping = True
                else:
                    out += piece
                    self._line_start = False
                break
            if maybe_control and piece.startswith(CONTROL_PREFIX):
                controls.append(self._parse(piece))
            else:
                out += piece
            self._line_start = True
            pos = end + 1
        return bytes(out)
