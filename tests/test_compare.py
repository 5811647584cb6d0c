import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from qlrlora.commonsense import TASKS, _described, mc_row, write_mixture
from qlrlora.compare import (
    Job,
    Protocol,
    best_learning_rates,
    differentiation,
    late_losses,
    load_results,
    logged_losses,
    peft_config,
    prepare,
    read_protocol,
    recipe_for,
    spearman,
    stage_jobs,
    summarize,
)
from qlrlora.errors import QLRError
from tests.conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def mixture(tmp_path):
    """A commonsense mixture of 40 training and 6 validation questions per task, in the real file layout."""
    def rows(split, n):
        return {t: [mc_row(t, split, i, f"{t} {split} question {i}?\n A. yes\n B. no\nAnswer:", 2, i % 2)
                    for i in range(n)] for t in TASKS}

    out = tmp_path / "mixture"
    out.mkdir()
    write_mixture(out, {"train": rows("train", 40), "val": rows("val", 6)}, "test")
    return _described(out)


def test_prepare_splits_training_rows_from_a_disjoint_held_out_slice(tmp_path, mixture):
    counts = prepare(tmp_path / "b", Protocol(model="m", train_rows=200, heldout_rows=50, val_per_task=4), mixture)
    assert counts["train.jsonl"] == 200 and counts["heldout.jsonl"] == 50 and counts["val/piqa.jsonl"] == 4
    data = tmp_path / "b" / "data"
    train = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (data / "heldout.jsonl").read_text().splitlines()]
    assert set(train[0]) == {"prompt", "completion"}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert {"prompt", "choices", "gold", "task"} <= set(heldout[0])
    assert read_protocol(tmp_path / "b").train_rows == 200
    prepare(tmp_path / "c", Protocol(model="m", train_rows=200, heldout_rows=50, val_per_task=4), mixture)
    assert (data / "train.jsonl").read_bytes() == (tmp_path / "c" / "data" / "train.jsonl").read_bytes()
    with pytest.raises(QLRError, match="rows asked for"):
        prepare(tmp_path / "d", Protocol(model="m", train_rows=300, heldout_rows=50), mixture)


def result(method, lr, seed, heldout, avg=0.5, ranks=None):
    return {"method": method, "lr": lr, "seed": seed, "heldout": {"average": heldout},
            "validation": {"average": avg, "tasks": {"piqa": {"accuracy": avg}}}, "adapter_params": 10,
            "train_s": 1.0, "trained_tokens": 100, "peak_gib": None, "ranks": ranks}


def test_learning_rates_are_chosen_on_the_held_out_training_slice_only():
    results = [result("lora", 1e-3, 0, 0.60, avg=0.40), result("lora", 2e-3, 0, 0.55, avg=0.90),
               result("lora", 5e-4, 0, 0.60, avg=0.30), result("lora", 1e-3, 1, 0.99),
               result("dora", 1e-3, 0, 0.50)]
    # the best held-out score wins (ties: the smaller rate); validation scores and other seeds play no part
    assert best_learning_rates(results) == {"lora": 5e-4, "dora": 1e-3}


def test_peft_configs_of_the_baselines():
    protocol = Protocol()
    flags = {m: (c.use_dora, c.use_rslora, c.r) for m in ("lora", "lora_rslora", "dora", "dora_rslora")
             for c in [peft_config(Job(m, 0, 1e-3), protocol, 100)]}
    assert flags == {"lora": (False, False, 8), "lora_rslora": (False, True, 8), "dora": (True, False, 8),
                     "dora_rslora": (True, True, 8)}
    adalora = peft_config(Job("adalora", 0, 1e-3), protocol, 100)
    assert (adalora.init_r, adalora.target_r, adalora.total_step) == (12, 8, 100)


def test_lr_lora_scales_match_lora_and_rslora(tmp_path):
    protocol = Protocol()  # rank 8, alpha 16, r_max 16

    def scale(method):
        adapter = recipe_for(tmp_path, Job(method, 0, 1e-3), protocol).adapter
        return adapter.alpha / math.sqrt(adapter.r_max)

    assert scale("lr_lora_budget") == pytest.approx(16 / 8) and scale("uniform_fixed") == pytest.approx(16 / 8)
    assert scale("lr_lora_budget_rslora") == pytest.approx(16 / math.sqrt(8))
    assert recipe_for(tmp_path, Job("lr_lora_budget_rslora", 0, 1e-3), protocol).rank.mode == "budget"


def test_epochs_are_passes_over_the_same_sample(tmp_path):
    recipe = recipe_for(tmp_path, Job("lr_lora_budget", 0, 1e-3), Protocol(epochs=3))
    assert recipe.train["num_train_epochs"] == 3


def test_spearman_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(0.894427, rel=1e-5)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def ranks_of(values):
    names = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj")]
    kinds = ["attention", "attention", "mlp"] * 2
    return [{"module": n, "kind": k, "hard_rank": v} for n, k, v in zip(names, kinds, values)]


def test_differentiation_measures():
    seed0, seed1 = ranks_of([2, 4, 12, 4, 6, 14]), ranks_of([3, 4, 11, 4, 7, 15])
    d = differentiation([seed0, seed1])
    assert d["mean_rank"] == pytest.approx(7.0)
    assert d["cv"] == pytest.approx((sum((v - 7) ** 2 for v in [2, 4, 12, 4, 6, 14]) / 6) ** 0.5 / 7)
    assert d["mlp_over_attention"] == pytest.approx(13 / 4)
    assert d["o_over_qkv"] == pytest.approx(5 / 3)
    assert d["depth_spearman"] == pytest.approx(spearman([0, 0, 0, 1, 1, 1], [2, 4, 12, 4, 6, 14]))
    assert d["seed_spearman"] == pytest.approx(spearman([2, 4, 12, 4, 6, 14], [3, 4, 11, 4, 7, 15]))
    # per projection across the two blocks: q (2, 4) vs (3, 4), o (4, 6) vs (4, 7), up (12, 14) vs (11, 15)
    assert d["seed_spearman_within_projection"] == pytest.approx(1.0)
    flipped = differentiation([seed0, ranks_of([4, 4, 15, 2, 7, 11])])
    assert flipped["seed_spearman_within_projection"] == pytest.approx((-1 + 1 - 1) / 3)
    assert differentiation([seed0])["seed_spearman"] is None


def bench_dir(tmp_path, results):
    directory = tmp_path / "bench"
    (directory / "jobs").mkdir(parents=True)
    (directory / "protocol.json").write_text(json.dumps({"model": "m", "learning_rates": [1e-3, 2e-3]}))
    for r in results:
        job = Job.of(r)
        (directory / "jobs" / job.name).mkdir()
        (directory / "jobs" / job.name / "result.json").write_text(json.dumps(r))
    return directory


def test_final_stage_runs_at_the_chosen_rates_and_permutes_within_each_projection(tmp_path):
    learned = ranks_of([2, 4, 12, 4, 6, 14])
    sweep = [result(m, lr, 0, 0.5 + (lr == 2e-3) * (m == "lr_lora_budget") * 0.1, ranks=learned)
             for m in ("lora", "dora", "adalora", "lr_lora_budget") for lr in (1e-3, 2e-3)]
    directory = bench_dir(tmp_path, sweep)
    with pytest.raises(QLRError, match="ranks.json is missing"):
        stage_jobs(directory, "final", read_protocol(directory))
    (directory / "jobs" / "lr_lora_budget-lr0.002-s0" / "ranks.json").write_text(json.dumps({"layers": learned}))
    jobs = {j.name for j in stage_jobs(directory, "final", read_protocol(directory))}
    assert jobs == {"lora-lr0.001-s1", "lora-lr0.001-s2", "lr_lora_budget-lr0.002-s1", "lr_lora_budget-lr0.002-s2",
                    "lora_rslora-lr0.001-s0", "dora_rslora-lr0.001-s0", "lr_lora_penalty-lr0.002-s0", "learned_ranks_fixed-lr0.002-s0",
                    "permuted_ranks_fixed-lr0.002-s0", "uniform_fixed-lr0.002-s0", "uniform_fixed_peft_init-lr0.002-s0"}
    permuted = json.loads((directory / "jobs" / "lr_lora_budget-lr0.002-s0" / "permuted_ranks.json").read_text())["layers"]
    for projection in ("q_proj", "o_proj", "up_proj"):
        got = sorted(r["hard_rank"] for r in permuted if r["module"].endswith(projection))
        assert got == sorted(r["hard_rank"] for r in learned if r["module"].endswith(projection))
    # A control at another rate retrains the ranks of LR-LoRA's seed-0 run at that rate, not the chosen one's.
    for method, name in (("learned_ranks_fixed", "ranks.json"), ("permuted_ranks_fixed", "permuted_ranks.json")):
        ranks_file = recipe_for(directory, Job(method, 1, 1e-3), read_protocol(directory)).adapter.ranks_file
        assert ranks_file == str(directory / "jobs" / "lr_lora_budget-lr0.001-s0" / name)
    with pytest.raises(QLRError, match="has no finished run of"):
        stage_jobs(bench_dir(tmp_path / "x", sweep[:2]), "final", read_protocol(directory))


def test_every_method_that_is_not_swept_is_reported_and_paired_at_the_rate_of_the_method_it_varies(tmp_path):
    results = [result("lora", 1e-3, 0, 0.6), result("lora", 3e-3, 0, 0.7, avg=0.40), result("lora", 3e-3, 1, 0.5, avg=0.42),
               result("lr_lora_budget", 1e-3, 0, 0.7, ranks=ranks_of([2, 4, 12, 4, 6, 14])),
               result("lr_lora_budget", 3e-3, 0, 0.6), result("lora_rslora", 1e-3, 0, 0.5), result("lora_rslora", 3e-3, 0, 0.5)]
    results += [result(m, lr, s, 0.5, avg=0.45 + s / 100 + (lr == 1e-3))
                for m in ("lr_lora_budget_peft_init", "lr_lora_penalty", "uniform_fixed_peft_init")
                for lr in (1e-3, 3e-3) for s in (0, 1)]
    summary = summarize(bench_dir(tmp_path, results))
    rates = {m: (v["lr"], v["seeds"]) for m, v in summary["methods"].items()}
    assert rates == {"lora": (3e-3, [0, 1]), "lr_lora_budget": (1e-3, [0]), "lora_rslora": (3e-3, [0]),
                     "lr_lora_budget_peft_init": (1e-3, [0, 1]), "lr_lora_penalty": (1e-3, [0, 1]),
                     "uniform_fixed_peft_init": (1e-3, [0, 1])}
    pair = next(p for p in summary["paired"] if p["method"] == "lr_lora_budget_peft_init" and p["baseline"] == "lora")
    assert pair["seeds"] == [0, 1] and pair["validation"]["per_seed"] == pytest.approx([1.05, 1.04])


def test_a_variant_of_rank_settings_is_a_method_of_its_own_in_the_report(tmp_path, monkeypatch):
    """Jobs that change LR-LoRA's rank settings are reported apart from LR-LoRA, at its chosen rate, paired
    with LoRA and with LR-LoRA, and shown on the held-out slice at seed 0 (where a variant is chosen)."""
    learned = ranks_of([2, 4, 12, 4, 6, 14])
    results = [result("lora", 3e-3, s, 0.6, avg=0.40 + s / 100) for s in (0, 1)]
    results += [result("lr_lora_budget", 3e-3, s, 0.7, avg=0.41, ranks=learned) for s in (0, 1)]
    results += [result("lr_lora_budget", 1e-3, 0, 0.5, ranks=learned)]
    variant = [dict(result("lr_lora_budget", lr, s, 0.99, avg=0.45 + s / 100, ranks=learned), rank={"rank_lr": 0.02})
               for lr in (1e-3, 3e-3) for s in (0, 1)]
    summary = summarize(bench_dir(tmp_path, results + variant))
    label = "lr_lora_budget[rank_lr=0.02]"
    # The variant's held-out 0.99 at seed 0 and 1e-3 does not choose LR-LoRA's rate, nor join its row.
    assert summary["methods"]["lr_lora_budget"]["seeds"] == [0, 1] and summary["methods"]["lr_lora_budget"]["lr"] == 3e-3
    assert summary["methods"]["lr_lora_budget"]["avg"] == pytest.approx(0.41)
    assert summary["methods"][label]["lr"] == 3e-3 and summary["methods"][label]["avg"] == pytest.approx(0.455)
    assert summary["sweep_heldout"][label] == {"0.001": 0.99, "0.003": 0.99}
    assert summary["differentiation"]["seeds"] == 2
    pairs = {(p["method"], p["baseline"]): p["validation"]["per_seed"] for p in summary["paired"]}
    assert pairs[(label, "lora")] == pytest.approx([0.05, 0.05])
    assert pairs[(label, "lr_lora_budget")] == pytest.approx([0.04, 0.05])
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from bench_commonsense import markdown

    table = [line for line in markdown(summary).splitlines() if line.startswith(f"| {label} | 0.003 | 0,1 | 0.4550 |")]
    assert len(table) == 1  # its row in the validation table


def test_a_row_names_the_cards_its_runs_trained_on(tmp_path, monkeypatch):
    """A row's times average its seeds' runs, which may come from different cards; the row says which."""
    results = [dict(result("lora", 3e-3, s, 0.6), device=device)
               for s, device in enumerate(["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "NVIDIA H200"])]
    results.append(result("lora", 3e-3, 3, 0.6))  # a result from before jobs recorded their card
    summary = summarize(bench_dir(tmp_path, results))
    assert summary["methods"]["lora"]["cards"] == {"NVIDIA H100 80GB HBM3": 2, "NVIDIA H200": 1, "not recorded": 1}
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from bench_commonsense import markdown

    table = markdown(summary).splitlines()
    assert table[2].endswith("| peak GiB | cards |")
    assert table[4].startswith("| lora |") and table[4].endswith("| H100 80GB HBM3 x2, H200 x1, not recorded x1 |")


def test_a_variant_job_is_parsed_named_and_its_trainer_gets_its_rank_settings(tmp_path, mixture, monkeypatch):
    from qlrlora.assets import build_from_config
    from qlrlora.compare import job_trainer

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from bench_commonsense import _parsed_jobs

    (job,) = _parsed_jobs(["lr_lora_budget_peft_init:1:3e-3:rank_lr=0.02,freeze_fraction=0.5"])
    assert job == Job("lr_lora_budget_peft_init", 1, 3e-3, {"rank_lr": 0.02, "freeze_fraction": 0.5})
    assert job.name == "lr_lora_budget_peft_init-freeze_fraction0.5-rank_lr0.02-lr0.003-s1"
    assert job.label == "lr_lora_budget_peft_init[freeze_fraction=0.5,rank_lr=0.02]"
    assert Job(**json.loads(json.dumps(dataclasses.asdict(job)))) == job  # how a job reaches its process
    (ordered,) = _parsed_jobs(["lr_lora_budget_peft_init:0:3e-3:order_components=true"])
    assert ordered.rank == {"order_components": True}
    assert ordered.name == "lr_lora_budget_peft_init-order_componentstrue-lr0.003-s0"
    assert ordered.label == "lr_lora_budget_peft_init[order_components=true]"
    for bad in ("lr_lora_budget:0:3e-3:rank_lr", "lr_lora_budget:0:3e-3:rank_lr=0.02:freeze_fraction=0.5",
                "lr_lora_budget:0:3e-3:order_components=yes"):
        with pytest.raises(QLRError, match="expected METHOD:SEED:LR"):
            _parsed_jobs([bad])
    directory = tmp_path / "bench"
    prepare(directory, Protocol(model=str(build_from_config(TINY_LLAMA)), train_rows=16, heldout_rows=4,
                                val_per_task=1, batch_size=4, max_length=64), mixture)
    protocol = read_protocol(directory)
    recipe = recipe_for(directory, job, protocol)
    assert (recipe.rank.mode, recipe.rank.budget_avg_rank, recipe.rank.rank_lr, recipe.rank.freeze_fraction) == (
        "budget", 8.0, 0.02, 0.5)
    assert job_trainer(directory, job, protocol, recipe).controller.config.rank_lr == 0.02
    assert recipe_for(directory, ordered, protocol).rank.order_components is True
    for bad, match in ((Job("lora", 0, 3e-3, {"rank_lr": 0.02}), "apply to a method that learns its ranks"),
                       (Job("lr_lora_budget", 0, 3e-3, {"budget_avg_rank": 4.0}), "rank.budget_avg_rank: not a setting"),
                       (Job("lr_lora_budget", 0, 3e-3, {"freeze_fraction": 2.0}), "rank.freeze_fraction: expected"),
                       (Job("lr_lora_budget", 0, 3e-3, {"r_max": 12.5}), "r_max: expected a whole number"),
                       (Job("lr_lora_budget", 0, 3e-3, {"r_max": 4.0}), "r_max: expected a whole number")):
        with pytest.raises(QLRError, match=match):
            recipe_for(directory, bad, protocol)
    bad = subprocess.run([sys.executable, "tools/bench_commonsense.py", "run", str(directory), "--jobs",
                          "lora:0:3e-3", "lr_lora_budget:0:3e-3:warmup_fraction=0.9,freeze_fraction=0.5"],
                         check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "rank.freeze_fraction: expected a number in [warmup_fraction=0.9, 1]" in bad.stderr
    assert not (directory / "jobs" / "lora-lr0.003-s0").exists()  # checked before any job started
    (fewer,) = _parsed_jobs(["lr_lora_budget_peft_init:0:3e-3:r_max=12,rank_lr=0.1"])
    assert fewer.name == "lr_lora_budget_peft_init-r_max12-rank_lr0.1-lr0.003-s0"
    recipe = recipe_for(directory, fewer, protocol)
    assert (recipe.adapter.r_max, recipe.rank.rank_lr, recipe.rank.budget_avg_rank) == (12, 0.1, 8.0)
    assert recipe.adapter.alpha / math.sqrt(12) == pytest.approx(protocol.alpha / protocol.rank)  # LoRA's scale
    layers = job_trainer(directory, fewer, protocol, recipe).layers.values()
    assert {layer.lora_A.shape[0] for layer in layers} == {12}


def test_summary_reports_the_seeds_of_the_chosen_rate_only(tmp_path):
    learned = ranks_of([2, 4, 12, 4, 6, 14])
    results = [result("lora", 1e-3, 0, 0.6, avg=0.40), result("lora", 2e-3, 0, 0.5, avg=0.99),
               result("lora", 1e-3, 1, 0.6, avg=0.44), result("lr_lora_budget", 1e-3, 0, 0.6, avg=0.5, ranks=learned),
               result("lr_lora_budget", 1e-3, 1, 0.6, avg=0.52, ranks=ranks_of([3, 4, 11, 4, 7, 15]))]
    directory = bench_dir(tmp_path, results)
    summary = summarize(directory)
    lora = summary["methods"]["lora"]
    assert lora["seeds"] == [0, 1] and lora["avg"] == pytest.approx(0.42) and lora["std"] == pytest.approx(0.02 * 2**0.5)
    assert summary["sweep_heldout"]["lora"] == {"0.001": 0.6, "0.002": 0.5}
    assert summary["learned_ranks"]["model.layers.0.mlp.up_proj"] == [12, 11]
    assert summary["differentiation"]["seeds"] == 2 and summary["learning_rates"] == "chosen on the held-out slice"
    # Every method at one rate instead: LoRA's 2e-3 run alone, and no LR-LoRA, which never ran at 2e-3.
    fixed = summarize(directory, learning_rate=2e-3)
    assert fixed["methods"]["lora"]["seeds"] == [0] and fixed["methods"]["lora"]["avg"] == pytest.approx(0.99)
    assert "lr_lora_budget" not in fixed["methods"] and fixed["learning_rates"] == "all at 0.002"
    report = subprocess.run([sys.executable, "tools/bench_commonsense.py", "report", str(directory)], check=False,
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "learning rates chosen on the held-out slice)" in report.stdout, report.stdout
    assert f"| +0.090 (seed std {0.02 * 2**0.5:.3f}) |" in report.stdout, report.stdout  # 0.51 - 0.42
    # A method of one seed beside a seeded LoRA: LoRA's std is not that method's noise, and the cell says so.
    one = bench_dir(tmp_path / "one", [*results, result("dora", 1e-3, 0, 0.6, avg=0.45)])
    report = subprocess.run([sys.executable, "tools/bench_commonsense.py", "report", str(one)], check=False,
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert f"| +0.030 (seed std {0.02 * 2**0.5:.3f} of lora; dora has one seed) |" in report.stdout, report.stdout
    assert "## Learning-rate sweep: accuracy on the held-out slice" in report.stdout  # lora at two rates
    single = bench_dir(tmp_path / "single", [results[0], results[3]])
    report = subprocess.run([sys.executable, "tools/bench_commonsense.py", "report", str(single)], check=False,
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "## Accuracy at learning rate 0.001 on the held-out slice" in report.stdout, report.stdout
    assert "sweep" not in report.stdout
    fixed = subprocess.run([sys.executable, "tools/bench_commonsense.py", "report", str(directory), "--learning-rate", "2e-3"],
                           check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "learning rates all at 0.002)" in fixed.stdout and "| lora | 0.002 | 0 | 0.9900 |" in fixed.stdout, fixed.stdout


def test_methods_are_compared_with_their_baselines_seed_by_seed(tmp_path):
    learned = ranks_of([2, 4, 12, 4, 6, 14])
    results = [result("lora", 1e-3, 0, 0.40, avg=0.40), result("lora", 1e-3, 1, 0.50, avg=0.44),
               result("lr_lora_budget", 1e-3, 0, 0.43, avg=0.41, ranks=learned),
               result("lr_lora_budget", 1e-3, 1, 0.46, avg=0.47, ranks=learned),
               result("lr_lora_budget", 1e-3, 2, 0.9, avg=0.9, ranks=learned),  # no LoRA run of seed 2 to pair it with
               result("lr_lora_budget", 2e-3, 0, 0.1, avg=0.1, ranks=learned),  # not the chosen rate
               result("dora", 1e-3, 0, 0.42, avg=0.45), result("dora", 1e-3, 1, 0.42, avg=0.42),
               result("learned_ranks_fixed", 1e-3, 0, 0.5, avg=0.42), result("uniform_fixed", 1e-3, 0, 0.4, avg=0.40)]
    summary = summarize(bench_dir(tmp_path, results))
    pairs = {(p["method"], p["baseline"]): p for p in summary["paired"]}
    assert set(pairs) == {("lr_lora_budget", "lora"), ("lr_lora_budget", "dora"), ("lr_lora_budget", "learned_ranks_fixed"),
                          ("lr_lora_budget", "uniform_fixed"), ("uniform_fixed", "lora"),
                          ("learned_ranks_fixed", "uniform_fixed")}
    assert pairs["lr_lora_budget", "uniform_fixed"]["validation"]["per_seed"] == pytest.approx([0.01])
    assert pairs["uniform_fixed", "lora"]["validation"]["per_seed"] == pytest.approx([0.0])
    assert pairs["lr_lora_budget", "learned_ranks_fixed"]["validation"]["per_seed"] == pytest.approx([-0.01])
    assert pairs["lr_lora_budget", "learned_ranks_fixed"]["heldout"]["per_seed"] == pytest.approx([-0.07])
    assert pairs["lr_lora_budget", "dora"]["validation"]["per_seed"] == pytest.approx([-0.04, 0.05])
    ours = pairs["lr_lora_budget", "lora"]
    assert ours["seeds"] == [0, 1]
    assert ours["validation"]["per_seed"] == pytest.approx([0.01, 0.03])
    assert ours["validation"]["mean"] == pytest.approx(0.02) and ours["validation"]["std"] == pytest.approx(0.02 / 2**0.5)
    assert ours["heldout"]["per_seed"] == pytest.approx([0.03, -0.04])
    assert pairs["learned_ranks_fixed", "uniform_fixed"]["validation"]["std"] is None
    report = subprocess.run([sys.executable, "tools/bench_commonsense.py", "report", str(tmp_path / "bench")],
                            check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "| lr_lora_budget | lora | 0,1 | +0.0100 +0.0300 | +0.0200 | 0.0141 | +0.0300 -0.0400 | -0.0050 | 0.0495 |" \
        in report.stdout, report.stdout
    assert "| learned_ranks_fixed | uniform_fixed | 0 | +0.0200 | +0.0200 |  | +0.1000 | +0.1000 |  |" in report.stdout


def console_log(losses, cut=False):
    """A job's log.txt as the trainer writes it: progress bars with carriage returns, a dict per logging window."""
    bars = "".join(f"\r{i}/546 [00:{i:02d}<09:00, 1.0it/s]" for i in range(3))
    windows = [f"{{'loss': '{v}', 'grad_norm': '0.1', 'epoch': '{0.1 * i:.4g}'}}\n" for i, v in enumerate(losses)]
    return bars + bars.join(windows) + ("{'loss': '0.9', 'grad_" if cut else "") + "{'train_runtime': '30.0'}\n"


def test_late_losses_are_read_from_the_job_logs_and_set_beside_the_accuracies(tmp_path):
    results = [result("lora", 1e-3, 0, 0.50, avg=0.48), result("lora", 1e-3, 1, 0.52, avg=0.47),
               result("uniform_fixed", 1e-3, 0, 0.49, avg=0.49), result("uniform_fixed", 1e-3, 1, 0.40, avg=0.40),
               result("dora", 1e-3, 0, 0.6, avg=0.6), result("lora", 2e-3, 0, 0.1, avg=0.1)]
    directory = bench_dir(tmp_path, results)
    logs = {"lora-lr0.001-s0": [2.0, 0.50, 0.46], "lora-lr0.001-s1": [2.0, 0.52, 0.46],
            "uniform_fixed-lr0.001-s0": [2.0, 0.49, 0.43], "uniform_fixed-lr0.001-s1": [2.0, 0.60, 0.56],
            "dora-lr0.001-s0": [2.0, 0.40], "lora-lr0.002-s0": [9.0, 9.0, 9.0]}
    for name, losses in logs.items():
        (directory / "jobs" / name / "log.txt").write_text(console_log(losses, cut=name.startswith("uniform")))
    assert logged_losses(directory / "jobs" / "uniform_fixed-lr0.001-s1" / "log.txt") == [2.0, 0.60, 0.56]
    late = late_losses(directory, 1e-3, windows=2)
    assert late["logged_windows"] == 3 and late["skipped"] == ["dora-lr0.001-s0"]  # a shorter log: its windows differ
    by_job = {j["job"]: j for j in late["jobs"]}
    assert set(by_job) == {"lora-lr0.001-s0", "lora-lr0.001-s1", "uniform_fixed-lr0.001-s0", "uniform_fixed-lr0.001-s1"}
    assert by_job["uniform_fixed-lr0.001-s1"]["late_loss"] == pytest.approx(0.58)
    assert late["spearman_validation"] == pytest.approx(-1.0)  # losses 0.48 0.49 0.46 0.58 against 0.48 0.47 0.49 0.40
    against = {(d["method"], d["seed"]): d for d in late["against_lora"]}
    assert set(against) == {("uniform_fixed", 0), ("uniform_fixed", 1)}
    assert against["uniform_fixed", 1]["late_loss"] == pytest.approx(0.58 - 0.49)
    assert against["uniform_fixed", 1]["validation"] == pytest.approx(0.40 - 0.47)
    assert against["uniform_fixed", 0]["heldout"] == pytest.approx(-0.01)
    with pytest.raises(QLRError, match="logged 4 training losses"):
        late_losses(directory, 1e-3, windows=4)
    report = subprocess.run([sys.executable, "tools/bench_commonsense.py", "losses", str(directory), "--learning-rate",
                             "1e-3", "--windows", "2"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "across 4 jobs: validation -1.000" in report.stdout and "Skipped (a shorter log): dora-lr0.001-s0." in report.stdout
    assert "| uniform_fixed | 1 | +0.0900 | -0.0700 | -0.1200 |" in report.stdout, report.stdout


def test_a_diverged_run_shows_in_the_sweep_and_nowhere_else(tmp_path):
    diverged = {"method": "lora", "lr": 1e-2, "seed": 0, "diverged_at_step": 75, "error": "training diverged"}
    results = [result("lora", 1e-3, 0, 0.6, avg=0.40), diverged]
    assert best_learning_rates(results) == {"lora": 1e-3}
    directory = bench_dir(tmp_path, results)
    summary = summarize(directory)
    assert summary["sweep_heldout"]["lora"] == {"0.001": 0.6, "0.01": "diverged at step 75"}
    assert summary["methods"]["lora"]["seeds"] == [0] and summary["methods"]["lora"]["lr"] == 1e-3
    report = subprocess.run([sys.executable, "tools/bench_commonsense.py", "report", str(directory)], check=False,
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| lora | 0.6000 | diverged at step 75 |" in report.stdout


def test_tiny_benchmark_end_to_end(tmp_path, mixture):
    """Every kind of job trains and evaluates on a tiny NF4 Llama, and the report renders from the results."""
    from qlrlora.assets import build_from_config
    from qlrlora.compare import run_job

    directory = tmp_path / "bench"
    model = str(build_from_config(TINY_LLAMA))
    prepare(directory, Protocol(model=model, train_rows=64, heldout_rows=16, val_per_task=2, batch_size=8,
                                max_length=64, learning_rates=[1e-3], r_max=4, rank=2, adalora_init_r=3,
                                eval_batch_size=8), mixture)
    for job in (Job("base"), Job("lora", 0, 1e-3), Job("adalora", 0, 1e-3), Job("lr_lora_budget", 0, 1e-3)):
        out = run_job(directory, job)
        assert 0 <= out["validation"]["average"] <= 1 and len(out["validation"]["tasks"]) == len(TASKS)
    # A job stopped after training (its result.json never written) is evaluated again without training.
    for job in (Job("lora", 0, 1e-3), Job("adalora", 0, 1e-3), Job("lr_lora_budget", 0, 1e-3)):
        path = directory / "jobs" / job.name / "result.json"
        first = json.loads(path.read_text())
        path.unlink()
        again = run_job(directory, job)
        assert again["evaluated_on_restart"] and again["train_s"] == first["train_s"]
        assert again["validation"] == first["validation"] and again["heldout"] == first["heldout"]
    # Both trainers stop a diverged run at its first logging step (every 25) and record where. The batch of 2
    # makes the 64 rows 32 steps.
    protocol = read_protocol(directory)
    protocol.batch_size = 2
    (directory / "protocol.json").write_text(json.dumps(dataclasses.asdict(protocol)))
    for method in ("lora", "lr_lora_budget"):
        out = run_job(directory, Job(method, 0, 1e30))
        assert out["diverged_at_step"] == 25 and "validation" not in out, out
    results = {r["method"]: r for r in load_results(directory) if "diverged_at_step" not in r}
    assert results["lora"]["adapter_params"] == 2 * sum(
        k + d for k, d in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]) * 2
    assert results["lr_lora_budget"]["adapter_params"] <= results["lora"]["adapter_params"]
    assert results["lr_lora_budget"]["train_steps"] == 8 and len(results["lr_lora_budget"]["ranks"]) == 14
    assert {r["device"] for r in results.values()} == {"cpu"}  # the card each job ran on, with its result
    report = subprocess.run([sys.executable, "tools/bench_commonsense.py", "report", str(directory),
                             "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "ranks.png")], check=False,
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| lr_lora_budget | 0.001 | 0 |" in report.stdout and (tmp_path / "ranks.png").is_file()
    assert "(one seed each: noise not measured)" in report.stdout  # a difference never shows without its noise
    summary = json.loads((tmp_path / "c.json").read_text())
    assert set(summary["methods"]) == {"base", "lora", "adalora", "lr_lora_budget"}
    assert summary["sweep_heldout"]["lora"]["1e+30"].startswith("diverged at step")


def test_our_layer_at_a_fixed_rank_trains_as_the_stock_lora_job_does(tmp_path, mixture):
    """The bench's uniform_fixed_peft_init job (our layer and trainer, rank 8 of r_max 16, started from the A of the
    lora job of its seed) and that lora job (PEFT r=8 through TRL) are the same training: scale, optimizer,
    schedule, clipping, data order and loss.
    NF4 with bf16 factors, as on the GPU; what remains is bf16 rounding."""
    import torch

    from qlrlora.assets import build_from_config
    from qlrlora.compare import _peft_trainer, job_trainer
    from qlrlora.sft import build_trainer

    directory = tmp_path / "bench"
    prepare(directory, Protocol(model=str(build_from_config(TINY_LLAMA)), train_rows=128, heldout_rows=4,
                                val_per_task=1, batch_size=4, max_length=64, warmup_ratio=0.1), mixture)
    protocol = read_protocol(directory)
    job = Job("uniform_fixed_peft_init", 0, 2e-3)
    drawn_by_us = {name: layer.lora_A[:8].clone()
                   for name, layer in build_trainer(recipe_for(directory, job, protocol)).layers.items()}
    ours = job_trainer(directory, job, protocol, recipe_for(directory, job, protocol))
    lora = _peft_trainer(recipe_for(directory, Job("lora", 0, 2e-3), protocol), Job("lora", 0, 2e-3), protocol)
    peft_A = {n.replace("base_model.model.", "").replace(".lora_A.default.weight", ""): p
              for n, p in lora.model.named_parameters() if "lora_A" in n}
    layers = ours.layers
    assert layers.keys() == peft_A.keys() and all(layer.hard_rank() == 8 for layer in layers.values())
    for name, layer in layers.items():  # the lora job of the same seed starts from the A it was given
        assert layer.lora_A.dtype == peft_A[name].dtype == torch.bfloat16
        assert torch.equal(layer.lora_A[:8], peft_A[name]) and not torch.equal(drawn_by_us[name], peft_A[name])
    losses = {}
    for label, trainer in (("lora", lora), ("ours", ours)):
        trainer.train()
        losses[label] = [(row["loss"], row["grad_norm"]) for row in trainer.state.log_history if "loss" in row]
    (loss, grad_norm), (our_loss, our_grad_norm) = losses["lora"][-1], losses["ours"][-1]
    assert len(losses["lora"]) == len(losses["ours"]) == 1  # step 25 of 32
    assert loss < 5.5  # the adapters trained: the untrained tiny model starts near ln(320) = 5.77
    assert our_loss == pytest.approx(loss, abs=1e-3) and our_grad_norm == pytest.approx(grad_norm, rel=0.03)
    tokens = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    lora.model.eval(), ours.model.eval()
    with torch.no_grad():  # and what the evaluation sees
        logits, our_logits = lora.model(input_ids=tokens).logits.float(), ours.model(input_ids=tokens).logits.float()
        with lora.model.disable_adapter():
            moved = (logits - lora.model(input_ids=tokens).logits.float()).abs().max()
    assert moved > 0.3 and (our_logits - logits).abs().max() < 0.02  # training moved them 0.73; bf16 rounding 0.007


def test_lr_lora_started_from_the_peft_draw_shares_loras_a_and_keeps_its_own_past_the_rank(tmp_path, mixture):
    """lr_lora_budget_peft_init: LR-LoRA (budget mode, every rank at r_max 16) whose first 8 components start from
    the A of the lora job of its seed, and whose components 8 to 15 are those plain LR-LoRA of that seed draws."""
    import torch

    from qlrlora.assets import build_from_config
    from qlrlora.compare import _peft_trainer, job_trainer

    directory = tmp_path / "bench"
    prepare(directory, Protocol(model=str(build_from_config(TINY_LLAMA)), train_rows=16, heldout_rows=4,
                                val_per_task=1, batch_size=4, max_length=64), mixture)
    protocol = read_protocol(directory)
    jobs = {m: Job(m, 1, 2e-3) for m in ("lr_lora_budget_peft_init", "lr_lora_budget", "lora")}
    started, plain = (job_trainer(directory, jobs[m], protocol, recipe_for(directory, jobs[m], protocol)).layers
                      for m in ("lr_lora_budget_peft_init", "lr_lora_budget"))
    peft_A = {n.replace("base_model.model.", "").replace(".lora_A.default.weight", ""): p for n, p in
              _peft_trainer(recipe_for(directory, jobs["lora"], protocol), jobs["lora"], protocol).model.named_parameters()
              if "lora_A" in n}
    assert started.keys() == plain.keys() == peft_A.keys() and len(started) == 14
    for name, layer in started.items():
        assert layer.r_max == 16 and layer.hard_rank() == 16
        assert torch.equal(layer.lora_A[:8], peft_A[name]) and not torch.equal(plain[name].lora_A[:8], peft_A[name])
        assert torch.equal(layer.lora_A[8:], plain[name].lora_A[8:])


def test_crosscheck_scores_a_trained_job_of_our_layer_through_peft(tmp_path, mixture):
    """crosscheck exports a job's adapter and scores it through PEFT's loader; on the CPU both score alike."""
    from qlrlora.assets import build_from_config
    from qlrlora.compare import PEFT_CROSSCHECK, _restore_trained, crosscheck, run_job
    from qlrlora.evaluate import load_mc_tasks, load_peft_adapter, score_questions
    from qlrlora.model import load_backbone
    from qlrlora.sft import build_trainer

    directory = tmp_path / "bench"
    prepare(directory, Protocol(model=str(build_from_config(TINY_LLAMA)), train_rows=64, heldout_rows=8, val_per_task=2,
                                batch_size=8, max_length=64, r_max=4, rank=2, eval_batch_size=8), mixture)
    protocol, job = read_protocol(directory), Job("lr_lora_budget", 0, 2e-3)  # learned: a rank per module
    expected = run_job(directory, job)
    with pytest.raises(QLRError, match="holds no trained adapter"):
        crosscheck(directory, Job("uniform_fixed", 0, 2e-3))
    with pytest.raises(QLRError, match="not a job of our layer"):
        crosscheck(directory, Job("lora", 0, 2e-3))
    result = crosscheck(directory, job)
    out = directory / "jobs" / job.name
    assert json.loads((out / PEFT_CROSSCHECK).read_text()) == result
    assert result["validation"] == expected["validation"] and result["heldout"] == expected["heldout"]
    # What the crosscheck rests on: the export is the trained adapter, scored alike by both codes.
    recipe = recipe_for(directory, job, protocol)
    ours = build_trainer(recipe)
    _restore_trained(ours, job, out)
    base, tokenizer = load_backbone(recipe.model)
    questions = [q for qs in load_mc_tasks(str(directory / "data" / "val")).values() for q in qs]
    untrained = score_questions(base, tokenizer, questions, 8, progress=False)
    theirs = score_questions(load_peft_adapter(base, out / "peft_adapter"), tokenizer, questions, 8, progress=False)
    mine = score_questions(ours.model, tokenizer, questions, 8, progress=False)
    gap = max(abs(a - b) for qa, qb in zip(mine, theirs) for a, b in zip(qa, qb))
    moved = max(abs(a - b) for qa, qb in zip(mine, untrained) for a, b in zip(qa, qb))
    assert moved > 0.5 and gap < 0.02  # training moved a choice's log-likelihood by 1.2; the two codes differ by 0.004


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "lr_lora_budget"])
def test_a_trained_adapter_restores_exactly_into_a_new_trainer(tmp_path, mixture, method):
    import torch

    from qlrlora.assets import build_from_config
    from qlrlora.compare import _peft_trainer, _restore_trained, _save_trained
    from qlrlora.sft import build_trainer

    directory = tmp_path / "bench"
    prepare(directory, Protocol(model=str(build_from_config(TINY_LLAMA)), train_rows=16, heldout_rows=4, val_per_task=1,
                                batch_size=8, max_length=64, r_max=4, rank=2, adalora_init_r=3), mixture)
    protocol, job = read_protocol(directory), Job(method, 0, 1e-3)
    out = directory / "jobs" / job.name
    out.mkdir(parents=True)

    def trainer():
        recipe = recipe_for(directory, job, protocol)
        return _peft_trainer(recipe, job, protocol) if method != "lr_lora_budget" else build_trainer(recipe)

    trained = trainer()
    torch.manual_seed(1)
    with torch.no_grad():  # stands in for training: every trainable tensor moves, AdaLoRA's E partly masked
        for name, p in trained.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
                if "lora_E" in name:
                    p[: p.shape[0] // 2] = 0
        if method == "lr_lora_budget":
            trained.controller.ranks.values.copy_(torch.tensor([1.0, 3.0] * 7)[: trained.controller.ranks.values.numel()])
    _save_trained(trained, job, out)
    restored = trainer()
    _restore_trained(restored, job, out)
    tokens = torch.randint(0, 320, (2, 12))
    trained.model.eval(), restored.model.eval()
    with torch.no_grad():
        assert torch.equal(trained.model(input_ids=tokens).logits, restored.model(input_ids=tokens).logits)


def test_an_adalora_checkpoint_without_its_state_is_refused_in_one_line(tmp_path, mixture):
    from qlrlora.assets import build_from_config
    from qlrlora.compare import ADALORA_STATE, _peft_trainer

    directory = tmp_path / "bench"
    prepare(directory, Protocol(model=str(build_from_config(TINY_LLAMA)), train_rows=16, heldout_rows=4, val_per_task=1,
                                batch_size=8, max_length=64, r_max=4, rank=2, adalora_init_r=3), mixture)
    protocol, job = read_protocol(directory), Job("adalora", 0, 1e-3)
    trainer = _peft_trainer(recipe_for(directory, job, protocol), job, protocol)
    checkpoint = tmp_path / "checkpoint-5"  # as PEFT alone writes it: the adapter, cut, and no ADALORA_STATE
    trainer.model.save_pretrained(checkpoint)
    with pytest.raises(QLRError, match=f"{checkpoint}: no {ADALORA_STATE} in this AdaLoRA checkpoint"):
        trainer._load_from_checkpoint(str(checkpoint))


def test_adalora_trains_on_peft_s_own_objective_with_its_orthogonality_term_added_once(tmp_path, mixture):
    """TRL's loss leaves out the orthogonality term that PEFT's AdaLoRA adds to `outputs.loss`; the bench adds it
    back, once: its training loss on a batch is the loss PEFT's own AdaLoRA model returns for it."""
    import torch

    from qlrlora.assets import build_from_config
    from qlrlora.compare import _peft_trainer

    directory = tmp_path / "bench"
    prepare(directory, Protocol(model=str(build_from_config(TINY_LLAMA)), train_rows=16, heldout_rows=4, val_per_task=1,
                                batch_size=8, max_length=64, r_max=4, rank=2, adalora_init_r=3), mixture)
    protocol, job = read_protocol(directory), Job("adalora", 0, 1e-3)
    trainer = _peft_trainer(recipe_for(directory, job, protocol), job, protocol)
    model = trainer.model
    torch.manual_seed(1)
    with torch.no_grad():  # away from PEFT's start, as after some training
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    batch = next(iter(trainer.get_train_dataloader()))
    task = trainer.compute_loss(model.eval(), batch)
    ours = trainer.compute_loss(model.train(), batch)
    peft = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(ours, peft, rtol=1e-5) and float(ours - task) > 0.1


# AdaLoRA's schedule over these 16 steps: the budget falls from step 2 and is allocated at step 10, then for good
# at step 11 from the importance averages (a stop at 11 resumes from those the checkpoint carries), and the steps
# after it mask the factors by that allocation (a stop at 13 resumes with the allocation the checkpoint carries).
@pytest.mark.parametrize(("method", "stop"), [("lora", 11), ("adalora", 11), ("adalora", 13), ("lr_lora_budget", 11)])
def test_a_job_stopped_by_sigterm_resumes_from_its_checkpoint_to_the_same_adapter(tmp_path, mixture, method, stop,
                                                                                   monkeypatch):
    import os
    import signal

    import torch
    from safetensors.torch import load_file

    from qlrlora.assets import build_from_config
    from qlrlora.compare import PEFT_WEIGHTS, JobStopped, run_job
    from qlrlora.rundir import COMPLETE_MARKER
    from qlrlora.trainer import StopOnDivergence

    protocol = Protocol(model=str(build_from_config(TINY_LLAMA)), train_rows=32, heldout_rows=4, val_per_task=1,
                        batch_size=4, max_length=64, r_max=4, rank=2, epochs=2)  # stopped in the second pass
    job = Job(method, 0, 1e-3)
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    for directory in (whole, parted):
        prepare(directory, protocol, mixture)
    expected = run_job(whole, job)

    step_end = StopOnDivergence.on_step_end

    def sigterm_at_the_stop(self, args, state, control, **kwargs):  # a real SIGTERM, as at a stage's deadline
        if state.global_step == stop:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(StopOnDivergence, "on_step_end", sigterm_at_the_stop)
    with pytest.raises(JobStopped, match=f"stopped at step {stop} of 16"):
        run_job(parted, job)
    out = parted / "jobs" / job.name
    assert (out / f"checkpoint-{stop}" / COMPLETE_MARKER).is_file() and not (out / "result.json").exists()
    monkeypatch.undo()
    resumed = run_job(parted, job)
    assert [(s["from_step"], s["to_step"]) for s in resumed["segments"]] == [(0, stop), (stop, 16)]
    assert resumed["train_steps"] == expected["train_steps"] == 16
    assert resumed["trained_tokens"] == expected["trained_tokens"] > 0
    assert not list(out.glob("checkpoint-*"))
    weights = PEFT_WEIGHTS if method in ("lora", "adalora") else "lrlora_adapter.safetensors"
    trained, again = load_file(str(whole / "jobs" / job.name / weights)), load_file(str(out / weights))
    assert trained.keys() == again.keys()  # the same run, to the bit: data order, dtypes, optimizer state, ranks
    assert all(again[name].dtype == trained[name].dtype and torch.equal(again[name], trained[name]) for name in trained)
    assert resumed["validation"] == expected["validation"]


def test_at_the_deadline_a_stage_stops_its_jobs_and_kills_what_does_not_stop(tmp_path, monkeypatch):
    from qlrlora import compare
    from qlrlora.rundir import COMPLETE_MARKER

    monkeypatch.setattr(compare, "STOP_GRACE_S", 2)
    checkpoint = tmp_path / "jobs" / "stops" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"global_step": 5}))
    stops = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(3)); print('up', flush=True); "
             "time.sleep(60)")
    ignores = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    (tmp_path / "jobs" / "evaluates").mkdir()
    (tmp_path / "jobs" / "evaluates" / compare.TRAINED).write_text("{}")  # trained: SIGTERM ends its evaluation
    evaluates = "import time; print('up', flush=True); time.sleep(60)"
    running = {}
    for name, code in (("stops", stops), ("ignores", ignores), ("evaluates", evaluates)):
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "up\n"  # its handler is installed
        running[name] = (process, process.stdout, 0.0)
    status = compare._stop_at_deadline(tmp_path, running)
    assert status == {"stops": "stopped at the deadline: resumes from checkpoint-5 when run again",
                      "ignores": "killed at the deadline",
                      "evaluates": "trained, stopped at the deadline while evaluating: only evaluated when run again"}
    assert all(process.returncode is not None for process, _, _ in running.values())


def test_run_sh_start_returns_at_once_and_wait_brings_back_what_its_jobs_did(tmp_path, mixture):
    """`run.sh start` leaves its jobs running in a session of their own; `wait` waits for them and returns
    their consoles and results, as a later device call does, and what is done so far when it returns before
    them. An earlier machine's results.tgz, carried in the repo root, goes on with them."""
    import io
    import os
    import shutil
    import tarfile

    from qlrlora.assets import build_from_config

    directory = tmp_path / "bench"
    prepare(directory, Protocol(model=str(build_from_config(TINY_LLAMA)), train_rows=16, heldout_rows=4,
                                val_per_task=2, eval_batch_size=8), mixture)
    repo = tmp_path / "repo"
    for part in ("qlrlora", "tools", "recipes"):
        shutil.copytree(ROOT / part, repo / part)
    script = "docs/benchmarks/commonsense/run.sh"
    (repo / script).parent.mkdir(parents=True)
    shutil.copy(ROOT / script, repo / script)
    earlier = b'{"method": "lora"}'
    with tarfile.open(repo / "results.tgz", "w:gz") as packed:
        member = tarfile.TarInfo("jobs/lora-lr0.001-s0/result.json")
        member.size = len(earlier)
        packed.addfile(member, io.BytesIO(earlier))
    first, later = tmp_path / "out1", tmp_path / "out2"
    first.mkdir()
    later.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "BENCH": str(directory),
           "DETACHED": str(tmp_path / "detached"), "QLRLORA_CACHE": str(tmp_path / "cache")}
    start = subprocess.run(["bash", script, "start", "300", "base:0:0"], check=False, env={**env, "OUT": str(first)},
                           capture_output=True, text=True, cwd=repo, timeout=60)
    assert start.returncode == 0 and "started" in start.stdout, start.stderr
    assert not (directory / "jobs" / "base" / "result.json").exists()  # the job is still running
    soon = tmp_path / "out_soon"
    soon.mkdir()
    early = subprocess.run(["bash", script, "wait", "0"], check=False, env={**env, "OUT": str(soon)},
                           capture_output=True, text=True, cwd=repo, timeout=60)
    assert "still running" in early.stdout, early.stdout + early.stderr
    with tarfile.open(soon / "results.tgz") as packed:  # what is there comes back before the jobs end
        assert "jobs/lora-lr0.001-s0/result.json" in packed.getnames()
    wait = subprocess.run(["bash", script, "wait", "240"], check=False, env={**env, "OUT": str(later)},
                          capture_output=True, text=True, cwd=repo, timeout=300)
    assert "finished" in wait.stdout, wait.stdout + wait.stderr
    assert '"base": "done"' in (later / "jobs.log").read_text()
    with tarfile.open(later / "results.tgz") as packed:
        assert {"jobs/base/result.json", "jobs/lora-lr0.001-s0/result.json"} <= set(packed.getnames())


def test_run_sh_brings_back_a_job_stopped_while_it_evaluated_and_a_new_machine_only_evaluates_it(tmp_path, mixture):
    """A job that trained but was stopped at the deadline while it evaluated (its result.json never written) comes
    back in results.tgz with its saved adapter; unpacked into a new machine's bench, the job evaluates it without
    training and scores as the first machine did. A finished job's adapter stays behind."""
    import os
    import shutil
    import tarfile

    from qlrlora.assets import build_from_config
    from qlrlora.compare import TRAINED, run_job

    directory = tmp_path / "bench"
    prepare(directory, Protocol(model=str(build_from_config(TINY_LLAMA)), train_rows=32, heldout_rows=8,
                                val_per_task=2, batch_size=8, max_length=64, learning_rates=[1e-3], r_max=4, rank=2,
                                eval_batch_size=8), mixture)
    finished, stopped = Job("lora", 0, 1e-3), Job("lr_lora_budget", 0, 1e-3)
    run_job(directory, finished)
    first = run_job(directory, stopped)
    (directory / "jobs" / stopped.name / "result.json").unlink()
    detached = tmp_path / "detached"
    (detached / "out").mkdir(parents=True)
    (detached / "out" / "finished").write_text("0")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "BENCH": str(directory), "DETACHED": str(detached), "OUT": str(out)}
    wait = subprocess.run(["bash", "docs/benchmarks/commonsense/run.sh", "wait", "0"], check=False, env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert wait.returncode == 0, wait.stdout + wait.stderr
    with tarfile.open(out / "results.tgz") as packed:
        names = set(packed.getnames())
        assert {f"jobs/{stopped.name}/{TRAINED}", f"jobs/{stopped.name}/lrlora_adapter.safetensors",
                f"jobs/{stopped.name}/ranks.json", f"jobs/{finished.name}/result.json"} <= names
        assert not any(name.startswith(f"jobs/{finished.name}/") and name.endswith(".safetensors") for name in names)
        fresh = tmp_path / "new_machine"
        shutil.copytree(directory, fresh, ignore=shutil.ignore_patterns("jobs"))
        packed.extractall(fresh, filter="data")
    again = run_job(fresh, stopped)
    assert again["evaluated_on_restart"] and again["train_s"] == first["train_s"]
    assert again["validation"] == first["validation"] and again["heldout"] == first["heldout"]


def test_run_sh_wait_on_a_new_machine_stops_at_once(tmp_path):
    """A `wait` call that lands on a new machine (the one that ran `start` went back) has no jobs to wait for:
    it says so and stops at once instead of spending the call's device time."""
    import os

    env = {**os.environ, "BENCH": str(tmp_path / "bench"), "DETACHED": str(tmp_path / "detached"),
           "OUT": str(tmp_path)}
    wait = subprocess.run(["bash", "docs/benchmarks/commonsense/run.sh", "wait", "300"], check=False, env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert wait.returncode == 3, wait.stdout + wait.stderr
    assert "no jobs were started on this machine" in wait.stderr
    assert not (tmp_path / "results.tgz").exists()
