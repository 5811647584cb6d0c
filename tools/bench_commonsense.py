"""LR-LoRA against LoRA, DoRA and AdaLoRA on the commonsense mixture (qlrlora/compare.py says how).

    python tools/bench_commonsense.py prepare DIR [--train-rows N] [--heldout-rows M] [--epochs E] [--model REF --gguf-file F]
    python tools/bench_commonsense.py run DIR --stage sweep|final [--parallel K] [--deadline S] [--start-by S]
    python tools/bench_commonsense.py run DIR --jobs METHOD:SEED:LR[:KEY=VALUE,...] ... [--parallel K] [--deadline S]
    python tools/bench_commonsense.py report DIR [--json PATH] [--markdown PATH] [--plot PATH] [--learning-rate LR]
    python tools/bench_commonsense.py crosscheck DIR METHOD:SEED:LR ...
    python tools/bench_commonsense.py losses DIR --learning-rate LR [--windows W]

`prepare` writes the data and the protocol into DIR; `run` trains and evaluates the jobs of a stage
(one process each, K at a time) into DIR/jobs/<job>/result.json; `report` computes commonsense.json
from those files and prints (or writes) the Markdown tables; `crosscheck` scores trained jobs of our layer
through PEFT's loader (qlrlora/compare.py's `crosscheck`); `losses` sets each job's late training loss
(from its log) beside its accuracies, to tell whether the spread between seeds is in what the runs trained.
A job of a method that learns its ranks may end with rank settings to change, e.g.
`lr_lora_budget_peft_init:0:3e-3:rank_lr=0.02,freeze_fraction=0.5`: a variant, reported as a method of its own
(`r_max=12` starts every layer at 12 components instead of the protocol's r_max, at the same scale).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from qlrlora.compare import (
    METHODS,
    Job,
    Protocol,
    crosscheck,
    late_losses,
    prepare,
    read_protocol,
    recipe_for,
    run_stage,
    stage_jobs,
    summarize,
    write_permuted_ranks,
)
from qlrlora.errors import QLRError
from qlrlora.io import atomic_write_json, atomic_write_text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir", type=Path)
    for f in dataclasses.fields(Protocol):
        if f.type in ("int", "float", "str", "str | None"):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=float if f.type == "float" else int if f.type == "int"
                           else str)
    p.add_argument("--learning-rates", type=float, nargs="+")
    p.add_argument("--extra-seeds", type=int, nargs="+")
    p.add_argument("--control-seeds", type=int, nargs="+")
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", choices=["sweep", "final"])
    which.add_argument("--jobs", nargs="+", metavar="METHOD:SEED:LR[:KEY=VALUE,...]",
                       help="run these jobs instead of a stage (KEY=VALUE: rank settings of a variant)")
    r.add_argument("--parallel", type=int, default=4)
    r.add_argument("--deadline", type=float, default=float("inf"), help="kill jobs still running after S seconds")
    r.add_argument("--start-by", type=float, default=float("inf"), help="start no job after S seconds")
    c = sub.add_parser("crosscheck", help="score trained jobs of our layer through PEFT's loader")
    c.add_argument("dir", type=Path)
    c.add_argument("jobs", nargs="+", metavar="METHOD:SEED:LR")
    lo = sub.add_parser("losses", help="late training losses beside the accuracies, job by job and against LoRA")
    lo.add_argument("dir", type=Path)
    lo.add_argument("--learning-rate", type=float, required=True)
    lo.add_argument("--windows", type=int, default=4, help="how many of the last logged losses to average")
    s = sub.add_parser("report")
    s.add_argument("dir", type=Path)
    s.add_argument("--json", type=Path)
    s.add_argument("--markdown", type=Path)
    s.add_argument("--plot", type=Path, help="the learned ranks of LR-LoRA's seed 0, as a PNG")
    s.add_argument("--command", help="how the jobs were run, recorded in the JSON (default: this report command)")
    s.add_argument("--learning-rate", type=float,
                   help="report every method at this one rate instead of each at its rate chosen on the held-out slice")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            given = {k: v for k, v in vars(args).items() if k not in ("command", "dir") and v is not None}
            counts = prepare(args.dir, Protocol(**given))
            print(json.dumps({"protocol": dataclasses.asdict(read_protocol(args.dir)), "rows": counts}, indent=2))
        elif args.command == "run":
            jobs = stage_jobs(args.dir, args.stage, read_protocol(args.dir)) if args.stage else explicit_jobs(args)
            status = run_stage(args.dir, jobs, args.parallel, args.deadline, args.start_by)
            print(json.dumps(status, indent=2))
            return 0 if all(v == "done" for v in status.values()) else 1
        elif args.command == "crosscheck":
            for job in _parsed_jobs(args.jobs):
                result = crosscheck(args.dir, job)
                print(json.dumps({"job": job.name, "validation": result["validation"]["average"],
                                  "heldout": result["heldout"]["average"]}), flush=True)
        elif args.command == "losses":
            print(losses_markdown(late_losses(args.dir, args.learning_rate, args.windows)))
        else:
            summary = summarize(args.dir, command=args.command or " ".join(["python", "tools/bench_commonsense.py", *argv]),
                                learning_rate=args.learning_rate)
            if args.json:
                atomic_write_json(args.json, summary)
            text = markdown(summary)
            if args.markdown:
                atomic_write_text(args.markdown, text)
            else:
                print(text)
            if args.plot and summary["learned_ranks"]:
                plot_ranks(summary, args.plot)
    except QLRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def explicit_jobs(args) -> list[Job]:
    jobs = _parsed_jobs(args.jobs)
    protocol = read_protocol(args.dir)
    for job in jobs:
        if job.rank:  # a variant's settings are checked before any job starts: the rank section they make
            recipe_for(args.dir, job, protocol)
    for lr in sorted({j.lr for j in jobs if j.method == "permuted_ranks_fixed"}):
        write_permuted_ranks(args.dir, lr, protocol.data_seed)
    return jobs


def _setting(value: str) -> float | bool:
    """A variant's setting as written in a job spec: true / false, or a number."""
    return {"true": True, "false": False}[value] if value in ("true", "false") else float(value)


def _parsed_jobs(specs: list[str]) -> list[Job]:
    jobs = []
    for spec in specs:
        try:
            method, seed, lr, *settings = spec.split(":", 3)
            rank = {k: _setting(v) for k, v in (pair.split("=") for pair in settings[0].split(","))} if settings else {}
            job = Job(method, int(seed), float(lr) if method != "base" else None, rank)
        except ValueError:
            raise QLRError(f"--jobs: {spec!r}: expected METHOD:SEED:LR, e.g. lora:0:1e-3, or with rank settings "
                           "METHOD:SEED:LR:KEY=VALUE[,KEY=VALUE], e.g. lr_lora_budget:0:3e-3:rank_lr=0.02 "
                           "or lr_lora_budget:0:3e-3:order_components=true") from None
        if method not in METHODS:
            raise QLRError(f"--jobs: {spec!r}: unknown method; expected one of {', '.join(METHODS)}")
        jobs.append(job)
    return jobs


def markdown(summary: dict) -> str:
    methods = summary["methods"]
    tasks = list(next(iter(methods.values()))["tasks"]) if methods else []
    lines = ["| method | lr | seeds | avg | std | vs lora | " + " | ".join(tasks)
             + " | adapter params | train s | tokens/s | peak GiB | cards |",
             "| --- " * (11 + len(tasks)) + "|"]
    lora = methods.get("lora")
    for name in [*(m for m in METHODS if m in methods), *(m for m in methods if m not in METHODS)]:  # variants last
        m = methods[name]
        delta = ""
        if lora and name != "lora":
            delta = f"{m['avg'] - lora['avg']:+.3f}{_noise(name, m['std'], lora['std'])}"
        std = "" if m["std"] is None else f"{m['std']:.4f}"
        lr = "" if m["lr"] is None else f"{m['lr']:g}"
        train = "" if m["train_s"] is None else f"{m['train_s']:.0f}"
        speed = "" if m["tokens_per_s"] is None else f"{m['tokens_per_s']:,.0f}"
        peak = "" if m["peak_gib"] is None else f"{m['peak_gib']:.1f}"
        cells = [name, lr, ",".join(map(str, m["seeds"])), f"{m['avg']:.4f}", std, delta,
                 *(f"{m['tasks'][t]:.3f}" for t in tasks), f"{m['adapter_params']:,}", train, speed, peak,
                 _cards(m["cards"])]
        lines.append("| " + " | ".join(cells) + " |")
    out = ["## Validation accuracy (first {} questions per task; learning rates {})".format(
        summary["protocol"]["val_per_task"], summary["learning_rates"]), "",
           *lines, ""]
    sweep = summary["sweep_heldout"]
    if sweep:
        rates = sorted({lr for values in sweep.values() for lr in values}, key=float)
        heading = "Learning-rate sweep: accuracy" if len(rates) > 1 else f"Accuracy at learning rate {rates[0]}"
        out += [f"## {heading} on the held-out slice of the training mixture (seed 0)", "",
                "| method | " + " | ".join(rates) + " |", "| --- " * (1 + len(rates)) + "|"]
        for name, values in sweep.items():
            out.append(f"| {name} | " + " | ".join(_sweep_cell(values.get(r)) for r in rates) + " |")
        out.append("")
    if summary.get("paired"):
        out += ["## Paired by seed: method minus baseline (a seed fixes the data order)", "",
                "| method | baseline | seeds | validation per seed | mean | std | held-out per seed | mean | std |",
                "| --- " * 9 + "|"]
        for pair in summary["paired"]:
            cells = [pair["method"], pair["baseline"], ",".join(map(str, pair["seeds"]))]
            for split in ("validation", "heldout"):
                d = pair[split]
                cells += [" ".join(map(_signed, d["per_seed"])), _signed(d["mean"]),
                          "" if d["std"] is None else f"{d['std']:.4f}"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    diff = summary["differentiation"]
    if diff:
        out += ["## How the learned ranks differ (LR-LoRA, budget mode)", "", "| measure | value |", "| --- | --- |"]
        for key, value in diff.items():
            out.append(f"| {key} | {'n/a' if value is None else f'{value:.3f}' if isinstance(value, float) else value} |")
        out += ["", rank_table(summary["learned_ranks"]), ""]
    return "\n".join(out)


def losses_markdown(losses: dict) -> str:
    """The tables of `late_losses`: every job, then each method minus LoRA seed by seed."""
    corr = {k: "n/a" if losses[k] is None else f"{losses[k]:+.3f}" for k in ("spearman_validation", "spearman_heldout")}
    out = [f"## Late training loss and accuracy at learning rate {losses['lr']:g}", "",
           f"Late loss: the mean of the last {losses['windows']} of {losses['logged_windows']} logged training losses. "
           f"Spearman correlation with the loss across {len(losses['jobs'])} jobs: validation {corr['spearman_validation']}, "
           f"held-out {corr['spearman_heldout']}."
           + (f" Skipped (a shorter log): {', '.join(losses['skipped'])}." if losses["skipped"] else ""), "",
           "| job | late loss | validation | held-out |", "| --- | --- | --- | --- |"]
    out += [f"| {j['job']} | {j['late_loss']:.4f} | {j['validation']:.4f} | {j['heldout']:.4f} |" for j in losses["jobs"]]
    if losses["against_lora"]:
        out += ["", "### Minus LoRA of the same seed", "", "| method | seed | late loss | validation | held-out |",
                "| --- | --- | --- | --- | --- |"]
        out += [f"| {d['method']} | {d['seed']} | {_signed(d['late_loss'])} | {_signed(d['validation'])} | "
                f"{_signed(d['heldout'])} |" for d in losses["against_lora"]]
    return "\n".join(out)


def _cards(counted: dict[str, int]) -> str:
    """`{"NVIDIA H100 80GB HBM3": 3, "not recorded": 2}` -> "H100 80GB HBM3 x3, not recorded x2"."""
    return ", ".join(f"{name.removeprefix('NVIDIA ')} x{n}" for name, n in counted.items())


def _noise(name: str, std: float | None, lora_std: float | None) -> str:
    """The seed noise of a difference from LoRA: the larger std where both are seeded, else whose it is."""
    if std is not None and lora_std is not None:
        return f" (seed std {max(std, lora_std):.3f})"
    if std is None and lora_std is None:
        return " (one seed each: noise not measured)"
    if std is None:
        return f" (seed std {lora_std:.3f} of lora; {name} has one seed)"
    return f" (seed std {std:.3f}; lora has one seed)"


def _signed(x: float) -> str:
    """A difference to four places, rounded first so that -0.00001 prints +0.0000, not -0.0000."""
    return f"{round(x, 4) + 0.0:+.4f}"


def _sweep_cell(score: float | str | None) -> str:
    """A held-out accuracy, or where the run diverged, or nothing for a rate not run."""
    return "" if score is None else score if isinstance(score, str) else f"{score:.4f}"


def rank_table(learned: dict[str, list[int]]) -> str:
    """Seed 0's hard rank by block and projection (other seeds after a slash)."""
    from qlrlora.model import layer_index

    projections = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in learned))
    blocks = sorted({layer_index(name) for name in learned})
    cells = {(layer_index(n), n.rsplit(".", 1)[-1]): "/".join(map(str, r)) for n, r in learned.items()}
    lines = ["| layer | " + " | ".join(projections) + " |", "| --- " * (1 + len(projections)) + "|"]
    lines += [f"| {b} | " + " | ".join(cells.get((b, p), "") for p in projections) + " |" for b in blocks]
    return "\n".join(lines)


def plot_ranks(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlrlora.model import layer_index, module_kind
    from qlrlora.report import KIND_COLORS, MARKERS

    by_projection: dict[str, list[tuple[int, int]]] = {}
    for name, ranks in summary["learned_ranks"].items():
        by_projection.setdefault(name.rsplit(".", 1)[-1], []).append((layer_index(name), ranks[0]))
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, (projection, points) in enumerate(by_projection.items()):
        points.sort()
        kind = module_kind(projection)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=MARKERS[i % len(MARKERS)],
                color=KIND_COLORS[kind], alpha=0.8, linewidth=1, label=f"{projection} ({kind})")
    diff = summary["differentiation"]
    ax.set_xlabel("layer index")
    ax.set_ylabel("learned hard rank (seed 0)")
    model = summary["protocol"].get("gguf_file") or Path(summary["model"]).name
    ax.set_title(f"LR-LoRA on {model}: coefficient of variation {diff['cv']:.2f}, "
                 f"MLP / attention {diff['mlp_over_attention'] or float('nan'):.2f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
