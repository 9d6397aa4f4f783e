"""Run one Projector until killed: `python tests/helpers/project.py NATS_URL DATABASE TMP_DIR [UNTIL_SEQ]`.

With UNTIL_SEQ it prints `caught-up` once that log position is applied, then keeps running until killed.
"""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from actors.bus import connect_bus
from projections.projector import Projector


async def main() -> None:
    url, database, tmp = sys.argv[1:4]
    until = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    bus = await connect_bus(url)
    async with Projector(bus, database=Path(database), tmp_dir=Path(tmp)) as projector:
        if until and await projector.wait_for_position(until, timeout_s=600):
            print("caught-up", flush=True)
        await projector.wait()


asyncio.run(main())
