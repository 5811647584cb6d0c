"""Render a benchmark run's files as the Markdown tables of docs/benchmarks, so no figure is typed by hand.

    python tools/benchmark_report.py [RUN_DIR] [--compare LABEL=RUN_DIR ...]

RUN_DIR holds what `tools/benchmark_sft.py` and the run wrote: benchmark.json, ranks.json and, when the
recipe evaluated, eval_before.json / eval_after.json. `--compare` adds a table of other runs (A/B
measurements, variants of the recipe): throughput as a ratio to the first run given, peak memory, and
average accuracy and adapter size where those runs recorded them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: {path}: not found") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}: not valid JSON ({e})") from None


def cost_table(bench: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in bench["versions"].items())
    rows = [
        ("command", f"`{bench['command']}`"),
        ("device", f"{bench['device']} x {bench['processes']}"),
        ("whole job (model, data, evaluation before and after, training, export)", f"{bench['wall_seconds']:.1f} s"),
        ("training", f"{bench['train_seconds']:.1f} s, {bench['train_steps']} optimizer steps"),
        ("trained tokens (non-padding)", f"{bench['trained_tokens']:,}"),
        ("training throughput", f"{bench['tokens_per_second']:,.0f} tokens/s"),
        ("peak GPU memory (allocated / reserved by PyTorch)",
         f"{bench['peak_gpu_memory_allocated_gib']:.1f} / {bench['peak_gpu_memory_reserved_gib']:.1f} GiB"),
        ("stack", versions),
    ]
    return "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])


def accuracy_table(before: dict, after: dict) -> str:
    lines = ["| task | before | after | change | questions |", "| --- | --- | --- | --- | --- |"]
    for task, b in before["tasks"].items():
        a = after["tasks"][task]
        if a["total"] != b["total"]:
            raise SystemExit(f"error: {task}: {b['total']} questions before but {a['total']} after")
        change = a["accuracy"] - b["accuracy"]
        lines.append(f"| {task} | {b['accuracy']:.3f} | {a['accuracy']:.3f} | {change:+.3f} | {b['total']} |")
    change = after["average"] - before["average"]
    lines.append(f"| **average** | {before['average']:.3f} | {after['average']:.3f} | {change:+.3f} | |")
    return "\n".join(lines)


def rank_tables(ranks: dict) -> str:
    summary, layers = ranks["summary"], ranks["layers"]
    histogram = Counter(r["hard_rank"] for r in layers)
    spread = ", ".join(f"{count} at rank {rank}" for rank, count in sorted(histogram.items()))
    kinds = (("mean_rank_attention", "attention"), ("mean_rank_mlp", "MLP"))
    means = [f"{summary[key]:.2f} {kind}" for key, kind in kinds if summary[key] is not None]
    head = [
        f"- hard ranks at the end: {spread} ({len(layers)} layers)",
        (f"- soft ranks from {min(r['rank'] for r in layers):.3f} to {max(r['rank'] for r in layers):.3f}; "
        f"mean {', '.join(means)}"),
        (f"- adapter parameters kept: {summary['live_adapter_params']:,} against a budget of "
        f"{summary['budget_adapter_params']:,}; final lambda {summary['lambda']:.4g}, "
        f"temperature {summary['temperature']:.3g}, after {summary['step']} steps"),
    ]
    projections = list(dict.fromkeys(r["module"].rsplit(".", 1)[-1] for r in layers))
    grid: dict[int, dict[str, int]] = {}
    for r in layers:
        grid.setdefault(r["layer"], {})[r["module"].rsplit(".", 1)[-1]] = r["hard_rank"]
    table = ["| layer | " + " | ".join(projections) + " |", "| --- |" + " --- |" * len(projections)]
    for layer in sorted(grid, key=lambda i: (i is None, i)):
        cells = [str(grid[layer].get(p, "")) for p in projections]
        table.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(head) + "\n\nHard rank by layer:\n\n" + "\n".join(table)


def compare_table(entries: list[tuple[str, Path]]) -> str:
    """One row per run directory: throughput as a ratio to the first, and accuracy / ranks where recorded."""
    header = ["run", "steps", "training s", "tokens/s", "x first", "peak allocated GiB"]
    evaluated = any((run_dir / "eval_after.json").exists() for _, run_dir in entries)
    ranked = any((run_dir / "ranks.json").exists() for _, run_dir in entries)
    header += ["average accuracy after"] * evaluated + ["hard ranks", "final lambda", "adapter params kept"] * ranked
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    base = _load(entries[0][1] / "benchmark.json")
    for label, run_dir in entries:
        bench = _load(run_dir / "benchmark.json")
        cells = [
            label, str(bench["train_steps"]), f"{bench['train_seconds']:.1f}", f"{bench['tokens_per_second']:,.0f}",
            f"{bench['tokens_per_second'] / base['tokens_per_second']:.2f}", f"{bench['peak_gpu_memory_allocated_gib']:.1f}",
        ]
        if evaluated:
            after = run_dir / "eval_after.json"
            cells.append(f"{_load(after)['average']:.3f}" if after.exists() else "-")
        if ranked:
            path = run_dir / "ranks.json"
            if path.exists():
                ranks = _load(path)
                hard = sorted({r["hard_rank"] for r in ranks["layers"]})
                spread = str(hard[0]) if len(hard) == 1 else f"{hard[0]} to {hard[-1]}"
                summary = ranks["summary"]
                cells += [spread, f"{summary['lambda']:.3g}", f"{summary['live_adapter_params']:,}"]
            else:
                cells += ["-"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(run_dir: Path | None, compare: list[tuple[str, Path]]) -> str:
    parts = []
    if run_dir is not None:
        parts.append("## Cost\n\n" + cost_table(_load(run_dir / "benchmark.json")))
        if (run_dir / "eval_before.json").exists() and (run_dir / "eval_after.json").exists():
            before, after = _load(run_dir / "eval_before.json"), _load(run_dir / "eval_after.json")
            parts.append("## Accuracy\n\n" + accuracy_table(before, after))
        parts.append("## Learned ranks\n\n" + rank_tables(_load(run_dir / "ranks.json")))
    if compare:
        parts.append("## Runs compared\n\n" + compare_table(compare))
    return "\n\n".join(parts) + "\n"


def _labelled(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=RUN_DIR, got {text!r}")
    return label, Path(path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="the run to report; leave out for --compare alone")
    parser.add_argument("--compare", type=_labelled, nargs="+", default=[], metavar="LABEL=RUN_DIR")
    args = parser.parse_args(argv)
    if args.run_dir is None and not args.compare:
        parser.error("give a RUN_DIR, --compare, or both")
    sys.stdout.write(render(args.run_dir, args.compare))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
