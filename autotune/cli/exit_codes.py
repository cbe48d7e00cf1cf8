"""The command line's exit codes."""

from __future__ import annotations

EXIT_OK, EXIT_BROKEN, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
