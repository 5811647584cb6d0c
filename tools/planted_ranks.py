"""Run the planted-rank benchmarks (qlrlora/planted.py) for a grid of settings; one line per run.

    python tools/planted_ranks.py layers --budget-avg-rank 4 5 --init-rank 8 32 --seed 0 1
    python tools/planted_ranks.py layers --mode penalty --penalty 0.1 0.5 1
    python tools/planted_ranks.py network --seed 0 1 2
    python tools/planted_ranks.py network --order-components off on --seed 0 1 2
"""

from __future__ import annotations

import argparse
import itertools
import time

from qlrlora.config import RankConfig
from qlrlora.planted import NETWORK_PLANTED, run_planted, run_planted_network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("problem", choices=["layers", "network"])
    parser.add_argument("--planted", type=int, nargs="+", default=[2, 12, 6, 0], help="layers: the planted ranks")
    parser.add_argument("--mode", choices=["penalty", "budget"], default="budget")
    parser.add_argument("--penalty", type=float, nargs="+", default=[0.5])
    parser.add_argument("--budget-avg-rank", type=float, nargs="+", help="default: the planted parameters")
    parser.add_argument("--rank-lr", type=float, nargs="+", default=[0.05])
    parser.add_argument("--warmup-fraction", type=float, nargs="+", default=[0.1])
    parser.add_argument("--init-rank", type=float, nargs="+", default=[32.0], help="layers: where the ranks start")
    parser.add_argument("--order-components", choices=["on", "off"], nargs="+", default=["off"],
                        help="rank.order_components: sort the switched-on components largest first while the ranks move")
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int)
    args = parser.parse_args()

    if args.mode == "penalty":
        controls = [{"mode": "penalty", "penalty": p} for p in args.penalty]
    elif args.budget_avg_rank:
        controls = [{"mode": "budget", "budget_avg_rank": b} for b in args.budget_avg_rank]
    else:
        controls = [None]  # each problem's default: a budget equal to the planted parameters
    inits = args.init_rank if args.problem == "layers" else [None]
    planted = args.planted if args.problem == "layers" else NETWORK_PLANTED
    print(f"{args.problem}: planted {planted}")
    for control, rank_lr, warmup, order, init, seed in itertools.product(
        controls, args.rank_lr, args.warmup_fraction, args.order_components, inits, args.seed
    ):
        steps = {"steps": args.steps} if args.steps else {}
        start = time.perf_counter()
        if control is None and args.problem == "layers":
            control = {"mode": "budget", "budget_avg_rank": sum(args.planted) / len(args.planted)}
        ordered = order == "on"
        config = None if control is None else RankConfig(
            rank_lr=rank_lr, warmup_fraction=warmup, order_components=ordered, **control)
        if args.problem == "layers":
            result = run_planted(tuple(args.planted), config, init_rank=init, seed=seed, **steps)
            found = list(result.hard_ranks.values())
        else:
            result = run_planted_network(rank=config, seed=seed, order_components=ordered, **steps)
            found = {name: r for name, r in result.hard_ranks.items() if r or name in NETWORK_PLANTED}
        settings = " ".join(f"{k}={v}" for k, v in (control or {"budget": "planted"}).items())
        budget = f" budget_params={result.budget_params}" if result.budget_params else ""
        print(
            f"{settings} rank_lr={rank_lr} warmup_fraction={warmup} order_components={order}"
            f"{'' if init is None else f' init_rank={init}'} seed={seed}: hard_ranks={found} "
            f"live_params={result.live_params}{budget} loss={result.final_loss:.2e} ({time.perf_counter() - start:.1f}s)"
        )


if __name__ == "__main__":
    main()
