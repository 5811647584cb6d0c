"""Kill -9 a real run at points inside every write that matters, resume it, and compare with a run never killed.

The kill points are placed deterministically (a small wrapper patches the write and sends itself
SIGKILL there), so that every one is hit on every run of the suite, however loaded the machine.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlrlora.rundir import COMPLETE_MARKER
from tests.test_trainer import ROOT, TINY, free_port

pytestmark = pytest.mark.slow

KILLER = """
import os, signal, sys
from pathlib import Path
point = sys.argv.pop(1)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "training":  # after step 7, between the checkpoints of steps 5 and 10
    import qlrlora.sft as sft
    from transformers import TrainerCallback
    build = sft.build_trainer
    class Die(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                die()
    def patched(recipe):
        trainer = build(recipe)
        trainer.add_callback(Die())
        return trainer
    sft.build_trainer = patched
elif point == "sigterm":  # a SIGTERM in step 7 (a scheduler preempting the job); a second process's in step 10
    import qlrlora.sft as sft
    from transformers import TrainerCallback
    build = sft.build_trainer
    at = 6 if os.environ.get("RANK", "0") == "0" else 9
    class Term(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == at:
                os.kill(os.getpid(), signal.SIGTERM)
    def patched(recipe):
        trainer = build(recipe)
        trainer.add_callback(Term())
        return trainer
    sft.build_trainer = patched
elif point == "checkpoint":  # in the save of checkpoint-10: adapter written, its JSON copy and the rest not
    import qlrlora.checkpoint as ck
    write_json = ck.atomic_write_json
    def patched(path, data):
        if Path(path).parent.name == "checkpoint-10":
            die()
        write_json(path, data)
    ck.atomic_write_json = patched
elif point == "report":  # in the final save: ranks.json written, ranks.png half-written
    import qlrlora.report as report
    write = report.atomic_write
    def patched(path, fill):
        if Path(path).name == "ranks.png" and Path(path).parent.name != "checkpoint-10" and "checkpoint" not in str(path):
            def half(tmp):
                tmp.write_bytes(b"half a png")
                die()
            return write(path, half)
        return write(path, fill)
    report.atomic_write = patched
elif point == "export":  # in the final export: the PEFT tensors written into the temporary directory
    import qlrlora.export as export
    save = export.save_file
    def patched(tensors, filename, **kwargs):
        save(tensors, filename, **kwargs)
        die()
    export.save_file = patched
from qlrlora.sft import main
sys.exit(main(sys.argv[1:]))
"""


def cli(*args, killer_point=None):
    command = [sys.executable, "-c", KILLER, killer_point] if killer_point else [sys.executable, "-m", "qlrlora.sft"]
    return subprocess.run([*command, str(TINY), *map(str, args), "--train.report_to=none", "--train.save_steps=5"],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ})


def final_state(out: Path) -> dict:
    tensors = load_file(str(out / "lrlora_adapter.safetensors"))
    tensors.update({f"peft/{k}": v for k, v in load_file(str(out / "peft_adapter" / "adapter_model.safetensors")).items()})
    return tensors


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = cli(f"--output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return final_state(out)


@pytest.mark.parametrize("point", ["training", "sigterm", "checkpoint", "report", "export"])
def test_a_run_killed_anywhere_resumes_to_the_same_adapter(tmp_path, reference, point):
    out = tmp_path / "run"
    killed = cli(f"--output.dir={out}", killer_point=point)
    if point == "sigterm":  # the step ends, its checkpoint is saved, and the run stops with one line
        assert killed.returncode == 143, killed.stderr[-3000:]
        assert killed.stderr.strip().splitlines()[-1] == (f"stopped on SIGTERM at step 7 of 20, after saving "
                                                          f"{out / 'checkpoint-7'}; continue it with --output.resume=true")
        assert (out / "checkpoint-7" / COMPLETE_MARKER).is_file() and not (out / "lrlora_adapter.safetensors").exists()
    else:
        assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = cli(f"--output.dir={out}", "--output.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = final_state(out)
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    leftovers = [p for p in out.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers
    for checkpoint in out.glob("checkpoint-*"):  # every checkpoint kept is complete
        assert (checkpoint / COMPLETE_MARKER).is_file(), checkpoint
        assert json.loads((checkpoint / COMPLETE_MARKER).read_text())["global_step"] == int(checkpoint.name.split("-")[1])
    png = (out / "ranks.png").read_bytes()
    assert png.startswith(b"\x89PNG"), "ranks.png is not a whole PNG"


def test_two_processes_stopped_by_sigterm_in_different_steps_save_one_checkpoint_that_resumes(tmp_path):
    out, script = tmp_path / "ddp", tmp_path / "killer.py"
    script.write_text(KILLER)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    args = [str(TINY), f"--output.dir={out}", "--train.report_to=none", "--train.save_strategy=no"]
    stopped = subprocess.run([*launch, str(script), "sigterm", *args], check=False, capture_output=True, text=True,
                             cwd=ROOT, timeout=600)
    assert stopped.returncode != 0
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("stopped on SIGTERM")]
    expected = (f"stopped on SIGTERM at step 7 of 20, after saving {out / 'checkpoint-7'}; continue it with "
                "--output.resume=true")
    assert lines == [expected], stopped.stderr[-3000:]  # the first signal's step, said once
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-7"] and (out / "checkpoint-7" / COMPLETE_MARKER).is_file()
    # Resumed in one process: transformers 5.17 loads a multi-process checkpoint's optimizer state onto
    # args.device, which on CPUs is "cpu:1" for the second process and cannot be mapped (cuda:N on GPUs).
    resumed = subprocess.run([sys.executable, "-m", "qlrlora.sft", *args, "--output.resume=true"], check=False,
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "ranks.json").read_text())["summary"]["step"] == 20
