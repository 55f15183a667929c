"""The ``caltech`` command (and ``python -m caltech_cli``): ``cli.main`` in an interpreter set up
for one run."""

import gc
import sys
from types import ModuleType


def main() -> None:
    """Run ``caltech`` with the command line of this process."""
    import_cli().main()


def import_cli() -> ModuleType:
    """Import the tool with the garbage collector paused, then freeze what the imports made.

    torch, torchvision and Lightning make about a million long-lived objects as they load. The
    collector's full passes over them cost about a second while importing and another while the
    interpreter exits, most of a one-image ``caltech predict``'s own time on a 2-core CPU
    (``benchmarks/startup.py``). ``gc.freeze`` moves them out of its sight; what the run itself
    makes is collected as usual, and forked loader workers share those pages longer. Only the
    first import is frozen: a second run in the same process (a notebook, a sweep) leaves the
    first run's garbage to the collector.
    """
    first = "caltech_cli.cli" not in sys.modules
    collecting = gc.isenabled()
    if first:
        gc.disable()
    try:
        from caltech_cli import cli
    finally:
        if first:
            gc.freeze()
            if collecting:
                gc.enable()
    return cli


if __name__ == "__main__":
    main()
