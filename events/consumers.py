"""Whose durable consumer is this: the names Corral's roles own, and the sweep that removes the rest.

NATS permissions see subjects, not payloads: any user that may create an ephemeral consumer (every
role, `tap` too, events/auth.py) can create a durable under a name no role owns. The process that
starts a system holds the provisioner's credentials; it sweeps the streams at start and every
`[security] consumer_sweep` seconds (corral/system.py) and deletes every durable no role owns,
recording each as a `consumer.removed` event (docs/security.md, "The bus").

Owned names: the actors' fixed durables (`Role.durables` in events/auth.py) and the projectors'
`projector_<id>_<mac>`, where `id` is a digest of the projector's host and DuckDB path and `mac`
an HMAC of `id` keyed with the projector's password: whoever holds that password verifies a name
without knowing the host or the path, so two `corral up` sharing a server keep each other's.
"""

import hashlib
import hmac
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError

PROJECTOR_PREFIX: Final = "projector_"
_ID_LEN: Final = 12
_MAC_LEN: Final = 16
# An ephemeral (or ordered) consumer names no durable and goes away after this long without a
# client: Corral's own use seconds to minutes. A longer threshold is swept like a durable.
MAX_EPHEMERAL_INACTIVE_S: Final = 3600.0
_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"
_LIST_PAGE: Final = 256  # JetStream's page of CONSUMER.LIST


def _mac(ident: str, secret: str) -> str:
    return hmac.new((secret or "corral").encode(), ident.encode(), hashlib.sha256).hexdigest()[:_MAC_LEN]


def projector_consumer_name(database: Path, secret: str = "") -> str:
    """The durable consumer name of the projector writing this DuckDB file (on this host).

    `secret`: the projector's NATS password (empty on a server without users)."""
    where = f"{socket.gethostname()}:{database.resolve()}".encode()
    ident = hashlib.sha1(where).hexdigest()[:_ID_LEN]
    return f"{PROJECTOR_PREFIX}{ident}_{_mac(ident, secret)}"


def legacy_projector_consumer_name(database: Path, secret: str = "") -> str:
    """The name Corral gave the same projector's durable before (an HMAC of host and path): the
    projector deletes it at start; it resumes from its DuckDB file's position, not the durable's."""
    where = f"{socket.gethostname()}:{database.resolve()}".encode()
    if secret:
        return f"{PROJECTOR_PREFIX}{hmac.new(secret.encode(), where, hashlib.sha256).hexdigest()[:20]}"
    return f"{PROJECTOR_PREFIX}{hashlib.sha1(where).hexdigest()[:12]}"


def is_projector_consumer(name: str, secret: str = "") -> bool:
    """True when `name` is a projector durable made with this projector password."""
    if not name.startswith(PROJECTOR_PREFIX):
        return False
    ident, _, mac = name[len(PROJECTOR_PREFIX) :].partition("_")
    return len(ident) == _ID_LEN and hmac.compare_digest(mac, _mac(ident, secret))


def is_durable(config: ConsumerConfig) -> bool:
    """A consumer that outlives its client: a durable name, or no (or a long) inactivity threshold."""
    if config.durable_name:
        return True
    threshold = config.inactive_threshold
    return not threshold or threshold > MAX_EPHEMERAL_INACTIVE_S


def sweep_id() -> str:
    """The id the `consumer.removed` events are recorded on (8 characters, like an execution's)."""
    digest = int.from_bytes(hashlib.sha256(b"corral|consumers").digest()[:5], "big")
    return "".join(_ALPHABET[(digest >> (5 * i)) & 31] for i in range(8))


@dataclass(frozen=True)
class Foreign:
    """A durable consumer no role owns, and why it was judged so."""

    stream: str
    name: str
    reason: str


class Janitor:
    """Find (and delete) the durables no role owns on some streams.

    `owned`: the actors' fixed durable names. `projector_secret`: the projector's password; None
    when it is unknown here, and then no `projector_…` name is touched (it cannot be verified)."""

    def __init__(self, owned: Iterable[str], projector_secret: str | None) -> None:
        self.owned = frozenset(owned)
        self.projector_secret = projector_secret

    def reason(self, name: str, config: ConsumerConfig) -> str | None:
        """Why this consumer goes, or None when it stays."""
        if not is_durable(config) or name in self.owned:
            return None
        if name.startswith(PROJECTOR_PREFIX):
            if self.projector_secret is None or is_projector_consumer(name, self.projector_secret):
                return None
            return "a projector_ name that does not verify with the projector's key"
        if config.durable_name:
            return "a durable no role owns"
        return f"no durable name, but kept {config.inactive_threshold or 'forever'}s without a client"

    async def foreign(self, js: JetStreamContext, streams: Iterable[str]) -> list[Foreign]:
        found = []
        for stream in streams:
            offset = 0
            while True:
                try:
                    page = await js.consumers_info(stream, offset=offset or None)
                except NotFoundError:
                    break  # not provisioned (CORRAL_OUTPUT without [retention])
                for info in page:
                    why = self.reason(info.name, info.config)
                    if why is not None:
                        found.append(Foreign(stream, info.name, why))
                if len(page) < _LIST_PAGE:
                    break
                offset += len(page)
        return found

    async def sweep(self, js: JetStreamContext, streams: Iterable[str]) -> list[Foreign]:
        """Delete every durable no role owns on `streams`; return those deleted."""
        removed = []
        for item in await self.foreign(js, streams):
            try:
                await js.delete_consumer(item.stream, item.name)
            except NotFoundError:
                continue  # gone meanwhile
            removed.append(item)
        return removed
