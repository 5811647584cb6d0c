import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlrlora.config import recipe_from_dict
from qlrlora.rundir import COMPLETE_MARKER
from qlrlora.sft import build_trainer, run
from qlrlora.trainer import unwrap_optimizer

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny_cpu.yaml"


def tiny_recipe(tmp_path, **sections):
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["dataset"] = str(TINY.parent / raw["data"]["dataset"])
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
        [sys.executable, "-m", "qlrlora.sft", *map(str, args)], check=False,
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
    for key in ("rank/cost", "rank/target", "rank/lambda", "rank/mean_attention", "rank/mean_mlp", "rank/spread",
                "rank/live_params"):
        assert key in rows[20], key
    assert rows[1]["rank/cost"] == 8 and rows[20]["rank/cost"] <= 6.0  # from r_max to the budget
    assert rows[20]["rank/live_params"] <= ranks["summary"]["budget_adapter_params"]
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert "learned hard ranks" in result.stdout and str(out) in result.stdout
    # The export names a base that PEFT's auto class can load on its own (here the model built from the config).
    from peft import AutoPeftModelForCausalLM

    base = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_dir()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out / "peft_adapter")
    assert peft_model.peft_config["default"].base_model_name_or_path == base


def test_the_rank_schedule_spans_the_whole_run_when_training_by_epochs(tmp_path):
    recipe = tiny_recipe(tmp_path, train={"max_steps": -1, "num_train_epochs": 1, "per_device_train_batch_size": 8,
                                          "save_strategy": "no"})
    trainer = run(recipe)
    assert trainer.state.global_step == 32  # 256 rows / 8
    controller = trainer.controller
    assert controller.total_steps == 32 and controller.warmup_steps == 3 and controller.freeze_step == 22
    targets = [row["rank/target"] for row in trainer.state.log_history if "rank/target" in row]
    assert targets[2] == 8 and targets[-1] == 6  # warm-up at r_max, then the budget once the schedule is done
    assert controller.frozen and controller.live_params() <= controller.budget_params()


def test_penalty_lowers_the_learned_ranks(tmp_path):
    mean = {}
    for penalty in (0.0, 1.0):
        recipe = tiny_recipe(tmp_path / str(penalty), rank={"mode": "penalty", "penalty": penalty, "budget_avg_rank": None,
                                                             "rank_lr": 0.3},
                             train={"save_strategy": "no"})
        run(recipe)
        report = json.loads((Path(recipe.output.dir) / "ranks.json").read_text())
        mean[penalty] = sum(row["rank"] for row in report["layers"]) / len(report["layers"])
    assert mean[1.0] < mean[0.0] - 1.5, mean


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
                             "--train.report_to=none"], check=False, capture_output=True, text=True, cwd=ROOT,
                             timeout=600)
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


def free_port() -> int:
    """A port nobody listens on: accelerate's default (29500) may belong to another job on the machine, and
    two jobs on one port join each other's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# qlrlora-sft's main, then the names of the threads still running in the process (Linux names them in /proc;
# a thread that ends between the listing and the read is no longer running, so it is left out).
SFT_THEN_THREADS = """
import os, sys
from qlrlora.sft import main

def thread_name(task):
    try:
        with open(f"/proc/self/task/{task}/comm") as comm:
            return comm.read().strip()
    except FileNotFoundError:
        return None

code = main(sys.argv[1:])
names = sorted(name for name in map(thread_name, os.listdir("/proc/self/task")) if name is not None)
print(f"rank {os.environ['RANK']} threads after main: {names}", flush=True)
sys.exit(code)
"""


def test_two_process_ddp_keeps_ranks_identical_and_stops_gloo_before_exit(tmp_path):
    out, script = tmp_path / "ddp", tmp_path / "sft_then_threads.py"
    script.write_text(SFT_THEN_THREADS)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
           str(script), str(TINY), f"--output.dir={out}", "--train.report_to=none", "--train.save_strategy=no"]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "ranks.json").read_text())["summary"]
    assert summary["processes"] == 2
    assert summary["rank_spread_across_processes"] == 0.0
    # gloo's threads (gloo_tcp_loop, pt_gloo_runloop) left running abort the interpreter's teardown now and then.
    reports = [line for line in result.stdout.splitlines() if "threads after main" in line]
    assert len(reports) == 2, result.stdout[-3000:]
    assert not [line for line in reports if "gloo" in line], reports


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from Linux's /proc")
def test_leaving_waits_for_a_named_thread_still_ending_and_gives_up_at_its_timeout():
    import ctypes
    import threading
    import time

    from qlrlora.sft import _await_threads_ending, _thread_names

    release = threading.Event()

    def ending_late():
        ctypes.CDLL(None).prctl(15, b"gloo_late", 0, 0, 0)  # PR_SET_NAME, as gloo names its loop thread
        release.wait()

    thread = threading.Thread(target=ending_late)
    thread.start()
    named_by = time.monotonic() + 5
    while "gloo_late" not in _thread_names() and time.monotonic() < named_by:
        time.sleep(0.01)
    assert "gloo_late" in _thread_names()
    began = time.monotonic()
    _await_threads_ending("gloo", timeout_s=0.2)  # still running: gives up after its timeout
    assert 0.2 <= time.monotonic() - began < 1 and "gloo_late" in _thread_names()
    threading.Timer(0.3, release.set).start()
    _await_threads_ending("gloo")
    assert "gloo_late" not in _thread_names()
    thread.join()


def test_training_warns_when_the_budget_is_out_of_reach(tmp_path, capsys):
    short = tiny_recipe(tmp_path / "short", rank={"budget_avg_rank": 1}, train={"max_steps": 10, "save_strategy": "no"})
    build_trainer(short).train()
    err = capsys.readouterr().err
    # 10 steps: warm-up 1, freeze at 7, so 6 pruning steps; from 8 to 1 the schedule needs 42.
    assert "warning: rank.budget_*: out of reach" in err and "this run has 6" in err, err[-2000:]
    reachable = tiny_recipe(tmp_path / "ok", rank={"budget_avg_rank": 7}, train={"max_steps": 10, "save_strategy": "no"})
    build_trainer(reachable).train()
    assert "out of reach" not in capsys.readouterr().err


def test_a_run_that_diverges_stops_with_a_one_line_error(tmp_path):
    result = cli(TINY, f"--output.dir={tmp_path / 'run'}", "--train.learning_rate=1e30", "--train.save_steps=2")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: the gradient norm is nan at step 2 (learning rate 1e+30)"), last
    assert not (tmp_path / "run" / "lrlora_adapter.safetensors").exists()
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize("fp16", [False, True])
def test_divergence_is_read_from_the_gradient_norm_unless_the_loss_scaler_skips_overflows(fp16):
    from types import SimpleNamespace

    from transformers import TrainerControl

    from qlrlora.trainer import StopOnDivergence, TrainingDiverged

    args, state = SimpleNamespace(fp16=fp16, learning_rate=1e-3), SimpleNamespace(global_step=7)
    guard, control = StopOnDivergence(), TrainerControl()
    for logs in ({"loss": 0.5, "grad_norm": 0.1}, {"train_runtime": 1.0}):
        guard.on_log(args, state, control, logs=logs)
    guard.check()
    assert not control.should_training_stop
    guard.on_log(args, state, control, logs={"loss": 0.5, "grad_norm": float("inf")})
    if fp16:
        guard.check()
        guard.on_log(args, state, control, logs={"loss": float("nan"), "grad_norm": 0.1})
    with pytest.raises(TrainingDiverged, match="the (gradient norm is inf|training loss is nan) at step 7") as caught:
        guard.check()
    assert caught.value.step == 7 and ("loss" in str(caught.value)) == fp16
    control.should_save = True  # a save step after the divergence
    guard.on_step_end(args, state, control)
    assert control.should_training_stop and not control.should_save


def test_the_private_trainer_seams_we_use_exist():
    """QLRSFTTrainer overrides three private Trainer methods and sets one private flag (trainer.py says why).
    This fails loudly when a supported transformers release renames or reshapes them."""
    import inspect

    from transformers import Trainer, trainer_utils

    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == ["self", "resume_from_checkpoint", "model"]
    assert list(inspect.signature(Trainer._load_best_model).parameters) == ["self"]
    assert "self._load_from_checkpoint(resume_from_checkpoint" in inspect.getsource(Trainer)
    assert "self._load_best_model()" in inspect.getsource(Trainer)
    assert list(inspect.signature(Trainer._get_train_sampler).parameters) == ["self", "train_dataset"]
    assert "sampler_fn=self._get_train_sampler" in inspect.getsource(Trainer)
    assert "_hf_peft_config_loaded" in inspect.getsource(trainer_utils)
    assert list(inspect.signature(Trainer.save_model).parameters) == ["self", "output_dir", "_internal_call"]


def test_group_by_length_draws_each_pass_from_the_seed_and_the_pass(tmp_path, monkeypatch):
    """Trainer reaches the sampler's set_epoch before every pass (else every pass would repeat the first
    order), and the order is a function of the seed and the pass alone (what makes a resume exact)."""
    from qlrlora.trainer import EpochSeededLengthGroupedSampler

    passes = []
    set_epoch = EpochSeededLengthGroupedSampler.set_epoch
    monkeypatch.setattr(EpochSeededLengthGroupedSampler, "set_epoch",
                        lambda self, epoch: (passes.append(epoch), set_epoch(self, epoch)))
    recipe = tiny_recipe(tmp_path, train={"max_steps": -1, "num_train_epochs": 3, "save_strategy": "no",
                                          "train_sampling_strategy": "group_by_length"})
    trainer = build_trainer(recipe)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, EpochSeededLengthGroupedSampler)
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[2] != orders[1] and sorted(orders[0]) == list(range(len(trainer.train_dataset)))
    passes.clear()
    trainer.train()
    assert list(dict.fromkeys(passes)) == [0, 1, 2]  # (accelerate and Trainer each call it)


def factors_and_state(trainer):
    """Per layer: its components, its live factors, and the shapes of its first Adam moments (torch's exp_avg,
    bitsandbytes' state1)."""
    state = unwrap_optimizer(trainer.optimizer).state
    result = {}
    for name, layer in trainer.layers.items():
        k = layer.hard_rank()
        moments = [tuple(state[p].get("exp_avg", state[p].get("state1")).shape) for p in (layer.lora_A, layer.lora_B)]
        result[name] = (layer.components, layer.lora_A[:k].detach().clone(), layer.lora_B[:, :k].detach().clone(), moments)
    return result


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_bnb_8bit"])
@pytest.mark.parametrize("rank", [{"mode": "fixed", "budget_avg_rank": None}, {}], ids=["fixed", "budget"])
def test_frozen_ranks_cut_the_factors_and_their_adam_state_and_training_is_unchanged(tmp_path, rank, optim):
    """Ranks fixed from the start are cut at train begin, learned ones after the step that froze them (14 of 20);
    the losses and the live factors are those of the run that keeps r_max components, masked. (bitsandbytes keeps
    the moments of factors this small, under 4,096 values, in 32 bits.)"""
    runs = {}
    for cut in (True, False):
        recipe = tiny_recipe(tmp_path / str(cut), adapter={"init_rank": 5.0}, rank={**rank, "cut_at_freeze": cut},
                             train={"save_strategy": "no", "optim": optim})
        trainer = run(recipe)
        runs[cut] = (trainer, factors_and_state(trainer))
    (cut_trainer, cut), (_, kept) = runs[True], runs[False]
    assert cut_trainer.controller.frozen
    for name, (components, A, B, moments) in cut.items():
        k = A.shape[0]
        assert components == k < 8 and moments == [(k, A.shape[1]), (B.shape[0], k)], name
        assert kept[name][0] == 8 and kept[name][3] == [(8, A.shape[1]), (B.shape[0], 8)], name
        torch.testing.assert_close(A, kept[name][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B, kept[name][2], rtol=1e-5, atol=1e-6)
    losses = {cut: [row["loss"] for row in trainer.state.log_history if "loss" in row] for cut, (trainer, _) in runs.items()}
    assert len(losses[True]) == 20 and losses[True] == pytest.approx(losses[False], abs=1e-5)


WIDE = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "vocab_size": 320}


def test_8bit_adam_moments_are_cut_with_their_block_maxima_when_the_ranks_freeze(tmp_path):
    """Factors of 4,096 values or more get bitsandbytes' 8-bit moments (blocks of 256 values, one maximum each). The
    ranks freeze at step 14 of 20; from there the cut run's moments are the kept components' own, B's quantized
    again, so its losses follow the uncut run's within the 8-bit rounding."""
    runs = {}
    for cut in (True, False):
        recipe = tiny_recipe(tmp_path / str(cut), model={"init_config": WIDE}, adapter={"init_rank": 5.0},
                             rank={"cut_at_freeze": cut}, train={"save_strategy": "no", "optim": "adamw_bnb_8bit"})
        runs[cut] = run(recipe)
    trainer = runs[True]
    state = unwrap_optimizer(trainer.optimizer).state
    eight_bit = 0
    for name, layer in trainer.layers.items():
        assert layer.components == layer.hard_rank() < 8, name
        for p in (layer.lora_A, layer.lora_B):
            assert state[p]["state1"].shape == state[p]["state2"].shape == p.shape, name
            if state[p]["state1"].dtype == torch.uint8:
                eight_bit += 1
                assert state[p]["absmax1"].numel() == state[p]["absmax2"].numel() == -(-p.numel() // 256), name
    assert eight_bit >= len(trainer.layers)
    losses = {cut: [row["loss"] for row in t.state.log_history if "loss" in row] for cut, t in runs.items()}
    assert len(losses[True]) == 20 and losses[True][:14] == losses[False][:14]
    assert losses[True][14:] == pytest.approx(losses[False][14:], abs=5e-3)


@pytest.mark.parametrize("paged", [False, True], ids=["AdamW8bit", "PagedAdamW8bit"])
def test_cutting_8bit_moments_keeps_whole_blocks_exactly_and_requantizes_the_rest(paged):
    """A's rows in front are whole blocks of 256 values: their codes and maxima are kept as they are. B's columns
    are not: they are decoded, cut and quantized again, within the 8-bit code's rounding of what they were.
    (On a CPU bitsandbytes keeps a paged optimizer's state unpaged.)"""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_blockwise

    from qlrlora.trainer import _cut_state

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(16, 512)), torch.nn.Parameter(torch.randn(512, 16))
    optimizer = (bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit)([a, b], lr=1e-3)
    for _ in range(3):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        optimizer.step()
    decoded = lambda st, i: dequantize_blockwise(st[f"state{i}"], absmax=st[f"absmax{i}"], code=st[f"qmap{i}"],
                                                 blocksize=256)
    before = {p: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)} for p in (a, b)}
    for p, dim in ((a, 0), (b, 1)):
        shape = p.shape
        torch.utils.swap_tensors(p, torch.nn.Parameter(p.data.narrow(dim, 0, 6).clone()))
        _cut_state(optimizer, p, shape, dim, 6)
    for i in (1, 2):
        st, old = optimizer.state[a], before[a]
        assert torch.equal(st[f"state{i}"], old[f"state{i}"][:6]) and torch.equal(st[f"absmax{i}"], old[f"absmax{i}"][:12])
        st, old = optimizer.state[b], before[b]
        assert st[f"state{i}"].shape == (512, 6) and st[f"absmax{i}"].shape == (12,)
        torch.testing.assert_close(decoded(st, i), decoded(old, i)[:, :6], rtol=0, atol=0.02 * float(old[f"absmax{i}"].max()))
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    optimizer.step()
    assert optimizer.state[b]["step"] == 4 and bool(torch.isfinite(b).all())


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_bnb_8bit"])
def test_a_run_resumed_from_cut_factors_reproduces_the_rest(tmp_path, optim):
    """With bitsandbytes the model is WIDE, so the cut factors of the MLP projections (5 x 1,024) have 8-bit moments,
    saved and restored with their block maxima."""
    model = {"init_config": WIDE} if optim == "adamw_bnb_8bit" else {}
    settings = {"model": model, "adapter": {"init_rank": 5.0}, "rank": {"mode": "fixed", "budget_avg_rank": None},
                "train": {"optim": optim}}
    full = tiny_recipe(tmp_path / "full", **settings)
    run(full)
    saved = load_file(str(Path(full.output.dir) / "checkpoint-10" / "lrlora_adapter.safetensors"))
    assert {t.shape[0] for name, t in saved.items() if name.endswith("lora_A")} == {5}
    resumed = tiny_recipe(tmp_path / "resumed", **{**settings, "output": {"resume": str(Path(full.output.dir) / "checkpoint-10")}})
    trainer = run(resumed)
    assert {layer.components for layer in trainer.layers.values()} == {5}
    if optim == "adamw_bnb_8bit":
        state = unwrap_optimizer(trainer.optimizer).state
        assert any(state[p]["state1"].dtype == torch.uint8 for layer in trainer.layers.values() for p in (layer.lora_A, layer.lora_B))
    a, b = history(full.output.dir), history(resumed.output.dir)
    for step in range(11, 21):
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5, (step, a[step]["loss"], b[step]["loss"])


def test_an_optimizer_whose_state_is_not_torchs_keeps_the_factors_whole_and_says_so(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, adapter={"init_rank": 5.0}, rank={"mode": "fixed", "budget_avg_rank": None},
                         train={"save_strategy": "no", "optim": "adafactor", "max_steps": 3})
    trainer = run(recipe)
    assert {layer.components for layer in trainer.layers.values()} == {8}
    assert "the factors keep r_max components, masked (the optimizer Adafactor keeps a state" in capsys.readouterr().err


def sorted_largest_first(trainer) -> dict[str, bool]:
    """Per layer: whether its switched-on components are in order of size, largest first."""
    result = {}
    for name, layer in trainer.layers.items():
        k = layer.hard_rank()
        size = layer.lora_B[:, :k].float().norm(dim=0) * layer.lora_A[:k].float().norm(dim=1)
        result[name] = bool((size[:-1] >= size[1:]).all())
    return result


def test_while_the_ranks_move_ordered_components_stay_sorted_largest_first(tmp_path, capsys):
    """With rank.order_components every layer's live components are sorted after each step of the pruning
    phase (here the whole run after the warm-up); without it they are not; an optimizer whose state is not
    torch's leaves them as they are and says so."""
    runs = {}
    for order, optim in ((True, "adamw_torch"), (False, "adamw_torch"), (True, "adafactor")):
        recipe = tiny_recipe(tmp_path / f"{order}{optim}", rank={"order_components": order, "freeze_fraction": 1.0},
                             train={"save_strategy": "no", "optim": optim})
        trainer = run(recipe)
        assert trainer.controller.phase == "pruning"
        runs[order, optim] = sorted_largest_first(trainer)
    assert all(runs[True, "adamw_torch"].values())
    assert not all(runs[False, "adamw_torch"].values()) and not all(runs[True, "adafactor"].values())
    assert "rank.order_components is off for this run (the optimizer Adafactor keeps a state" in capsys.readouterr().err
