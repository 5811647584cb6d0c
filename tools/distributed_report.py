"""The tables of docs/benchmarks/distributed.md, printed from what docs/benchmarks/distributed/run.sh wrote.

    python tools/distributed_report.py docs/benchmarks/distributed/results [--peft DIR]

RESULTS holds <run>.json (tools/benchmark_sft.py), <run>.ranks.json and commands.txt (the launch line of
every run). Each run is set against the one-GPU run of its model (`smol_1gpu`, `l8b_1gpu`): tokens/s
(as a ratio where the arguments are the same), peak memory of every GPU; for the SmolLM2 runs, which
keep the global batch, also the loss (mean of every logged value, and of the last 4) and the learned
hard ranks. --peft DIR: the
directory with <run>.peft/adapter_model.safetensors (the PEFT export at the end of each run), to report
how far each export is from the one-GPU run's.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def launches(results: Path) -> dict[str, str]:
    """run name -> how it was launched (1 GPU, DDP or FSDP2, and the processes) from commands.txt."""
    out = {}
    for line in (results / "commands.txt").read_text().splitlines():
        match = re.match(r"== (\S+): accelerate launch (.*?) tools/benchmark_sft.py", line)
        if match:
            config = re.search(r"recipes/accelerate/(\w+)\.yaml", match.group(2))
            processes = re.search(r"--num_processes (\d+)", match.group(2)).group(1)
            out[match.group(1)] = f"{config.group(1).upper() if config else 'plain'} x{processes}"
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def export_difference(peft: Path, name: str, reference: str) -> str:
    """Largest difference of the PEFT export's tensors from the reference run's, relative to the largest value,
    over the modules exported at the same rank in both."""
    from safetensors.torch import load_file

    mine, theirs = (peft / f"{n}.peft" / "adapter_model.safetensors" for n in (name, reference))
    if not (mine.is_file() and theirs.is_file()):
        return "-"
    a, b = load_file(str(mine)), load_file(str(theirs))
    same = [k for k in a if k in b and a[k].shape == b[k].shape]
    scale = max(float(b[k].float().abs().max()) for k in b)
    worst = max((float((a[k].float() - b[k].float()).abs().max()) for k in same), default=0.0)
    return f"{worst / scale:.1e} ({len(same)} of {len(b)} tensors)"


def arguments(run: dict) -> list[str]:
    return [a for a in run["command"].split()[3:] if not a.startswith("--output.dir")]


def row_values(run: dict, base: dict, comparable: bool) -> list[str]:
    """`comparable`: the runs train on the same global batches, so their tokens/s are set against each other
    even where the arguments differ (the micro-batch split over the GPUs)."""
    extra = [a for a in arguments(run) if a not in arguments(base)]
    memory = run["peak_gpu_memory_per_process_gib"]
    ratio = f"{run['tokens_per_second'] / base['tokens_per_second']:.2f}x" if comparable or not extra else "-"
    return [f"`{' '.join(extra)}`" if extra else "", f"{run['tokens_per_second']:,.0f}", ratio,
            f"{run['step_seconds_median']:.3f}",
            ", ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(memory["allocated"], memory["reserved"]))]


def table(results: Path, names: list[str], reference: str, peft: Path | None, training: bool) -> str:
    """`training`: also set the losses and learned ranks against the reference's (runs of the same global batch)."""
    how = launches(results)
    runs = {n: json.loads((results / f"{n}.json").read_text()) for n in names}
    reports = {n: json.loads((results / f"{n}.ranks.json").read_text()) for n in names}
    ranks = {n: [row["hard_rank"] for row in reports[n]["layers"]] for n in names}
    base = runs[reference]
    header = ["run", "launch", "arguments beyond the first run's", "tokens/s (all GPUs)", "vs first",
              "step s (median)", "peak alloc / reserved GiB, per GPU"]
    if training:
        header += ["loss: mean of logged (vs first)", "last 4 logged (vs first)", "mean hard rank",
                   "layers at another rank (max diff)"]
    header.append("rank spread across processes")
    if peft is not None:
        header.append("PEFT export vs first: max diff / max value")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    base_losses = [x for _, x in base["losses"]]
    for n in names:
        run, r = runs[n], ranks[n]
        row = [n, how.get(n, "?"), *row_values(run, base, training)]
        if training:
            losses = [x for _, x in run["losses"]]
            loss, last = mean(losses), mean(losses[-4:])
            differ = [abs(a - b) for a, b in zip(r, ranks[reference]) if a != b]
            row += [f"{loss:.4f} ({100 * (loss / mean(base_losses) - 1):+.2f}%)",
                    f"{last:.4f} ({100 * (last / mean(base_losses[-4:]) - 1):+.2f}%)", f"{mean(r):.3f}",
                    f"{len(differ)} of {len(r)} ({max(differ, default=0)})"]
        row.append(f"{reports[n]['summary']['rank_spread_across_processes']:g}")
        if peft is not None:
            row.append(export_difference(peft, n, reference))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--peft", type=Path)
    args = parser.parse_args()
    present = sorted(p.name[: -len(".json")] for p in args.results.glob("*.json") if not p.name.endswith(".ranks.json"))
    for prefix, reference, training, title in (
        ("smol_", "smol_1gpu", True, "SmolLM2-135M-Instruct, NF4, the commonsense recipe, global batch 256"),
        ("l8b_", "l8b_1gpu", False, "Llama-3-8B shape (random weights), NF4, r_max 64, budget 16"),
    ):
        names = [reference] + [n for n in present if n.startswith(prefix) and n != reference]
        if reference in present:
            runs = json.loads((args.results / f"{reference}.json").read_text())
            print(f"### {title}\n\nFirst run: `{' '.join(arguments(runs))}`\n")
            print(f"{table(args.results, names, reference, args.peft if training else None, training)}\n")


if __name__ == "__main__":
    main()
