"""A command's result: text for people, JSON with ``--json``."""

from __future__ import annotations

import argparse
import json
from typing import Any


def emit(args: argparse.Namespace, text: str, data: Any) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text``."""
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)
