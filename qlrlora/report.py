"""The rank report: learned rank per adapted layer as ranks.json, a plot (ranks.png) and a table.

What the trainer logs and the benchmark reads about ranks is computed here, from the layers and the
controller's state; the controller (regularizer.py) only moves the ranks.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from qlrlora.adapter import LRLoRALinear
from qlrlora.io import atomic_write, atomic_write_json
from qlrlora.model import layer_index, module_kind
from qlrlora.regularizer import RankController

KIND_COLORS = {"attention": "tab:blue", "mlp": "tab:orange", "other": "tab:gray"}
MARKERS = "os^vDPX*hp<>"


@dataclass
class LayerRank:
    """One adapted layer as the rank report shows it."""

    module: str
    kind: str  # attention | mlp | other
    layer: int | None
    r_max: int
    rank: float
    hard_rank: int
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return (self.in_features + self.out_features) * self.hard_rank


def layer_ranks(layers: dict[str, LRLoRALinear]) -> list[LayerRank]:
    ranks = next(iter(layers.values())).ranks
    values, hard = ranks.values.detach().cpu().tolist(), ranks.hard().cpu().tolist()
    return [
        LayerRank(
            module=name,
            kind=module_kind(name),
            layer=layer_index(name),
            r_max=m.r_max,
            rank=values[m.index],
            hard_rank=hard[m.index],
            in_features=m.in_features,
            out_features=m.out_features,
        )
        for name, m in layers.items()
    ]


def mean_rank(rows: list[LayerRank], kind: str) -> float | None:
    ranks = [r.rank for r in rows if r.kind == kind]
    return sum(ranks) / len(ranks) if ranks else None


def rank_summary(controller: RankController, rows: list[LayerRank] | None = None) -> dict:
    rows = layer_ranks(controller.layers) if rows is None else rows
    return {
        "mean_rank_attention": mean_rank(rows, "attention"),
        "mean_rank_mlp": mean_rank(rows, "mlp"),
        "live_adapter_params": controller.live_params(),
        "budget_adapter_params": controller.budget_params(),
        "lambda": controller.penalty,
        "temperature": controller.ranks.temperature,
        "phase": controller.phase,
        "step": controller.step_count,
    }


def write_rank_report(directory: str | Path, controller: RankController, extra: dict | None = None) -> None:
    directory = Path(directory)
    rows = layer_ranks(controller.layers)
    data = {
        "summary": {**rank_summary(controller, rows), **(extra or {})},
        "layers": [
            {
                "module": r.module,
                "kind": r.kind,
                "layer": r.layer,
                "r_max": r.r_max,
                "rank": round(r.rank, 4),
                "hard_rank": r.hard_rank,
                "in_features": r.in_features,
                "out_features": r.out_features,
            }
            for r in rows
        ],
    }
    atomic_write_json(directory / "ranks.json", data)
    if importlib.util.find_spec("matplotlib") is not None:
        atomic_write(directory / "ranks.png", lambda tmp: _plot(rows, data["summary"], tmp))
    else:
        _note_no_plot()


@functools.cache
def _note_no_plot() -> None:
    """Said once per process, not at every checkpoint."""
    print("note: ranks.png is not drawn: matplotlib is not installed (pip install 'qlrlora[plots]')", file=sys.stderr)


def _plot(layers, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    by_projection: dict[str, list] = {}
    for r in layers:
        by_projection.setdefault(r.module.rsplit(".", 1)[-1], []).append(r)
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, (projection, rows) in enumerate(sorted(by_projection.items(), key=lambda kv: (kv[1][0].kind, kv[0]))):
        rows = sorted(rows, key=lambda r: (r.layer is None, r.layer))
        xs = [r.layer if r.layer is not None else -1 for r in rows]
        kind = rows[0].kind
        ax.plot(
            xs,
            [r.rank for r in rows],
            marker=MARKERS[i % len(MARKERS)],
            color=KIND_COLORS[kind],
            alpha=0.8,
            linewidth=1,
            label=f"{projection} ({kind})",
        )
    r_max = max(r.r_max for r in layers)
    ax.set_ylim(0, r_max * 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer index")
    ax.set_ylabel("learned rank")
    ax.set_title(
        f"LR-LoRA learned ranks: {summary['live_adapter_params']:,} adapter parameters at the hard ranks"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def format_rank_table(layers) -> str:
    """Hard rank of every adapted layer: one row per block, one column per projection."""
    projections = sorted({r.module.rsplit(".", 1)[-1] for r in layers}, key=lambda p: (_kind_order(layers, p), p))
    cells = {(r.layer, r.module.rsplit(".", 1)[-1]): r.hard_rank for r in layers}
    blocks = sorted({r.layer for r in layers}, key=lambda i: (i is None, i))
    width = max(6, *(len(p) for p in projections))
    header = "layer " + " ".join(p.rjust(width) for p in projections)
    rows = [header, "-" * len(header)]
    for block in blocks:
        values = [str(cells.get((block, p), "")).rjust(width) for p in projections]
        rows.append(f"{'-' if block is None else block:>5} " + " ".join(values))
    total = sum(r.params for r in layers)
    rows.append(f"learned hard ranks; {total:,} adapter parameters kept")
    return "\n".join(rows)


def _kind_order(layers, projection: str) -> int:
    kind = next(r.kind for r in layers if r.module.endswith("." + projection) or r.module == projection)
    return {"attention": 0, "mlp": 1}.get(kind, 2)
