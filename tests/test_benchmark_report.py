import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_run(folder: Path, tokens_per_second: float, accuracy: tuple[float, float] | None, ranks: list[int] | None):
    folder.mkdir(parents=True)
    bench = {
        "command": "python tools/benchmark_sft.py r.yaml", "wall_seconds": 100.04, "train_seconds": 80.0, "train_steps": 10,
        "trained_tokens": 8000, "tokens_per_second": tokens_per_second, "peak_gpu_memory_allocated_gib": 1.25,
        "peak_gpu_memory_reserved_gib": 2.5, "device": "GPU", "processes": 1, "versions": {"torch": "2.x"},
    }
    (folder / "benchmark.json").write_text(json.dumps(bench))
    if accuracy is not None:
        for name, value in zip(("eval_before.json", "eval_after.json"), accuracy):
            tasks = {"boolq": {"accuracy": value, "correct": int(value * 200), "total": 200}}
            (folder / name).write_text(json.dumps({"tasks": tasks, "average": value}))
    if ranks is not None:
        layers = [{"module": f"model.layers.{i // 2}.self_attn.{'q' if i % 2 == 0 else 'v'}_proj", "kind": "attention",
                   "layer": i // 2, "r_max": 8, "rank": r + 0.25, "hard_rank": r} for i, r in enumerate(ranks)]
        summary = {"mean_rank_attention": 3.0, "mean_rank_mlp": None, "live_adapter_params": 1234,
                   "budget_adapter_params": 2000, "lambda": 0.5, "temperature": 0.05, "step": 10}
        (folder / "ranks.json").write_text(json.dumps({"summary": summary, "layers": layers}))


def report(*args):
    return subprocess.run([sys.executable, "tools/benchmark_report.py", *map(str, args)], check=False, cwd=ROOT,
                          capture_output=True, text=True)


def test_tables_come_from_the_run_files(tmp_path):
    write_run(tmp_path / "a", 1000.0, (0.5, 0.625), [2, 5, 3, 3])
    write_run(tmp_path / "b", 2500.0, None, None)
    result = report(tmp_path / "a", "--compare", f"first={tmp_path / 'a'}", f"second={tmp_path / 'b'}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "| whole job (model, data, evaluation before and after, training, export) | 100.0 s |" in out
    assert "| training throughput | 1,000 tokens/s |" in out
    assert "| boolq | 0.500 | 0.625 | +0.125 | 200 |" in out
    assert "hard ranks at the end: 1 at rank 2, 2 at rank 3, 1 at rank 5 (4 layers)" in out
    assert "soft ranks from 2.250 to 5.250" in out
    assert "| layer | q_proj | v_proj |" in out and "| 0 | 2 | 5 |" in out and "| 1 | 3 | 3 |" in out
    assert "| first | 10 | 80.0 | 1,000 | 1.00 | 1.2 | 0.625 | 2 to 5 | 0.5 | 1,234 |" in out
    assert "| second | 10 | 80.0 | 2,500 | 2.50 | 1.2 | - | - | - | - |" in out


def test_missing_or_broken_files_name_the_file(tmp_path):
    write_run(tmp_path / "a", 1000.0, None, None)
    result = report(tmp_path / "a")
    assert result.returncode != 0 and f"{tmp_path / 'a' / 'ranks.json'}: not found" in result.stderr
    (tmp_path / "a" / "ranks.json").write_text("{")
    assert "ranks.json: not valid JSON" in report(tmp_path / "a").stderr
    assert "expected LABEL=RUN_DIR" in report("--compare", "nolabel").stderr
