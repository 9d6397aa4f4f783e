"""The approval protocol's wire helpers, shared by the spawner, the validator and the approver.

They belong to the vocabulary, not to one actor: `derived_id` names the events that several actor
instances may record for the same cause (JetStream stores one), and `approval_line` is what an
agent reads on its stdin about its approvals (docs/approvals.md).
"""

import hashlib
from typing import Any, Final

import orjson

OUTCOMES: Final = ("approval.granted", "approval.denied", "approval.expired")
# A tool that exits with this code asks for an approval; the approver restarts it once decided
# (docs/approvals.md), so it is no failure for the watchdog to retry.
EXIT_CODE_APPROVAL: Final = 90
CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def encode(digest: bytes, alphabet: str, n: int) -> str:
    value = int.from_bytes(digest, "big")
    out = []
    for _ in range(n):
        out.append(alphabet[value & 31])
        value >>= 5
    return "".join(out)


def derived_id(base: str, salt: str) -> str:
    """A ULID derived from another event's id: same time part, random part from a hash.

    Whoever records "the `salt` of event `base`" uses the same id, so JetStream stores it once.
    """
    digest = hashlib.sha256(f"{base}|{salt}".encode()).digest()
    prefix = base[:10] if len(base) == 26 and base[0] in "01234567" else "0" + encode(digest[16:], CROCKFORD, 9)
    return prefix + encode(digest[:12], CROCKFORD, 16)


def approval_line(payload: bytes) -> tuple[str, str] | None:
    """(execution id, the line the agent gets on stdin) for an approval event, or None.

    approval.requested → `{"corral": "approval_registered", "approval_id", "question", "options"}`
    (only for approvals the agent asked for itself); granted / denied / expired →
    `{"corral": "approval_decision", "approval_id", "approved", "choice", "note", "decided_by"}`
    (`"expired": true` for an expiry).
    """
    try:
        raw = orjson.loads(payload)
        kind = raw["type"]
        data = raw["data"]
        execution_id = raw["execution_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    line: dict[str, Any]
    if kind == "approval.requested":
        if (data.get("source") or "agent") != "agent":
            return None
        line = {
            "corral": "approval_registered",
            "approval_id": data.get("approval_id"),
            "question": data.get("question"),
            "options": data.get("options") or [],
        }
    elif kind in OUTCOMES:
        line = {
            "corral": "approval_decision",
            "approval_id": data.get("approval_id"),
            "approved": kind == "approval.granted",
            "choice": data.get("choice"),
            "note": data.get("note"),
            "decided_by": data.get("decided_by"),
        }
        if kind == "approval.expired":
            line["expired"] = True
    else:
        return None
    return str(execution_id), orjson.dumps(line).decode() + "\n"
