"""`python -m quotagate.coordinator` and the `quotagate` script.

A client-only install (httpx alone) has the script too, but not what the commands need:
it says which extra to install rather than failing on an import.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as run
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] == "quotagate":
            raise
        sys.exit(
            f"quotagate: the command line needs the server extra (no module named "
            f"{exc.name!r}): pip install 'quotagate[server]'"
        )
    run()


if __name__ == "__main__":  # not when a worker process re-imports the main module
    main()
