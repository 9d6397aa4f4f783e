"""The sweep of durable consumers no role owns, run by `corral up` as the provisioner.

NATS permissions cannot stop a role (`tap` too) from creating a durable consumer under a fresh
name (they see subjects, not payloads). `corral up`, which holds the provisioner's credentials,
looks at the consumers of CORRAL, CORRAL_OUTPUT and the health bucket at start and every
`[security] consumer_sweep` (default 60 s; 0: at start only), deletes every durable no role owns
(events/consumers.py) and records each as `consumer.removed` (docs/security.md, "The bus").
"""

import asyncio
import contextlib
import logging
from pathlib import Path

from actors.bus import Bus, connect_bus
from actors.runtime import instance_name
from events.auth import PROVISIONED_STREAMS, PROVISIONER, ROLES, credential_set
from events.consumers import Foreign, Janitor, sweep_id
from events.types import ConsumerRemoved

log = logging.getLogger(__name__)


def janitor_for(secret: str | None) -> Janitor:
    """The sweep, knowing every role's own durables and the projector's key (`secret`)."""
    return Janitor((name for role in ROLES.values() for name in role.durables), secret)


async def sweep_once(bus: Bus, janitor: Janitor, actor: str) -> list[Foreign]:
    """One sweep: delete, log and record every durable no role owns."""
    removed = await janitor.sweep(bus.js, PROVISIONED_STREAMS)
    for item in removed:
        log.warning("removed durable consumer %s of stream %s: %s", item.name, item.stream, item.reason)
        await bus.emit(sweep_id(), ConsumerRemoved(stream=item.stream, name=item.name, reason=item.reason), actor=actor)
    return removed


async def run_janitor(url: str, root: Path, interval_s: float, stopping: asyncio.Event) -> None:
    """Sweep at start and every `interval_s` (0: only at start) until `stopping` is set.

    Without the provisioner's credentials in the credentials file (a host that runs only some
    actors of a cluster), nothing is swept here: the host that provisions does it."""
    found = credential_set(root)
    credentials = found.get(PROVISIONER) if found is not None else None
    if credentials is None:
        log.info("no %s credentials: durable consumers are swept by the host that provisions", PROVISIONER)
        return
    projector = found.get("projector") if found is not None else None
    janitor = janitor_for(projector.password if projector is not None else None)
    bus = await connect_bus(url, name="corral-janitor", credentials=credentials, provision=False)
    actor = instance_name(PROVISIONER)
    try:
        while not stopping.is_set():
            try:
                await sweep_once(bus, janitor, actor)
            except Exception as exc:  # the server away, a leader election: the next sweep tries again
                log.warning("durable consumer sweep failed: %s", exc)
            if interval_s <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval_s)
    finally:
        await bus.close()
