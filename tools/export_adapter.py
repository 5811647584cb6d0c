"""Same as `python -m qlrlora.export` / `qlrlora-export` (qlrlora/export.py documents it)."""

import sys

from qlrlora.export import main

if __name__ == "__main__":
    sys.exit(main())
