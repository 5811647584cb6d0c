"""tools/distributed_report.py: the tables of docs/benchmarks/distributed.md come from the runs' JSON files."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent


def write_run(results: Path, name: str, extra: str, tokens_per_second: float, losses: list[float], ranks: list[int]):
    command = f"python tools/benchmark_sft.py r.yaml --output.dir=runs/{name} --data.dataset=d.jsonl {extra}".strip()
    run = {"command": command, "tokens_per_second": tokens_per_second, "step_seconds_median": 0.5,
           "peak_gpu_memory_per_process_gib": {"allocated": [8.0], "reserved": [9.0]},
           "losses": [[5 * (i + 1), loss] for i, loss in enumerate(losses)]}
    (results / f"{name}.json").write_text(json.dumps(run))
    layers = [{"module": f"m{i}", "hard_rank": r} for i, r in enumerate(ranks)]
    (results / f"{name}.ranks.json").write_text(json.dumps({"summary": {"rank_spread_across_processes": 0.0},
                                                            "layers": layers}))


def test_runs_are_set_against_the_one_gpu_run(tmp_path):
    (tmp_path / "commands.txt").write_text(
        "== smol_1gpu: accelerate launch --num_processes 1 --num_machines 1 tools/benchmark_sft.py r.yaml\n"
        "   exit 0 after 10 s\n"
        "== smol_ddp: accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 "
        "tools/benchmark_sft.py r.yaml --train.per_device_train_batch_size=2\n")
    write_run(tmp_path, "smol_1gpu", "", 1000.0, [4.0, 2.0, 1.0, 1.0, 1.0], [4, 4, 2])
    write_run(tmp_path, "smol_ddp", "--train.per_device_train_batch_size=2", 1800.0, [4.0, 2.0, 1.0, 1.0, 1.1], [4, 3, 2])
    peft = tmp_path / "peft"
    for name, value in (("smol_1gpu", 1.0), ("smol_ddp", 1.5)):
        (peft / f"{name}.peft").mkdir(parents=True)
        save_file({"a": torch.full((2, 2), value), "b": torch.ones(3)}, str(peft / f"{name}.peft" / "adapter_model.safetensors"))
    out = subprocess.run([sys.executable, "tools/distributed_report.py", str(tmp_path), "--peft", str(peft)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    ddp = next(line for line in out.splitlines() if line.startswith("| smol_ddp"))
    cells = [c.strip() for c in ddp.strip("|").split("|")]
    assert cells[1] == "DDP x2" and cells[2] == "`--train.per_device_train_batch_size=2`"
    assert cells[3] == "1,800" and cells[4] == "1.80x"
    assert cells[7] == "1.8200 (+1.11%)" and cells[8] == "1.2750 (+2.00%)"  # mean of all logged, of the last 4
    assert cells[9] == "3.000" and cells[10] == "1 of 3 (1)"
    assert cells[12] == "5.0e-01 (2 of 2 tensors)"
    assert "First run: `--data.dataset=d.jsonl`" in out
