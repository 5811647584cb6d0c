"""Accuracy and closeness to the trained model of every export and merge of one run (qlrlora/fidelity.py).

    python tools/compare_exports.py RUN_DIR [--data commonsense] [--max-per-task N] [--no-llamacpp]

Prints the Markdown table of docs/export.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlrlora.errors import QLRError
from qlrlora.evaluate import load_mc_tasks
from qlrlora.fidelity import measure, table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", default="commonsense", help='"commonsense" or question files')
    parser.add_argument("--max-per-task", type=int, default=50)
    parser.add_argument("--no-llamacpp", action="store_true", help="leave out the GGUF row (needs llama-cpp-python)")
    args = parser.parse_args(argv)
    try:
        tasks = load_mc_tasks(args.data, max_per_task=args.max_per_task)
        questions = [q for qs in tasks.values() for q in qs]
        rows = measure(args.run, questions, with_llamacpp=not args.no_llamacpp)
    except QLRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows, len(questions)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
