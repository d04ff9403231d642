"""Which code and which command produced a result: the git commit of the package's checkout (with a
mark when it has uncommitted changes) and the command line, stamped under every report section."""

from __future__ import annotations

import functools
import shlex
import subprocess
import sys
from pathlib import Path

__all__ = ["command_line", "source_commit", "stamp"]


@functools.lru_cache(maxsize=1)
def source_commit() -> str:
    """``<short sha>`` of the checkout the package runs from (``+`` when it has uncommitted changes), or
    ``release <version>`` for an installed wheel outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return sha + ("+" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"release {version('warplca')}"
        except PackageNotFoundError:
            return "unknown"


def command_line() -> str:
    """The command that is running, as a shell line (``python train.py …``)."""
    args = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    if args[0].endswith(".py"):
        args.insert(0, "python")
    return shlex.join(args)


def stamp() -> str:
    """One markdown line: the commit and the command that produced what precedes it."""
    return f"<sub>Produced by commit `{source_commit()}` with `{command_line()}`.</sub>"
