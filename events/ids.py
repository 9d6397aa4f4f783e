"""Identifier sources: ULIDs for events and approvals, short typeable ids for executions."""

import itertools
import os
import time
from typing import Final

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every pair of Crockford characters, indexed by the 10 bits they encode: a ULID is 13 lookups.
# (base64.b32encode is a Python loop in 3.11, and slower than this.)
_PAIRS: Final = tuple(high + low for high in _CROCKFORD for low in _CROCKFORD)
_RANDOM_BITS: Final = 80
_RANDOM_MASK: Final = (1 << _RANDOM_BITS) - 1
_EXEC_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"
EXECUTION_ID_LENGTH: Final = 8


def _seeded_counter() -> "itertools.count[int]":
    return itertools.count(int.from_bytes(os.urandom(_RANDOM_BITS // 8), "big"))


# The 80 "random" bits of a ULID: one random seed per process, then a counter (the monotonic
# variant of the ULID spec): ids of one process never repeat and sort in creation order within a
# millisecond, ids of two processes collide with the odds of two random 80-bit values, and no
# id costs a getrandom(2) call. next() on an itertools.count is atomic under the GIL (threads);
# a forked child draws a seed of its own.
_sequence = _seeded_counter()
_time_part: tuple[int, str] = (-1, "")  # the last millisecond and its 10 characters (one tuple: thread-safe)


def _reseed() -> None:
    global _sequence
    _sequence = _seeded_counter()


os.register_at_fork(after_in_child=_reseed)


def new_ulid(now_ms: int | None = None) -> str:
    """Return a new ULID: 48 bits of milliseconds then 80 bits (a per-process random seed plus a
    counter), in Crockford base32: 26 characters, the first at most 7."""
    global _time_part
    ms = (time.time_ns() // 1_000_000 if now_ms is None else now_ms) & 0xFFFF_FFFF_FFFF
    p = _PAIRS
    cached = _time_part
    if cached[0] != ms:
        cached = _time_part = (
            ms,
            p[ms >> 40] + p[(ms >> 30) & 1023] + p[(ms >> 20) & 1023] + p[(ms >> 10) & 1023] + p[ms & 1023],
        )
    r = next(_sequence) & _RANDOM_MASK
    return (
        cached[1]
        + p[r >> 70]
        + p[(r >> 60) & 1023]
        + p[(r >> 50) & 1023]
        + p[(r >> 40) & 1023]
        + p[(r >> 30) & 1023]
        + p[(r >> 20) & 1023]
        + p[(r >> 10) & 1023]
        + p[r & 1023]
    )


def new_execution_id() -> str:
    """Return a short execution id: 8 lowercase Crockford characters (40 random bits), no dots."""
    value = int.from_bytes(os.urandom(5), "big")
    out = []
    for _ in range(EXECUTION_ID_LENGTH):
        out.append(_EXEC_ALPHABET[value & 31])
        value >>= 5
    return "".join(out)


def is_valid_execution_id(text: str) -> bool:
    """Tell whether text can be an execution id (or a prefix of one)."""
    return bool(text) and len(text) <= 64 and all(c in _EXEC_ALPHABET for c in text)


def new_approval_id() -> str:
    """Return an approval id: `AP-` and six characters."""
    return "AP-" + new_execution_id()[:6].upper()
