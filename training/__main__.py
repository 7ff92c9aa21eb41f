"""``python -m training ...``: see ``python -m training --help``."""

from training.cli import main

raise SystemExit(main())
