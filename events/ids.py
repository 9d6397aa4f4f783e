"""Identifier sources: ULIDs for events and approvals, short typeable ids for executions."""

import os
import time
from typing import Final

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_EXEC_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"
EXECUTION_ID_LENGTH: Final = 8


def new_ulid(now_ms: int | None = None) -> str:
    """Return a new ULID: 48 bits of milliseconds then 80 random bits, Crockford base32."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


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
