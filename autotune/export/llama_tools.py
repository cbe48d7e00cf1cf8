"""llama.cpp's command-line tools (``llama-quantize``), where they are built.

``llama-cpp-python`` ships llama.cpp's libraries, not its tools; ``scripts/llama-tools``
builds them from the same vendored source into ``.venv/llama.cpp/bin``. They are looked for
in ``$AUTOTUNE_LLAMA_TOOLS``, then beside the running Python's environment, then on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def find_tool(name: str) -> Path | None:
    """The executable ``name`` (e.g. ``llama-quantize``), or ``None`` where it is not built."""
    for folder in (os.environ.get("AUTOTUNE_LLAMA_TOOLS"), Path(sys.prefix) / "llama.cpp" / "bin"):
        if folder:
            candidate = Path(folder) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    found = shutil.which(name)
    return Path(found) if found else None
