"""Allow `python -m corral`."""

from corral.entry import main

raise SystemExit(main())
