import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback

from qlrlora.config import recipe_from_dict
from qlrlora.sft import build_trainer, run
from qlrlora.trainer import COMPLETE_MARKER

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny_cpu.yaml"


def tiny_recipe(tmp_path, **sections):
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["dataset"] = str(ROOT / raw["data"]["dataset"])
    raw["output"]["dir"] = str(tmp_path / "out")
    raw["train"]["report_to"] = "none"
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return recipe_from_dict(raw, str(TINY))


def history(output_dir, step=20):
    state = json.loads((Path(output_dir) / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {row["step"]: row for row in state["log_history"] if "loss" in row}


def cli(*args, env=None, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "qlrlora.sft", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=600,
    )


def test_cli_run_writes_adapter_ranks_plot_and_rank_metrics(tmp_path):
    result = cli(TINY, f"--output.dir={tmp_path / 'run'}", "--train.report_to=tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    for name in ("lrlora_adapter.safetensors", "lrlora_adapter.json", "ranks.json", "ranks.png"):
        assert (out / name).is_file(), name
    ranks = json.loads((out / "ranks.json").read_text())
    assert len(ranks["layers"]) == 14 and ranks["summary"]["step"] == 20
    rows = history(out)
    assert sorted(rows) == list(range(1, 21))
    for key in ("task_loss", "rank/regularizer", "rank/lambda", "rank/temperature", "rank/mean_attention", "rank/mean_mlp",
                "rank/live_params"):
        assert key in rows[20], key
    assert rows[20]["rank/temperature"] < rows[1]["rank/temperature"]
    assert rows[20]["task_loss"] == pytest.approx(rows[20]["loss"] - rows[20]["rank/regularizer"])
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert "learned hard ranks" in result.stdout and str(out) in result.stdout
    # The export names a base that PEFT's auto class can load on its own (here the model built from the config).
    from peft import AutoPeftModelForCausalLM

    base = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_dir()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out / "peft_adapter")
    assert peft_model.peft_config["default"].base_model_name_or_path == base


def test_temperature_anneals_over_the_whole_run_when_training_by_epochs(tmp_path):
    recipe = tiny_recipe(tmp_path, train={"max_steps": -1, "num_train_epochs": 1, "per_device_train_batch_size": 32,
                                          "save_strategy": "no"})
    trainer = run(recipe)
    temperatures = [row["rank/temperature"] for row in trainer.state.log_history if "rank/temperature" in row]
    assert len(temperatures) == 8  # 256 rows / 32
    assert temperatures[0] == pytest.approx(0.05 ** (1 / 8), rel=1e-4) and temperatures[-1] == pytest.approx(0.05)


def test_penalty_lowers_the_learned_ranks(tmp_path):
    mean = {}
    for penalty in (0.0, 1.0):
        recipe = tiny_recipe(tmp_path / str(penalty), rank={"mode": "penalty", "penalty": penalty, "budget_avg_rank": None},
                             train={"save_strategy": "no"})
        run(recipe)
        report = json.loads((Path(recipe.output.dir) / "ranks.json").read_text())
        mean[penalty] = sum(row["rank"] for row in report["layers"]) / len(report["layers"])
    assert mean[1.0] < mean[0.0] - 0.5, mean


class RankGrads(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append(torch.stack([layer.rank.grad.detach().cpu().clone() for layer in self.trainer.layers.values()]))


@pytest.mark.parametrize("micro, accumulation", [(1, 4)])
def test_regularizer_scale_is_independent_of_gradient_accumulation(tmp_path, micro, accumulation):
    grads = {}
    for mb, ga in ((micro, accumulation), (micro * accumulation, 1)):
        recipe = tiny_recipe(
            tmp_path / f"{mb}x{ga}",
            rank={"mode": "penalty", "penalty": 0.5, "budget_avg_rank": None},
            train={"max_steps": 1, "per_device_train_batch_size": mb, "gradient_accumulation_steps": ga,
                   "save_strategy": "no", "max_grad_norm": 0.0},  # no clipping: compare raw gradients
        )
        trainer = build_trainer(recipe)
        probe = RankGrads(trainer)
        trainer.add_callback(probe)
        trainer.train()
        grads[(mb, ga)] = probe.grads[0]
    # B starts at zero, so the first step's rank gradient is the regulariser's alone: lambda * d cost / d rank.
    reference = build_trainer(tiny_recipe(tmp_path / "ref", rank={"mode": "penalty", "penalty": 0.5, "budget_avg_rank": None}))
    ranks = [layer.rank for layer in reference.layers.values()]
    expected = torch.stack(torch.autograd.grad(0.5 * reference.controller.cost(), ranks))
    torch.testing.assert_close(grads[(micro, accumulation)], grads[(micro * accumulation, 1)])
    torch.testing.assert_close(grads[(micro, accumulation)].cpu(), expected.cpu(), rtol=1e-4, atol=1e-7)


def test_resume_from_step_10_reproduces_steps_11_to_20(tmp_path):
    full = tiny_recipe(tmp_path / "full")
    run(full)
    resumed = tiny_recipe(tmp_path / "resumed", output={"resume": str(Path(full.output.dir) / "checkpoint-10")})
    run(resumed)
    a, b = history(full.output.dir), history(resumed.output.dir)
    assert sorted(b) == list(range(1, 21))  # the resumed history continues the checkpoint's
    for step in range(11, 21):
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-4, (step, a[step]["loss"], b[step]["loss"])
        assert a[step]["rank/lambda"] == pytest.approx(b[step]["rank/lambda"], abs=1e-6)
    ranks_a = json.loads((Path(full.output.dir) / "ranks.json").read_text())["layers"]
    ranks_b = json.loads((Path(resumed.output.dir) / "ranks.json").read_text())["layers"]
    assert [r["rank"] for r in ranks_a] == pytest.approx([r["rank"] for r in ranks_b], abs=1e-4)


KILL_DURING_SAVE = """
import os, sys
from transformers import Trainer
original = Trainer._save_rng_state
def dying(self, output_dir):
    if self.state.global_step == 20:
        os._exit(9)  # killed after the adapter and optimizer of checkpoint-20 were written
    return original(self, output_dir)
Trainer._save_rng_state = dying
from qlrlora.sft import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_during_save_leaves_the_previous_checkpoint_and_resume_uses_it(tmp_path):
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(TINY), f"--output.dir={out}",
                             "--train.report_to=none"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert killed.returncode == 9
    assert (out / "checkpoint-20" / "lrlora_adapter.safetensors").is_file()
    assert not (out / "checkpoint-20" / COMPLETE_MARKER).exists()
    assert (out / "checkpoint-10" / COMPLETE_MARKER).is_file()

    result = cli(TINY, f"--output.dir={out}", "--output.resume=true", "--train.report_to=none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoint-20" / COMPLETE_MARKER).is_file()
    assert json.loads((out / "ranks.json").read_text())["summary"]["step"] == 20


def test_resume_from_an_incomplete_checkpoint_is_refused(tmp_path):
    partial = tmp_path / "out" / "checkpoint-10"
    partial.mkdir(parents=True)
    result = cli(TINY, f"--output.dir={tmp_path / 'out'}", f"--output.resume={partial}")
    assert result.returncode == 2
    assert "is not a complete checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "qlrlora.sft", str(TINY), f"--output.dir={out}", "--train.report_to=none", "--train.save_strategy=no"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "ranks.json").read_text())["summary"]
    assert summary["processes"] == 2
    assert summary["rank_spread_across_processes"] == 0.0


def test_training_warns_when_the_rank_learning_rate_cannot_reach_the_budget(tmp_path, capsys):
    slow = tiny_recipe(tmp_path / "slow", rank={"rank_lr": 0.01, "budget_avg_rank": 1},
                       train={"max_steps": 2, "lr_scheduler_type": "cosine", "save_strategy": "no"})
    build_trainer(slow).train()
    err = capsys.readouterr().err
    # 2 cosine steps with multipliers 1 and 0.5: a rank can travel 0.015 from 4 toward the budget of 1.
    assert "warning: rank.budget_*: out of reach" in err and "rank.rank_lr to at least 2 " in err, err[-2000:]
    fast = tiny_recipe(tmp_path / "fast", rank={"rank_lr": 1.0}, train={"max_steps": 2, "save_strategy": "no"})
    build_trainer(fast).train()  # 2 constant steps of 1.0 take the ranks from 4 to the budget of 3
    assert "out of reach" not in capsys.readouterr().err
