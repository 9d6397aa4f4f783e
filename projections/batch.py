"""A batch of log messages gathered for one DuckDB transaction, prepared as the messages arrive.

The projector's reader (the event loop) has time to spare while the previous batch is applied in
a worker thread; the applier has none. So what can be done per message without DuckDB is done
here, on arrival: the NDJSON line `read_json` loads (the envelope with its stream sequence put in
front) and the pick of the events that change an execution's state.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

from projections.state import STATE_EVENT_TYPES

_TYPE_START = len("corral.evt.")  # the execution id starts here; it holds no dots
_STATE_KINDS = frozenset(kind.encode() for kind in STATE_EVENT_TYPES)


class Gathered:
    """Messages in stream order, each above the applied position, with what the applier needs."""

    __slots__ = ("items", "lifecycle", "lines", "size")

    def __init__(self) -> None:
        self.items: list[tuple[int, bytes, bytes]] = []  # (seq, subject, payload)
        self.size = 0  # bytes of payload gathered (batches are cut by size too: big output chunks)
        self.lines: list[bytes] = []  # NDJSON lines for the events table
        self.lifecycle: list[tuple[int, str, bytes]] = []  # the messages projections.state folds

    def add(self, seq: int, subject: bytes, payload: bytes) -> None:
        self.items.append((seq, subject, payload))
        self.size += len(payload)
        if payload[:1] == b"{" and len(payload) > 2:
            self.lines.append(b'{"seq":%d,%s' % (seq, payload[1:]))
        if not subject.endswith(b".output") and subject[subject.find(b".", _TYPE_START) + 1 :] in _STATE_KINDS:
            self.lifecycle.append((seq, subject.decode(), payload))

    @property
    def last_seq(self) -> int:
        return self.items[-1][0]

    def __len__(self) -> int:
        return len(self.items)

    def prepare(self, file: Path) -> "Prepared":
        """Write the NDJSON lines to `file`; return what an applier needs besides."""
        file.write_bytes(b"\n".join(self.lines))
        items = self.items
        return Prepared(file, items[0][0], items[-1][0], len(items), self.lifecycle, lambda: items)


class Prepared:
    """A gathered batch as an applier takes it (in this process or in projections.worker's): its
    NDJSON file, first and last sequence, size, the state-changing subset, and a way to get the
    messages themselves, wanted only when some line of the file was not loaded (rejects)."""

    __slots__ = ("count", "file", "first_seq", "items", "last_seq", "lifecycle")

    def __init__(
        self,
        file: Path,
        first_seq: int,
        last_seq: int,
        count: int,
        lifecycle: list[tuple[int, str, bytes]],
        items: Callable[[], Sequence[tuple[int, bytes, bytes]]],
    ) -> None:
        self.file = file
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.count = count
        self.lifecycle = lifecycle
        self.items = items
