"""Run the planted-rank benchmark for a grid of rank-control settings and print one line per run.

    python tools/planted_ranks.py --mode penalty --penalty 0.001 0.01 0.03 --init-rank 2 8 24
    python tools/planted_ranks.py --mode budget --budget-avg-rank 4 5 --dual-lr 0.01 --init-rank 2 8 24
"""

from __future__ import annotations

import argparse
import itertools
import time

from qlrlora.config import RankConfig
from qlrlora.planted import run_planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--planted", type=int, nargs="+", default=[2, 12, 6, 0])
    parser.add_argument("--mode", choices=["penalty", "budget"], default="penalty")
    parser.add_argument("--penalty", type=float, nargs="+", default=[0.03])
    parser.add_argument("--budget-avg-rank", type=float, nargs="+", default=[4.0])
    parser.add_argument("--dual-lr", type=float, nargs="+", default=[0.01])
    parser.add_argument("--rank-lr", type=float, nargs="+", default=[0.05])
    parser.add_argument("--tau-start", type=float, nargs="+", default=[1.0])
    parser.add_argument("--init-rank", type=float, nargs="+", default=[8.0])
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()

    if args.mode == "penalty":
        controls = [{"penalty": p} for p in args.penalty]
    else:
        controls = [
            {"budget_avg_rank": b, "dual_lr": d} for b, d in itertools.product(args.budget_avg_rank, args.dual_lr)
        ]
    print(f"planted ranks {args.planted}, {args.steps} steps")
    for control, rank_lr, tau, init, seed in itertools.product(
        controls, args.rank_lr, args.tau_start, args.init_rank, args.seed
    ):
        config = RankConfig(mode=args.mode, rank_lr=rank_lr, tau_start=tau, **control)
        start = time.perf_counter()
        result = run_planted(tuple(args.planted), config, init_rank=init, steps=args.steps, seed=seed)
        settings = " ".join(f"{k}={v}" for k, v in control.items())
        budget = f" budget_params={result.budget_params}" if result.budget_params else ""
        print(
            f"{settings} rank_lr={rank_lr} tau_start={tau} init_rank={init} seed={seed}: "
            f"hard_ranks={result.hard_ranks} ranks={result.ranks} live_params={result.live_params}{budget} "
            f"lambda={result.penalty:.4g} loss={result.final_loss:.2e} ({time.perf_counter() - start:.1f}s)"
        )


if __name__ == "__main__":
    main()
