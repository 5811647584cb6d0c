"""Run a recipe like `python -m qlrlora.sft` and write what it cost to <output.dir>/benchmark.json.

    python tools/benchmark_sft.py RECIPE.yaml [--section.key=value ...]

Recorded: wall time of the whole job and of training alone, trained tokens (TRL's num_tokens: the
non-padding tokens of every training batch, over all processes) and tokens per second of training, the
median time of a training step after the first 3, peak GPU memory (allocated and reserved by PyTorch)
of every process, the logged losses, the learned hard ranks, the GPU, and the versions of the stack.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from qlrlora.config import load_recipe
from qlrlora.errors import QLRError
from qlrlora.sft import run
from qlrlora.throughput import StepTimes


def peak_memory_per_process(trainer) -> dict:
    """Peak allocated and reserved GiB of every process's GPU (gathered: a collective)."""
    if not torch.cuda.is_available():
        return {"allocated": None, "reserved": None}
    mine = torch.tensor([[torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]],
                        dtype=torch.float64, device=trainer.accelerator.device)
    every = trainer.accelerator.gather(mine).cpu() / 2**30
    return {"allocated": [round(float(x), 3) for x in every[:, 0]], "reserved": [round(float(x), 3) for x in every[:, 1]]}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        recipe = load_recipe(argv[0], argv[1:])
        steps = StepTimes()
        trainer = run(recipe, callbacks=[steps])
    except QLRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    memory = peak_memory_per_process(trainer)
    if not trainer.is_world_process_zero():
        return 0
    history = trainer.state.log_history
    summary = next(row for row in reversed(history) if "train_runtime" in row)
    tokens = next(row["num_tokens"] for row in reversed(history) if "num_tokens" in row)
    import accelerate
    import bitsandbytes
    import transformers
    import trl

    result = {
        "command": " ".join(["python", "tools/benchmark_sft.py", *argv]),
        "wall_seconds": round(wall, 1),
        "train_seconds": summary["train_runtime"],
        "train_steps": trainer.state.global_step,
        "trained_tokens": int(tokens),
        "tokens_per_second": round(tokens / summary["train_runtime"], 1),
        "step_seconds_median": round(statistics.median(steps.times[3:] or steps.times), 4) if steps.times else None,
        "peak_gpu_memory_allocated_gib": max(memory["allocated"]) if memory["allocated"] else None,
        "peak_gpu_memory_reserved_gib": max(memory["reserved"]) if memory["reserved"] else None,
        "peak_gpu_memory_per_process_gib": memory,
        "losses": [[row["step"], row["loss"]] for row in history if "loss" in row],
        "hard_ranks": trainer.controller.hard_ranks(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "processes": trainer.accelerator.num_processes,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "bitsandbytes": bitsandbytes.__version__, "trl": trl.__version__},
    }
    out = Path(recipe.output.dir) / "benchmark.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
