"""DDP and FSDP2 over gloo with two CPU processes: the same losses and ranks as one process, and ranks that
never differ between the processes (tests/distributed_worker.py is the training loop)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlrlora.distributed import check_fsdp_settings
from qlrlora.errors import QLRError

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parent.parent


def launch(mode, out, processes):
    if processes == 1:
        command = [sys.executable, str(WORKER), mode, str(out)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   str(WORKER), mode, str(out)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"{mode}-{rank}.json").read_text()) for rank in range(processes)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    history = launch("single", tmp_path_factory.mktemp("single"), 1)[0]
    assert history.pop()["reloaded"]
    return history


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_train_like_one(single, tmp_path, mode):
    histories = launch(mode, tmp_path, 2)
    assert all(history.pop()["reloaded"] for history in histories)  # saved whole, loaded back into the shards
    for step, row in enumerate(single):
        assert histories[0][step]["ranks"] == histories[1][step]["ranks"], step  # no drift between processes
        assert histories[0][step]["loss"] == pytest.approx(row["loss"], rel=1e-4), step
        assert histories[0][step]["ranks"] == pytest.approx(row["ranks"], abs=1e-4), step
    assert single[-1]["phase"] == "frozen" and single[0]["ranks"] != single[-1]["ranks"]  # the ranks did move


def test_fsdp_settings_that_cannot_work_are_named():
    with pytest.raises(QLRError, match="model.quant_storage: .* set model.quant_storage: bfloat16"):
        check_fsdp_settings("nf4", "bfloat16", "uint8", cpu_offload=False)
    with pytest.raises(QLRError, match="FSDP cpu offload with an NF4 model"):
        check_fsdp_settings("nf4", "bfloat16", "bfloat16", cpu_offload=True)
    check_fsdp_settings("nf4", "bfloat16", "bfloat16", cpu_offload=False)
    check_fsdp_settings("none", "bfloat16", "uint8", cpu_offload=True)


@pytest.mark.parametrize("name", ["ddp", "fsdp1", "fsdp2"])
def test_the_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == ("MULTI_GPU" if name == "ddp" else "FSDP")
    if name != "ddp":
        assert config.fsdp_config["fsdp_version"] == int(name[-1])
