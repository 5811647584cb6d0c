"""Same as `python -m qlrlora.merge` / `qlrlora-merge` (qlrlora/merge.py documents it)."""

import sys

from qlrlora.merge import main

if __name__ == "__main__":
    sys.exit(main())
