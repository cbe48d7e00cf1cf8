"""``python -m autotune.cli``: the ``autotune`` command line."""

from __future__ import annotations

import sys

from autotune.cli.entry import main

sys.exit(main())
