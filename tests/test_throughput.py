"""tools/bench_throughput.py on CPU: each configuration trains and is measured, reports and summaries print
from the files (the GPU figures: docs/benchmarks/throughput.md)."""

import json
import statistics

import pytest

from qlrlora import throughput
from qlrlora.assets import build_from_config


@pytest.fixture(scope="module")
def tiny_model():
    return str(build_from_config(throughput.TINY, "bfloat16"))


def test_synthetic_rows_have_the_asked_token_count(tmp_path):
    from qlrlora.assets import byte_tokenizer

    rows = [json.loads(line) for line in throughput.synthetic_rows(tmp_path / "r.jsonl", 3, 200).read_text().splitlines()]
    tokenizer = byte_tokenizer()
    assert len(rows) == 3 and len({r["prompt"] for r in rows}) == 3
    for r in rows:
        assert len(r["completion"]) == throughput.COMPLETION_CHARS
        assert len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) == 200 - 2


def test_flops_per_token_of_the_8b_shape():
    # 32 blocks of q, o (4096^2 each), k, v (4096 x 1024 each), gate, up, down (4096 x 14336 each), the LM head
    linear = 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 4096 * 128256
    assert throughput.flops_per_token(throughput.LLAMA3_8B, 2048) == 4 * linear + 6 * 32 * 4096 * 2048


@pytest.mark.parametrize("name", ["stock_peft", "qlr_learned", "qlr_learned_offload"])
def test_each_configuration_trains_and_reports_its_figures(tmp_path, tiny_model, name):
    result = throughput.run_one(name, tiny_model, throughput.TINY, tmp_path, micro_batch=2, seq=96, steps=8)
    assert result["steps"] == 8 and len(result["step_s_all"]) == 8 and len(result["losses"]) == 8
    assert result["tokens_per_s"] > 0 and result["tokens_per_step"] == pytest.approx(2 * (96 - 1), rel=0.02)
    assert result["longest_input"] == 96 - 1  # each row whole, as the model was given it
    assert result["saved_block_bytes_per_token"] > 64 * 2  # one block saves more than its bf16 input
    phases = set(result["step_s_by_phase"])
    assert phases == ({"fixed"} if name == "stock_peft" else {"pruning", "frozen"}), phases
    if name != "stock_peft":  # 8 steps freeze the ranks far above the budget: the cut takes from every layer in turn
        hard = result["hard_ranks"]
        assert len(hard) == 14 and result["layers_at_rank_0"] == hard.count(0) == 0 and max(hard) - min(hard) <= 1


def test_a_run_without_memory_left_for_the_block_measurement_still_reports(tmp_path, tiny_model, monkeypatch):
    import torch

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(throughput, "saved_per_block", out_of_memory)
    result = throughput.run_one("qlr_fixed", tiny_model, throughput.TINY, tmp_path, micro_batch=2, seq=96, steps=2)
    assert result["steps"] == 2 and result["saved_block_bytes_per_token"] is None


@pytest.mark.parametrize(("name", "blocks"), [("stock_peft_ckpt0", 0), ("qlr_learned_ckpt0", 0), ("qlr_learned_ckpt8", 8),
                                              ("qlr_learned_offload_ckpt16", 16), ("qlr_learned_offload", None)])
def test_ckpt_configurations_checkpoint_no_block_or_the_first_n(tmp_path, tiny_model, name, blocks):
    assert throughput.checkpointed_blocks(name) == blocks
    rows = throughput.synthetic_rows(tmp_path / "rows.jsonl", 4, 96)
    trainer = throughput.build(name, tiny_model, rows, tmp_path / "out", 2, 96, 2)
    assert trainer.args.gradient_checkpointing is (blocks != 0)
    assert getattr(trainer.model.gradient_checkpointing_enable, "_qlr_limited", False) is bool(blocks)
    assert getattr(trainer.model.gradient_checkpointing_enable, "_qlr_offloaded", False) is ("_offload" in name)


def test_tokens_are_counted_from_the_rows_where_the_trainer_logs_none(tmp_path, tiny_model):
    """Unsloth's trainer logs no `num_tokens`: the count from the sequences trained is TRL's logged one."""
    rows = throughput.synthetic_rows(tmp_path / "rows.jsonl", 6, 96)
    trainer = throughput.build("stock_peft", tiny_model, rows, tmp_path / "out", 2, 96, 5)
    trainer.train()
    logged = throughput.tokens_trained(trainer)
    assert logged == pytest.approx(5 * 2 * (96 - 1), rel=0.02)
    trainer.state.log_history = [{k: v for k, v in row.items() if k != "num_tokens"} for row in trainer.state.log_history]
    assert throughput.tokens_trained(trainer) == pytest.approx(logged, rel=0.01)


def test_a_failed_run_is_reported_by_the_exception_that_ended_it(tmp_path):
    """A warning that mentions an error, printed before the traceback, is not what ended the run."""
    log = tmp_path / "run.log"
    log.write_text("Unsloth: xformers cannot load. UNSLOTH_ENABLE_LOGGING=1 shows the full error.\n"
                   "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                   "    tokens = next(row for row in [])\n             ^^^^\nStopIteration\n")
    assert throughput._last_error(log) == "StopIteration"
    log.write_text("loading\nCUDA error: out of memory\nexiting\n")
    assert throughput._last_error(log) == "CUDA error: out of memory"


def test_a_profile_traces_one_step_of_each_rank_phase_and_leaves_it_out_of_the_timing(tmp_path, tiny_model):
    result = throughput.run_one("qlr_learned", tiny_model, throughput.TINY, tmp_path, micro_batch=2, seq=96, steps=10,
                                profile=tmp_path / "profile")
    assert len(result["profiled_steps"]) == 2 and min(result["profiled_steps"]) >= 3
    for phase in ("pruning", "frozen"):
        summary = json.loads((tmp_path / "profile" / f"{phase}.json").read_text())
        assert summary["step"] in result["profiled_steps"] and summary["operators"] > 0
        assert any(row["name"] == "aten::addmm" for row in summary["top"]), summary["top"]
        assert set(summary["stalls"]) == set(throughput.PhaseProfiles.STALLS)
        assert "aten::addmm" in (tmp_path / "profile" / f"{phase}.txt").read_text()
    timed = [t for i, t in enumerate(result["step_s_all"]) if i >= 3 and i not in result["profiled_steps"]]
    assert result["step_s"] == pytest.approx(statistics.median(timed), abs=1e-4)


@pytest.mark.parametrize(("name", "rank", "phases", "components"), [("qlr_learning_at28", 28, {"pruning"}, 64),
                                                                 ("qlr_frozen_at16", 16, {"fixed"}, 16),
                                                                 ("qlr_frozen_at16_uncut", 16, {"fixed"}, 64)])
def test_a_full_run_phase_trains_at_its_own_ranks_throughout(tmp_path, tiny_model, name, rank, phases, components):
    """The phase configurations hold every layer at their rank for the whole run, the learning one with the rank's
    gradient computed in every step (its phase stays pruning: no freeze cuts it); the frozen phase's factors are
    cut to its rank unless the configuration keeps them."""
    result = throughput.run_one(name, tiny_model, throughput.TINY, tmp_path, micro_batch=2, seq=96, steps=5)
    assert result["hard_ranks"] == [rank] * 14 and result["components_mean"] == components
    assert set(result["step_s_by_phase"]) == phases


def test_the_full_run_estimate_weighs_the_phases_by_their_share_of_the_steps():
    def run(config, mb, step_s):
        return {"config": config, "micro_batch": mb, "tokens_per_s": 4096 / step_s, "tokens_per_step": 4096.0,
                "step_s": step_s, "peak_alloc_gib": 9.0, "peak_reserved_gib": 10.0, "model_gib": 5.0,
                "flops_per_token": 1e9, "step_s_by_phase": {}}

    runs = {f"{name}@{mb}": run(name, mb, step) for mb in (2,) for name, step in
            (("stock_peft", 0.5), ("qlr_learning_at64_liger", 0.6), ("qlr_learning_at28_liger", 0.5),
             ("qlr_frozen_at16_liger", 0.4), ("qlr_fixed_liger", 0.45),
             ("qlr_learning_at64", 0.7))}  # no other phase of the plain variant
    report = {"gpu": "GPU", "model": "llama3-8b", "seq": 2048, "runs": runs}
    (estimate,) = throughput.full_run_estimates(report)
    assert estimate["config"] == "qlr_learned_liger" and estimate["micro_batch"] == 2
    assert estimate["step_s"] == pytest.approx(0.1 * 0.6 + 0.6 * 0.5 + 0.3 * 0.4)
    assert estimate["tokens_vs_stock"] == pytest.approx(0.5 / 0.48)
    assert estimate["tokens_vs_fixed"] == pytest.approx(0.45 / 0.48)
    assert "| qlr_learned_liger | 2 | 0.480 | 8,533 | 1.04x | 0.94x |" in throughput.format_report(report)


def test_max_seq_trains_every_length_on_one_loaded_model(tmp_path, tiny_model, monkeypatch):
    loads = []
    real = throughput.build

    def counting(name, *args, previous=None, **kwargs):
        loads.append(previous is None)
        return real(name, *args, previous=previous, **kwargs)

    monkeypatch.setattr(throughput, "build", counting)
    seen = []
    result = throughput.max_seq("qlr_learned", tiny_model, tmp_path, 24.0, start=128, limit=512, progress=seen.append)
    assert result["max_seq"] == 512 and list(result["tried"]) == [128, 256, 512]
    assert loads == [True, False, False] and len(seen) == 3


def test_max_seq_counts_only_lengths_the_model_was_given_in_full(tmp_path, tiny_model, monkeypatch):
    """A length whose steps gave the model shorter sequences than asked for (Unsloth cut them to the length its
    model was loaded for, and trained without running out of memory) is not counted as trained: the search
    records what the model was given, seen in its forward pass. Here the rows stop growing at 160 tokens."""
    real = throughput.synthetic_rows
    monkeypatch.setattr(throughput, "synthetic_rows", lambda path, rows, tokens: real(path, rows, min(tokens, 160)))
    result = throughput.max_seq("qlr_learned", tiny_model, tmp_path, 24.0, start=128, limit=512)
    assert result["max_seq"] == 128 and list(result["tried"]) == [128, 256]
    assert result["tried"][256] == {"ok": False, "trained_tokens": 159}
    assert "256: only 159 tokens reached the model" in throughput.format_searches([result])


def test_report_and_summary_print_ratios_from_the_files(tmp_path):
    def run(config, mb, tokens, alloc, model=5.0):
        return {"config": config, "micro_batch": mb, "tokens_per_s": tokens, "step_s": 1.0, "peak_alloc_gib": alloc,
                "peak_reserved_gib": alloc + 1, "model_gib": model, "flops_per_token": 1e9, "step_s_by_phase": {}}

    first = {"gpu": "GPU", "model": "llama3-8b", "seq": 2048, "date": "2026-12-01", "versions": {},
             "bf16_matmul_peak_tflops": 100.0,
             "runs": {"stock_peft@8": run("stock_peft", 8, 1000.0, 15.0), "qlr_learned@8": run("qlr_learned", 8, 1300.0, 11.0)},
             "max_seq": {"qlr_learned": {"config": "qlr_learned", "memory_limit_gib": 24.0, "max_seq": 4096,
                                         "tried": {"2048": {"ok": True, "peak_alloc_gib": 10.5}, "4096": {"ok": True, "peak_alloc_gib": 20.25},
                                                   "8192": {"ok": False}}}}}
    second = {**first, "runs": {"stock_peft@8": run("stock_peft", 8, 990.0, 15.0)}, "max_seq": {}}
    rows = throughput.configs_table(first)
    assert rows["qlr_learned@8"]["tokens_vs_stock"] == pytest.approx(1.3)
    assert rows["qlr_learned@8"]["non_weight_vs_stock"] == pytest.approx(0.6)
    third = {**first, "runs": {"stock_peft@8": run("stock_peft", 8, 7387.0, 15.0), "unsloth@8": run("unsloth", 8, 11040.6, 9.0)}}
    assert "| unsloth | 8 | 11,041 | 1.49x |" in throughput.format_report(third)  # 1.4946, rounded once
    assert rows["qlr_learned@8"]["mfu"] == pytest.approx(1300 * 1e9 / 100e12)
    assert rows["qlr_learned@8"]["max_seq_24gib"] == 4096 and rows["stock_peft@8"]["max_seq_24gib"] is None
    assert "| qlr_learned | 8 | 1,300 | 1.30x |" in throughput.format_report(first)
    summary = throughput.combine({"one": first, "two": second}, "cmd")
    stock = summary["configs"]["stock_peft"]
    assert stock["tokens_per_s"] == 1000.0 and stock["micro_batch"]["8"]["repeats_tokens_per_s"] == [990.0]
    assert summary["configs"]["qlr_learned"]["max_seq_24gib"] == 4096
    for key in ("tokens_per_s", "step_s", "peak_alloc_gib", "peak_reserved_gib", "model_gib", "mfu", "max_seq_24gib"):
        assert key in summary["configs"]["qlr_learned"], key
    assert "| qlr_learned | 4096 |" in throughput.format_combined(summary)
    alone = {"config": "qlr_learned", "memory_limit_gib": 24.0, "max_seq": 6144,
             "tried": {"6144": {"ok": True, "peak_alloc_gib": 22.0}, "8192": {"ok": False}}}
    summary = throughput.combine({"one": first, "two": second}, "cmd", [alone])
    assert summary["configs"]["qlr_learned"]["max_seq_24gib"] == 6144  # the search run on its own, not the call's
    assert "| qlr_learned | 6144 | 6144: ok, 8192: out of memory |" in throughput.format_combined(summary)
    searched = {"config": "stock_peft", "memory_limit_gib": 24.0, "max_seq": 0, "tried": {"4096": {"ok": False}}}
    table = throughput.format_searches([first["max_seq"]["qlr_learned"], searched])
    assert "| qlr_learned | 24.0 | 2048: 10.5, 4096: 20.25, 8192: out of memory | 4096 |" in table
    assert "| stock_peft | 24.0 | 4096: out of memory | none of those tried |" in table


def test_rounds_give_medians_and_ratios_paired_round_by_round():
    """Each round times every configuration once; the report takes the median of a run's rounds and sets each
    round against the same round of the stock stack (a drift of the machine between rounds cancels)."""
    def run(config, tokens, alloc=9.0):
        rounds = [{"tokens_per_s": t, "step_s": 4096 / t, "tokens_per_step": 4096.0} for t in tokens]
        return {"config": config, "micro_batch": 2, **rounds[0], "peak_alloc_gib": alloc, "peak_reserved_gib": alloc + 1,
                "model_gib": 5.0, "flops_per_token": 1e9, "step_s_by_phase": {}, "rounds": rounds}

    runs = {"stock_peft@2": run("stock_peft", [1000.0, 1200.0, 800.0]),
            "qlr_fixed_liger@2": run("qlr_fixed_liger", [1100.0, 1260.0, 960.0]),
            "qlr_learning_at64_liger@2": run("qlr_learning_at64_liger", [900.0, 1080.0, 720.0]),
            "qlr_learning_at28_liger@2": run("qlr_learning_at28_liger", [1000.0, 1200.0, 800.0]),
            "qlr_frozen_at16_liger@2": run("qlr_frozen_at16_liger", [1000.0, 1200.0, 800.0])}
    report = {"gpu": "GPU", "model": "llama3-8b", "seq": 2048, "runs": runs}
    row = throughput.configs_table(report)["qlr_fixed_liger@2"]
    assert row["tokens_per_s"] == 1100.0 and row["rounds"] == 3
    assert row["tokens_vs_stock"] == pytest.approx(1.1) and row["tokens_vs_stock_range"] == pytest.approx([1.05, 1.2])
    assert "| qlr_fixed_liger | 2 | 1,100 | 1.10x (1.05-1.20) |" in throughput.format_report(report)
    (estimate,) = throughput.full_run_estimates(report)
    # each round: warm-up (0.1 of the steps) at the at64 run's speed, the other 0.9 at the at28 / frozen runs' speed
    tokens = [4096 / (0.1 * 4096 / a + 0.9 * 4096 / b) for a, b in ((900, 1000), (1080, 1200), (720, 800))]
    by_stock = [t / s for t, s in zip(tokens, (1000, 1200, 800))]
    by_fixed = [t / f for t, f in zip(tokens, (1100, 1260, 960))]  # 0.899, 0.942, 0.824
    assert estimate["rounds"] == 3 and estimate["tokens_per_s"] == pytest.approx(sorted(tokens)[1])
    assert estimate["tokens_vs_stock"] == pytest.approx(sorted(by_stock)[1])
    assert estimate["tokens_vs_fixed"] == pytest.approx(by_fixed[0])
    assert estimate["tokens_vs_fixed_range"] == pytest.approx([by_fixed[2], by_fixed[1]])


def test_rounds_time_every_configuration_again_in_the_same_order(tmp_path, capsys):
    report = throughput.run_all(tmp_path, "tiny", ["stock_peft", "qlr_fixed"], [2], 96, 4, [], 24.0, 300, "test",
                                rounds=2)
    for key in ("stock_peft@2", "qlr_fixed@2"):
        rounds = report["runs"][key]["rounds"]
        assert len(rounds) == 2 and all(r["tokens_per_s"] > 0 for r in rounds), rounds
        assert rounds[0]["tokens_per_s"] == report["runs"][key]["tokens_per_s"]  # the first round's own file
        assert (tmp_path / "runs" / f"{key}.round2.json").is_file()
    order = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("one ")]
    assert order == ["one stock_peft@2 round 1", "one qlr_fixed@2 round 1", "one stock_peft@2 round 2",
                     "one qlr_fixed@2 round 2"]
    assert throughput.configs_table(report)["qlr_fixed@2"]["tokens_vs_stock_range"]
    assert report["host_cpu"]["cores"] >= 1 and report["host_cpu"]["model"]
    assert f"host {report['host_cpu']['model']}" in throughput.format_report(report).splitlines()[0]


def test_a_memory_cap_and_a_profile_reach_every_timed_run(tmp_path):
    """`all --cap-gib` holds each timed run to a smaller card: every run's process gets the limit and records
    it, and the report's heading says so (on the CPU the limit is recorded, not enforced). `all --profile`
    has each run profile a step into OUT/profiles/CONFIG@MB."""
    report = throughput.run_all(tmp_path, "tiny", ["qlr_fixed"], [2], 96, 4, [], 24.0, 300, "test", cap_gib=20.0,
                                profile=True)
    assert report["runs"]["qlr_fixed@2"]["memory_limit_gib"] == 20.0, report["runs"]
    assert report["runs"]["qlr_fixed@2"]["profiled_steps"] == [3]
    assert json.loads((tmp_path / "profiles" / "qlr_fixed@2" / "fixed.json").read_text())["step"] == 3
    assert report["cap_gib"] == 20.0
    assert "every timed run held to 20 GiB of GPU memory" in throughput.format_report(report).splitlines()[0]


def test_a_configuration_that_cannot_run_here_is_one_line_in_the_report(tmp_path):
    """Unsloth runs in its own process, which imports it first; where it cannot be imported (no GPU, not
    installed) the run records why in one line and the report says so, instead of the whole run failing."""
    report = throughput.run_all(tmp_path, "tiny", ["unsloth"], [2], 96, 2, [], 24.0, 120, "test")
    error = report["runs"]["unsloth@2"]["error"]
    assert error == "ModuleNotFoundError: No module named 'unsloth'"  # its first import, before any other
    assert f"| unsloth | 2 | failed: {error} |" in throughput.format_report(report)
    with pytest.raises(throughput.QLRError, match="configuration 'unsloth': cannot import unsloth"):
        throughput.build("unsloth", "unused", tmp_path / "rows.jsonl", tmp_path / "out", 2, 96, 2)


def test_unsloth_trains_with_its_own_checkpointing_only(tmp_path, monkeypatch):
    """TRL's SFTConfig checkpoints by default; Unsloth's runs turn that off, in a fresh and in a reused model, and
    take one micro-batch per step like the others."""
    from trl import SFTConfig

    seen = []
    monkeypatch.setattr(throughput, "_unsloth_trainer", lambda *args: seen.append(args[-1]))
    monkeypatch.setattr(throughput, "_peft_trainer", lambda *args: seen.append(args[-1]))
    previous = type("Loaded", (), {"model": None, "processing_class": None})()
    for reused in (None, previous):
        throughput.build("unsloth", "unused", tmp_path / "rows.jsonl", tmp_path / "out", 2, 96, 2, previous=reused)
    assert len(seen) == 2
    for train in seen:
        assert not SFTConfig(output_dir=str(tmp_path), **train).gradient_checkpointing
        assert train["gradient_accumulation_steps"] == 1  # given, not left to Unsloth's SFTConfig, whose default is 2
    unset = {k: v for k, v in seen[0].items() if k != "gradient_checkpointing"}
    assert SFTConfig(output_dir=str(tmp_path), **unset).gradient_checkpointing  # what leaving it out would give


def test_the_report_lists_the_optimizer_state_and_the_components_held():
    run = {"config": "qlr_frozen_at16", "micro_batch": 2, "tokens_per_s": 100.0, "tokens_per_step": 400.0, "step_s": 4.0,
           "peak_alloc_gib": None, "peak_reserved_gib": None, "model_gib": None, "flops_per_token": 1e9,
           "step_s_by_phase": {"fixed": 4.0}, "optimizer_state_mib": 2.25, "components_mean": 16.0,
           "saved_block_bytes_per_token": 21760.0}
    text = throughput.format_report({"gpu": "cpu", "model": "small", "seq": 256, "runs": {"qlr_frozen_at16@2": run}})
    assert "| qlr_frozen_at16 | 2 | 2.2 | 16 | 21,760 |" in text


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = {k: v for k, v in throughput.TINY.items() if k != "model_type"}
    return LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa"))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_saved_per_block_counts_what_the_block_keeps_per_token(dropout):
    """Counted once per storage, weights left out; per token about the same at any batch (the rotary tables are per
    position, not per token); PEFT's dropout keeps a copy of each adapted layer's input and its mask, which the
    count sees."""
    import contextlib

    from peft import LoraConfig, get_peft_model

    def saved(p, micro_batch=2, seq=32):
        model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_dropout=p, target_modules="all-linear"))
        return throughput.saved_per_block(model, micro_batch, seq, contextlib.nullcontext)

    plain = saved(0.0)
    assert saved(dropout, micro_batch=4) == pytest.approx(saved(dropout), rel=0.02) and plain > 0
    if dropout:
        # six layers read a hidden-sized input (q, k, v, o, gate, up); each keeps its own dropped fp32 copy of it
        assert saved(dropout) - plain >= 6 * 4 * throughput.TINY["hidden_size"]


@pytest.mark.parametrize("redraws", [True, False])
def test_our_dropout_keeps_no_copy_of_the_inputs(redraws, monkeypatch):
    """With its dropout mask drawn again in the backward pass (on a GPU), a block with our adapters saves as much with
    dropout as without; with the masks kept (on a CPU), a byte per entry of each adapted layer's input more. Either
    is less than the stock stack's block with the same dropout."""
    import contextlib

    from peft import LoraConfig, get_peft_model

    from qlrlora import adapter
    from qlrlora.config import AdapterConfig
    from qlrlora.model import inject_adapters

    monkeypatch.setattr(adapter, "_redraws", lambda device: redraws)

    def ours(p):
        model = _tiny_llama()
        inject_adapters(model, AdapterConfig(r_max=4, alpha=4.0, dropout=p, dtype="float32"))
        return throughput.saved_per_block(model, 2, 32, contextlib.nullcontext)

    stock = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear"))
    masks = 0 if redraws else 6 * throughput.TINY["hidden_size"] + throughput.TINY["intermediate_size"]
    assert ours(0.2) == ours(0.0) + masks < throughput.saved_per_block(stock, 2, 32, contextlib.nullcontext)
