"""Run one Projector until killed: `python tests/helpers/project.py NATS_URL DATABASE TMP_DIR`."""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from actors.bus import connect_bus
from projections.projector import Projector


async def main() -> None:
    url, database, tmp = sys.argv[1:4]
    bus = await connect_bus(url)
    async with Projector(bus, database=Path(database), tmp_dir=Path(tmp)) as projector:
        await projector.wait()


asyncio.run(main())
