"""A batch of log messages gathered for one DuckDB transaction, prepared as the messages arrive.

The projector's reader (the event loop) has time to spare while the previous batch is applied in
a worker thread; the applier has none. So what can be done per message without DuckDB is done
here, on arrival: the NDJSON line `read_json` loads (the envelope with its stream sequence put in
front) and the pick of the events that change an execution's state.
"""

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

from projections.state import STATE_EVENT_TYPES

# The core log is applied in two lanes (projections/projector.py): output chunks, which may come in
# floods, and every other event, which must not wait behind them (`corral ps`, issue 20).
OUTPUT_LANE = "output"
OTHER_LANE = "other"
LANES = (OTHER_LANE, OUTPUT_LANE)
_OUTPUT_SUFFIX = b".output"


def lane_of(subject: bytes) -> str:
    return OUTPUT_LANE if subject.endswith(_OUTPUT_SUFFIX) else OTHER_LANE


def lane_row(stream: str, lane: str) -> str:
    """The projector_position row of one lane of a stream (its `stream` column)."""
    return f"{stream}/{lane}"


_TYPE_START = len("corral.evt.")  # the execution id starts here; it holds no dots
_STATE_KINDS = frozenset(kind.encode() for kind in STATE_EVENT_TYPES)


class Gathered:
    """Messages in stream order, each above the applied position, with what the applier needs."""

    __slots__ = ("idle_through", "items", "lifecycle", "lines", "size", "through")

    def __init__(self) -> None:
        self.items: list[tuple[int, bytes, bytes]] = []  # (seq, subject, payload)
        self.size = 0  # bytes of payload gathered (batches are cut by size too: big output chunks)
        self.lines: list[bytes] = []  # NDJSON lines for the events table
        self.lifecycle: list[tuple[int, str, bytes]] = []  # the messages projections.state folds
        # A lane of the core log (projections/projector.py): every message of the lane up to this
        # stream sequence is in this batch or an earlier one (0: up to the batch's last message).
        self.through = 0
        self.idle_through = 0  # see Prepared

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
        prepared = Prepared(file, items[0][0], items[-1][0], len(items), self.lifecycle, lambda: items)
        prepared.through = self.through
        return prepared

    def spill(self, file: Path) -> "Prepared":
        """Write the batch to disk (its NDJSON lines to `file`, the messages beside it, read back
        only if some line is not loaded): what stays in memory is its bounds (a lane's backlog)."""
        prepared = self.prepare(file)
        sidecar = file.with_name(file.name + ".items")
        sidecar.write_bytes(pickle.dumps(self.items, protocol=pickle.HIGHEST_PROTOCOL))
        prepared.items = lambda: pickle.loads(sidecar.read_bytes())  # our own file
        prepared.size = self.size
        prepared.spilled = (file, sidecar)
        return prepared


class Prepared:
    """A gathered batch as an applier takes it (in this process or in projections.worker's): its
    NDJSON file, first and last sequence, size, the state-changing subset, and a way to get the
    messages themselves, wanted only when some line of the file was not loaded (rejects)."""

    __slots__ = (
        "count",
        "file",
        "first_seq",
        "idle_through",
        "items",
        "lane",
        "last_seq",
        "lifecycle",
        "size",
        "spilled",
        "through",
    )

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
        # A lane of the core log (projections/projector.py, appliers.BatchApplier): which one, how
        # far the lane is complete with this batch, and how far the other lane is (it holds nothing)
        self.lane: str | None = None
        self.through = 0
        self.idle_through = 0
        self.size = 0
        self.spilled: tuple[Path, Path] | None = None  # its files, when spilled to disk

    def __len__(self) -> int:
        return self.count

    @property
    def upto(self) -> int:
        """The lane is complete up to here once this batch is applied."""
        return max(self.through, self.last_seq)
