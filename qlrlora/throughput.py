"""Throughput and memory of QLR-LoRA against the stock PEFT + bitsandbytes + TRL stack, on one GPU.

    python tools/bench_throughput.py all OUT [--model llama3-8b] [--micro-batches 2 8] [--seq 2048] [--steps 20] [--cap-gib G] [--profile]
    python tools/bench_throughput.py one CONFIG --json PATH [--micro-batch B] [--seq L] ...
    python tools/bench_throughput.py report OUT/throughput.json
    python tools/bench_throughput.py combine CALL1 CALL2 ... --json SUMMARY.json [--searches MAX_SEQ.json ...]
    python tools/bench_throughput.py searches MAX_SEQ.json ...

`all` runs every configuration as its own process, one after the other (never side by side: the
timings would share the GPU), on the same synthetic token batches and the same NF4 double-quant
backbone (bf16 compute, SDPA), and writes OUT/throughput.json; `report` prints its tables.

Configurations (`CONFIGS`):
- `stock_peft`: the stock stack as a user writes it: a PEFT `LoraConfig` (r 16, alpha 32, dropout
  0.05, all linear layers) passed to TRL's `SFTTrainer` as `peft_config`, which prepares the 4-bit
  model itself;
- `qlr_fixed`: QLR-LoRA with every rank fixed at 16 (plain LoRA through our trainer);
- `qlr_learned`: QLR-LoRA learning the ranks: r_max 64, budget average rank 16, as
  recipes/llama3_8b_commonsense.yaml;
- `*_liger`: the same with Liger's RMSNorm, RoPE and SwiGLU kernels (`train.use_liger_kernel`; TRL
  keeps its own fused LM head, so the logits are never materialised in any configuration);
- `qlr_*_offload`, `qlr_*_liger_offload`: the checkpointed blocks' inputs kept in CPU memory
  (`model.offload_checkpoints`), without or with Liger's kernels.
- `qlr_learning_at64`, `qlr_learning_at28`, `qlr_frozen_at16`: the three phases of a full-length `qlr_learned`
  run, each timed at the ranks it computes (a bench run is too short for the rank schedule: its ranks are
  still near r_max when the freeze cuts them to the budget): the warm-up at rank 64 and the pruning phase
  at its mean rank, 28, both with the rank's gradient computed, and the frozen budget at 16, its factors
  cut to 16 components (`rank.cut_at_freeze`; `qlr_frozen_at16_uncut` keeps the 64, masked). The report
  weighs them by the recipes' warm-up and freeze fractions (`FULL_RUN_PHASES`) into an estimate of the
  full run's tokens/s, against the stock stack and the rank fixed at 16.
- `*_ckpt<N>`: gradient checkpointing in the first N of the 32 decoder blocks only
  (`model.checkpoint_layers`); `*_ckpt0`: no checkpointing at all (`gradient_checkpointing: false`,
  which the stock stack offers as well).
- `unsloth`: Unsloth's `FastLanguageModel` in 4 bits with its LoRA (r 16, alpha 32, dropout 0, the seven
  projections) and its own gradient checkpointing, trained by TRL's SFTTrainer; its process imports
  unsloth first. Unsloth needs a GPU, and its releases pin TRL and datasets below what the other
  configurations use, so it may need a site of its own first on PYTHONPATH.
Every other configuration checkpoints every block (non-reentrant; Unsloth its own); all use AdamW, a
constant learning rate and one micro-batch per optimizer step (Unsloth's own default is two).

Measured per run: tokens per second (TRL's count of trained tokens over the timed steps), the
median step time after the first 3 steps (and per rank phase for learned ranks: at r_max during the
warm-up, while the ranks move, once they are frozen), peak allocated and reserved GPU memory, the
memory of the loaded model (allocated once the trainer is built, before the first step), the losses,
MFU: the FLOPs a step needs (below) over the bf16 matrix-product peak measured in the same run, the
optimizer's state, and the bytes per token one decoder block saves for its backward pass (`saved_per_block`,
after the run: what a checkpointed block holds between its recompute and its backward, on any device;
`--model llama3-8b-block`, one decoder block of the 8B shape with the tiny vocabulary, measures it on a CPU).

FLOPs per token: 4 x the parameters of the linear layers of the blocks and the LM head (forward,
and the backward pass to the inputs: the frozen base needs no weight gradient; the adapters' own
FLOPs are under 1% and not counted), plus causal attention, 6 x layers x hidden x sequence (forward
2, backward 4). The recomputation of checkpointed blocks is not counted: it is overhead, not work.

`--memory-gib 24` holds the process to 24 GiB (`torch.cuda.set_per_process_memory_fraction`), as a
consumer card would; `max_seq` then trains micro-batch 1 at doubling sequence lengths (in one
process, one model load; Unsloth one per length, as it fixes the longest sequence when it loads) until
one runs out of memory or is cut short by the trainer (the longest input the model was given, seen by a
forward hook, is shorter than the row), and records the longest that trained.
`all --cap-gib G` holds every timed run to G GiB the same way: a configuration that needs more fails.
`all --profile` (`one --profile DIR`) traces one step of each rank phase with torch.profiler and writes, per
phase, its operators by device time, its operator count and the events that hold the host back; those
steps are left out of the timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from transformers import TrainerCallback

from qlrlora.config import RankConfig
from qlrlora.errors import QLRError
from qlrlora.io import atomic_write_json

LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1.0e-5,
    "tie_word_embeddings": False,
}
TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "vocab_size": 320,
}
# A Llama small enough to time on a CPU, with layers wide enough that the adapter's cost shows.
SMALL = {**TINY, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4}
# One decoder block of Llama-3-8B's shape with the tiny vocabulary: what a block keeps for its backward pass at the 8B
# shape (`saved_per_block`), measurable on a CPU.
LLAMA3_8B_BLOCK = {**LLAMA3_8B, "num_hidden_layers": 1, "vocab_size": TINY["vocab_size"]}
MODELS = {"llama3-8b": LLAMA3_8B, "llama3-8b-block": LLAMA3_8B_BLOCK, "small": SMALL, "tiny": TINY}

# name -> (stack, adapter settings); every QLR configuration also exists with Liger's layer kernels.
_BASE_CONFIGS = {
    "stock_peft": ("peft", {"r": 16, "alpha": 32.0, "dropout": 0.05}),
    "qlr_fixed": ("qlr", {"r_max": 16, "alpha": 32.0, "dropout": 0.05, "rank": {"mode": "fixed"}}),
    "qlr_learned": ("qlr", {"r_max": 64, "alpha": 32.0, "dropout": 0.05,
                            "rank": {"mode": "budget", "budget_avg_rank": 16, "rank_lr": 0.05}}),
    # A bench run is far too short for the rank schedule (its ranks are still near r_max at the freeze), so the phases
    # of a full-length `qlr_learned` run are timed on their own, each at the ranks it computes: the warm-up at
    # r_max 64 and the pruning phase at its mean rank, 28 (the cubic schedule from 64 to the budget of 16
    # averages 16 + 48 / 4), both with the rank's gradient computed (rank_lr 1e-6: the ranks do not move, every
    # step of the controller runs); the frozen phase at the budget, 16, in r_max 64 factors.
    "qlr_learning_at64": ("qlr", {"r_max": 64, "init_rank": 64.0, "alpha": 32.0, "dropout": 0.05,
                                  "rank": {"mode": "penalty", "rank_lr": 1e-6, "warmup_fraction": 0.0,
                                           "freeze_fraction": 1.0}}),
    "qlr_learning_at28": ("qlr", {"r_max": 64, "init_rank": 28.0, "alpha": 32.0, "dropout": 0.05,
                                  "rank": {"mode": "penalty", "rank_lr": 1e-6, "warmup_fraction": 0.0,
                                           "freeze_fraction": 1.0}}),
    "qlr_frozen_at16": ("qlr", {"r_max": 64, "init_rank": 16.0, "alpha": 32.0, "dropout": 0.05,
                                "rank": {"mode": "fixed"}}),
    # The frozen phase as it ran before the factors were cut at the freeze: 64 components held, 48 masked.
    "qlr_frozen_at16_uncut": ("qlr", {"r_max": 64, "init_rank": 16.0, "alpha": 32.0, "dropout": 0.05,
                                      "rank": {"mode": "fixed", "cut_at_freeze": False}}),
}
# The share of a full-length run's steps in each phase: the recipes keep the rank schedule's defaults.
FULL_RUN_PHASES = {"qlr_learning_at64": RankConfig.warmup_fraction,
                   "qlr_learning_at28": RankConfig.freeze_fraction - RankConfig.warmup_fraction,
                   "qlr_frozen_at16": 1 - RankConfig.freeze_fraction}
CONFIGS = {**_BASE_CONFIGS, **{f"{name}_liger": spec for name, spec in _BASE_CONFIGS.items()},
           **{f"{name}{kernels}_offload": spec for name, spec in _BASE_CONFIGS.items() if spec[0] == "qlr"
              for kernels in ("", "_liger")},
           # Unsloth brings its own kernels; its documentation's settings (dropout 0 is its fast path).
           "unsloth": ("unsloth", {"r": 16, "alpha": 32.0, "dropout": 0.0})}
CONFIGS.update({f"{name}_ckpt0": CONFIGS[name] for name in ("stock_peft", "stock_peft_liger", "qlr_learned",
                                                              "qlr_learned_liger")})
CONFIGS.update({f"{name}_ckpt{n}": CONFIGS[name] for name in ("qlr_learned", "qlr_learned_liger", "qlr_learned_offload",
                                                             "qlr_learned_liger_offload") for n in (8, 16, 24)})
# Unsloth patches transformers and TRL when it is imported, so its process imports it before anything else.
UNSLOTH_FIRST = "import sys, unsloth; from qlrlora.throughput import main; sys.exit(main(sys.argv[1:]))"
UNSLOTH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_CONFIGS = ("stock_peft", "qlr_fixed", "qlr_learned", "qlr_learned_liger", "stock_peft_liger")
COMPLETION_CHARS = 64


def synthetic_rows(path: Path, rows: int, tokens: int) -> Path:
    """`rows` prompt/completion rows of random words, `tokens - 2` characters each, the last 64 the completion.
    The config-built models' byte tokenizer makes one token of each character and TRL appends EOS, so a row
    trains `tokens - 1` tokens (what the GPU figures ran with; TRL counts the tokens it trained)."""
    rng = random.Random(0)
    chars = tokens - 2
    with open(path, "w") as f:
        for _ in range(rows):
            words = []
            while sum(len(w) + 1 for w in words) < chars:
                words.append("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))))
            text = " ".join(words)[:chars]
            f.write(json.dumps({"prompt": text[:-COMPLETION_CHARS], "completion": text[-COMPLETION_CHARS:]}) + "\n")
    return path


def flops_per_token(config: dict, seq: int) -> float:
    """The work a training token needs with a frozen base (see the module docstring)."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    block = h * h * 2 + h * kv * 2 + 3 * h * i  # q, o; k, v; gate, up, down
    linear = layers * block + h * config["vocab_size"]
    return 4.0 * linear + 6.0 * layers * h * seq


def matmul_peak_tflops(size: int = 8192, repeats: int = 20) -> float | None:
    """Median bf16 TFLOP/s of a size^3 matrix product on random data, by CUDA events; None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * size**3 / statistics.median(times) / 1e12


class StepTimes(TrainerCallback):
    """Wall time of every optimizer step (CUDA synchronised, so a step's kernels count in that step) and, when
    `phase` is given, the rank phase each step began in."""

    def __init__(self, phase=None):
        self.times, self.phases, self.last, self.phase = [], [], None, phase

    def on_step_begin(self, args, state, control, **kwargs):
        _synchronize()
        self.phases.append(self.phase() if self.phase is not None else "fixed")
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()
        self.times.append(time.perf_counter() - self.last)


class PhaseProfiles(TrainerCallback):
    """A torch.profiler trace of one step in each rank phase (the first from step `skip` on), written to `out` as
    `<phase>.txt`, its operators by their own device time (CPU time without a GPU), and `<phase>.json`: the
    number of operators the step ran, the events that hold the host back (synchronisations, copies to the
    host, allocations) and the top operators. `steps` lists the profiled steps, which the timing leaves out."""

    STALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "Memcpy DtoH", "cudaMalloc",
              "cudaFree")

    def __init__(self, phase, out: Path, skip: int = 3):
        self.phase, self.out, self.skip = phase, out, skip
        self.steps, self._done, self._active, self._step = [], set(), None, 0

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        phase = self.phase()
        if self._step >= self.skip and phase not in self._done:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._active = (phase, torch.profiler.profile(activities=activities))
            self._active[1].__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._active is not None:
            _synchronize()
            phase, profile = self._active
            profile.__exit__(None, None, None)
            self._write(phase, profile.key_averages())
            self._done.add(phase)
            self.steps.append(self._step)
            self._active = None
        self._step += 1

    def _write(self, phase: str, events) -> None:
        import torch

        device = torch.cuda.is_available()
        own = (lambda e: getattr(e, "self_device_time_total", 0)) if device else (lambda e: e.self_cpu_time_total)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{phase}.txt").write_text(
            events.table(sort_by="self_cuda_time_total" if device else "self_cpu_time_total", row_limit=40))
        top = sorted(events, key=own, reverse=True)[:25]
        atomic_write_json(self.out / f"{phase}.json", {
            "phase": phase, "step": self._step,
            "operators": sum(e.count for e in events if e.key.startswith("aten::")),
            "stalls": {name: sum(e.count for e in events if name in e.key) for name in self.STALLS},
            "top": [{"name": e.key, "count": e.count, "self_us": round(own(e), 1)} for e in top],
        })


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _limit_memory(memory_gib: float) -> None:
    """Hold this process to `memory_gib` of the GPU, as a card of that size would."""
    import torch

    torch.cuda.set_per_process_memory_fraction(memory_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)


def _recipe(stack_settings: dict, model_path: str, rows: Path, out: Path, micro_batch: int, seq: int, steps: int,
            liger: bool, offload: bool, checkpointed: int | None, optim: str, use_cpu: bool):
    from qlrlora.config import recipe_from_dict

    adapter = {"targets": "all-linear", "r_max": stack_settings["r_max"], "alpha": stack_settings["alpha"],
               "dropout": stack_settings["dropout"], "dtype": "bfloat16", "init_rank": stack_settings.get("init_rank")}
    raw = {
        "model": {"name_or_path": model_path, "quantize": "nf4", "double_quant": True, "dtype": "bfloat16",
                  "attn_implementation": "sdpa", "offload_checkpoints": offload,
                  "checkpoint_layers": checkpointed or None},
        "adapter": adapter,
        "rank": stack_settings.get("rank", {"mode": "fixed"}),
        "data": {"dataset": str(rows)},
        "train": _train_settings(micro_batch, seq, steps, liger, checkpointed != 0, optim, use_cpu),
        "output": {"dir": str(out), "overwrite": True},
    }
    return recipe_from_dict(raw, "<bench_throughput>")


def _train_settings(micro_batch: int, seq: int, steps: int, liger: bool, checkpointing: bool, optim: str,
                    use_cpu: bool) -> dict:
    settings = {
        "max_steps": steps,
        "learning_rate": 2e-4,
        "lr_scheduler_type": "constant",
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": 1,  # TRL's default; Unsloth's patched SFTConfig defaults to 2
        "max_length": seq,
        "bf16": not use_cpu,
        "use_cpu": use_cpu,
        "gradient_checkpointing": checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "optim": optim,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
        "dataloader_num_workers": 0,
        "report_to": [],
    }
    if liger:
        settings["use_liger_kernel"] = True
    return settings


def _peft_trainer(settings: dict, model, tokenizer, rows: Path, out: Path, train: dict):
    """TRL's SFTTrainer with a PEFT LoraConfig, as a user of the stock stack writes it."""
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    config = None if settings is None else LoraConfig(
        r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"], target_modules="all-linear",
        task_type="CAUSAL_LM")
    dataset = load_dataset("json", data_files=str(rows), split="train")
    return SFTTrainer(model=model, args=SFTConfig(output_dir=str(out), **train), train_dataset=dataset,
                      processing_class=tokenizer, peft_config=config)


def _unsloth_trainer(settings: dict, model_path: str, rows: Path, out: Path, seq: int, train: dict):
    """Unsloth as its documentation writes it: FastLanguageModel in 4 bits (NF4, double quant), its LoRA on every
    projection with its own gradient checkpointing, trained by TRL's SFTTrainer."""
    import torch

    try:
        from unsloth import FastLanguageModel
    except (ImportError, NotImplementedError) as e:  # Unsloth raises NotImplementedError on a machine without a GPU
        raise QLRError(f"configuration 'unsloth': cannot import unsloth ({str(e).splitlines()[0]})") from None
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=model_path, max_seq_length=seq,
                                                         dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=settings["r"], lora_alpha=settings["alpha"],
                                             lora_dropout=settings["dropout"], target_modules=UNSLOTH_TARGETS,
                                             use_gradient_checkpointing="unsloth", random_state=0)
    return _peft_trainer(None, model, tokenizer, rows, out, train)


def build(name: str, model_path: str, rows: Path, out: Path, micro_batch: int, seq: int, steps: int,
          optim: str = "adamw_torch", previous=None):
    """The trainer of one configuration, its model loaded (NF4) and adapted, ready to train. `previous`: an
    earlier trainer of the same configuration, whose model is trained again instead of loading one."""
    import torch

    from qlrlora.config import ModelConfig
    from qlrlora.model import load_backbone
    from qlrlora.sft import build_trainer

    if name not in CONFIGS:
        raise QLRError(f"configuration {name!r}: expected one of {', '.join(CONFIGS)}")
    stack, settings = CONFIGS[name]
    liger, offload, use_cpu = "_liger" in name, "_offload" in name, not torch.cuda.is_available()
    checkpointed = checkpointed_blocks(name)
    if stack == "qlr":
        recipe = _recipe(settings, model_path, rows, out, micro_batch, seq, steps, liger, offload, checkpointed, optim,
                         use_cpu)
        loaded = None
        if previous is not None:  # train the same model again, its ranks and factors back at r_max
            loaded = (previous.model, previous.processing_class, previous.layers)
            ranks = next(iter(previous.layers.values())).ranks
            with torch.no_grad():
                ranks.values.copy_(ranks.r_max)
            for layer in previous.layers.values():
                layer.resize_(layer.r_max)
        return build_trainer(recipe, loaded)
    from transformers import set_seed

    set_seed(0)
    train = _train_settings(micro_batch, seq, steps, liger, checkpointed != 0, optim, use_cpu)
    if stack == "unsloth":  # Unsloth checkpoints with its own; left unset, TRL's SFTConfig turns on its own too
        train = {**{k: v for k, v in train.items() if k != "gradient_checkpointing_kwargs"},
                 "gradient_checkpointing": False}
    if previous is not None:  # already a PeftModel: train its adapters again
        return _peft_trainer(None, previous.model, previous.processing_class, rows, out, train)
    if stack == "unsloth":
        return _unsloth_trainer(settings, model_path, rows, out, seq, train)
    model, tokenizer = load_backbone(ModelConfig(name_or_path=model_path, attn_implementation="sdpa"),
                                     device_map="cpu" if use_cpu else None)
    return _peft_trainer(settings, model, tokenizer, rows, out, train)


def checkpointed_blocks(name: str) -> int | None:
    """How many decoder blocks configuration `name` checkpoints: N for `*_ckpt<N>`, None for every one."""
    head, _, n = name.rpartition("_ckpt")
    return int(n) if head and n.isdigit() else None


def _gib(n: float) -> float:
    return round(n / 2**30, 3)


def run_one(name: str, model_path: str, model_config: dict, work: Path, micro_batch: int, seq: int, steps: int,
            memory_gib: float | None = None, profile: Path | None = None) -> dict:
    """Train one configuration for `steps` steps and measure it (module docstring); `profile`: a folder for a
    profile of one step in each phase (`PhaseProfiles`; those steps are left out of the timing)."""
    import torch

    cuda = torch.cuda.is_available()
    if memory_gib and cuda:
        _limit_memory(memory_gib)
    rows = synthetic_rows(work / f"rows-{seq}.jsonl", max(micro_batch * steps, 4), seq)
    trainer = build(name, model_path, rows, work / name, micro_batch, seq, steps)
    controller = getattr(trainer, "controller", None)
    timer = StepTimes((lambda: controller.phase) if controller is not None and not controller.frozen else None)
    trainer.add_callback(timer)
    profiles = None
    if profile is not None:
        profiles = PhaseProfiles(lambda: timer.phases[-1], profile)
        trainer.add_callback(profiles)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model_bytes = torch.cuda.memory_allocated() if cuda else 0
    given = _LongestInput(trainer.model)
    trainer.train()
    given.remove()
    # the training's peaks, read before the measurement of one block below runs its own forward pass
    peaks = (_gib(torch.cuda.max_memory_allocated()), _gib(torch.cuda.max_memory_reserved())) if cuda else (None, None)
    saved = None
    if CONFIGS[name][0] != "unsloth":  # Unsloth runs its blocks through its own patched forward and checkpointing
        try:
            saved = saved_per_block(trainer.model, micro_batch, seq, trainer.accelerator.autocast)
        except torch.OutOfMemoryError:  # a run held to a card's memory may have no room left for it: the run stands
            pass
    history = trainer.state.log_history
    tokens = tokens_trained(trainer)
    profiled = set(profiles.steps) if profiles is not None else set()
    measured = [(i, step) for i, step in enumerate(zip(timer.times, timer.phases)) if i not in profiled]
    kept = [step for i, step in measured if i >= 3] or [step for _, step in measured]  # the first 3 warm up
    step_s = statistics.median(t for t, _ in kept)
    by_phase = {}
    for phase in dict.fromkeys(timer.phases):
        times = [t for t, p in kept if p == phase]
        if times:
            by_phase[phase] = round(statistics.median(times), 4)
    result = {
        "config": name,
        "micro_batch": micro_batch,
        "seq": seq,
        "steps": trainer.state.global_step,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "tokens_per_step": tokens / trainer.state.global_step,
        "longest_input": given.longest,
        "tokens_per_s": round(tokens / trainer.state.global_step / step_s, 1),
        "step_s": round(step_s, 4),
        "step_s_by_phase": by_phase,
        "step_s_all": [round(t, 4) for t in timer.times],
        "profiled_steps": sorted(profiled),
        "peak_alloc_gib": peaks[0],
        "peak_reserved_gib": peaks[1],
        "model_gib": _gib(model_bytes) if cuda else None,
        "losses": [row["loss"] for row in history if "loss" in row],
        "flops_per_token": flops_per_token(model_config, seq),
        "memory_limit_gib": memory_gib,
        "optimizer_state_mib": _optimizer_state_bytes(trainer) / 2**20,
        "saved_block_bytes_per_token": saved,
    }
    if controller is not None:
        hard = controller.hard_ranks()
        # a short run freezes long before the ranks reach the budget: the frozen steps compute what these say
        result["hard_ranks_mean"] = sum(hard) / len(hard)
        result["layers_at_rank_0"] = sum(1 for r in hard if r == 0)
        result["hard_ranks"] = hard
        # what the factors hold at the end: r_max, or the hard ranks once cut at the freeze
        result["components_mean"] = sum(layer.components for layer in trainer.layers.values()) / len(hard)
    return result


class _BlockInputs(Exception):
    """Raised by a forward pre-hook to stop a forward pass once the first decoder block's inputs are known."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.args, self.kwargs = args, kwargs


def saved_per_block(model, micro_batch: int, seq: int, autocast) -> float | None:
    """Bytes per token that autograd keeps for the backward pass of the first decoder block: the distinct storages,
    the weights left out, that the block saves while its forward runs with autograd in training mode (dropout on).

    A checkpointed block holds these from its recompute to its backward, so this is the share of the peak that one
    block adds on top of the checkpoints, and it can be measured on any device (a CPU too). The block runs once on
    random tokens, with checkpointing off for that call, under `autocast` (the trainer's). None for a model without
    transformers' decoder blocks."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    block = next((m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)), None)
    if block is None:
        return None

    def stop(module, args, kwargs):
        raise _BlockInputs(args, kwargs)

    device = next(p.device for p in model.parameters())
    ids = torch.randint(model.config.vocab_size, (micro_batch, seq), device=device)
    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad(), autocast():
            model(input_ids=ids, use_cache=False)
        raise RuntimeError("the forward pass never reached a decoder block")
    except _BlockInputs as inputs:
        args, kwargs = inputs.args, inputs.kwargs
    finally:
        handle.remove()
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    checkpointing, training = block.gradient_checkpointing, model.training
    block.gradient_checkpointing = False
    model.train()
    try:
        if args:
            args = (args[0].detach().requires_grad_(True), *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}
        with torch.enable_grad(), autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(*args, **kwargs)
    finally:
        block.gradient_checkpointing = checkpointing
        model.train(training)
    return sum(saved.values()) / (micro_batch * seq)


def _optimizer_state_bytes(trainer) -> int:
    """The bytes of the optimizer's state tensors (AdamW's moments of the adapter) at the end of the run."""
    from qlrlora.trainer import unwrap_optimizer

    optimizer = unwrap_optimizer(trainer.optimizer)
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if hasattr(v, "element_size"))


def tokens_trained(trainer) -> float:
    """The tokens a finished run trained: TRL's logged count, or, where the trainer logs none (Unsloth's),
    the sequences its steps took times the mean tokenized length of its training rows."""
    logged = [row["num_tokens"] for row in trainer.state.log_history if "num_tokens" in row]
    if logged:
        return logged[-1]
    args = trainer.args
    sequences = trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps \
        * args.world_size
    return sequences * statistics.fmean(len(ids) for ids in trainer.train_dataset["input_ids"])


def max_seq(name: str, model_path: str, work: Path, memory_gib: float, start: int = 2048, limit: int = 131072,
            progress=lambda result: None, step: int | None = None) -> dict:
    """The longest sequence that trains two steps at micro-batch 1 within `memory_gib`, from `start` on, doubling
    (or growing by `step` tokens); `progress(result so far)` after every length."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        _limit_memory(memory_gib)
    tried, seq, previous = {}, start, None
    while seq <= limit:
        rows = synthetic_rows(work / f"rows-{seq}.jsonl", 2, seq)
        trainer = None
        try:
            trainer = build(name, model_path, rows, work / f"{name}-{seq}", 1, seq, 2, optim="paged_adamw_8bit",
                            previous=previous)
            given = _LongestInput(trainer.model)
            trainer.train()
            given.remove()
            if given.longest < seq - 1:  # a row trains seq - 1 tokens (synthetic_rows): the trainer cut it
                tried[seq] = {"ok": False, "trained_tokens": given.longest}
                break
            tried[seq] = {"ok": True, "peak_alloc_gib": _gib(torch.cuda.max_memory_allocated()) if cuda else None}
        except torch.OutOfMemoryError:
            tried[seq] = {"ok": False}
            break
        finally:
            # Unsloth sets the longest sequence it trains when it loads the model: each length loads its own
            if trainer is not None and CONFIGS[name][0] != "unsloth":
                previous = _Loaded(trainer)
            del trainer
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        progress(_searched(name, memory_gib, tried))
        seq = seq + step if step else seq * 2
    return _searched(name, memory_gib, tried)


class _LongestInput:
    """The longest sequence a model was given, seen by a forward pre-hook: what its steps really trained, whatever
    the trainer did to the rows on the way."""

    def __init__(self, model):
        self.longest = 0
        self._handle = model.register_forward_pre_hook(self._see, with_kwargs=True)

    def _see(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.longest = max(self.longest, ids.shape[-1])

    def remove(self):
        self._handle.remove()


def _outcome(tried: dict, peak: bool = False) -> str:
    """One length of a search as the tables print it."""
    if tried["ok"]:
        return str(tried["peak_alloc_gib"]) if peak else "ok"
    if "trained_tokens" in tried:
        return f"only {tried['trained_tokens']} tokens reached the model"
    return "out of memory"


def _searched(name: str, memory_gib: float, tried: dict) -> dict:
    ok = [s for s, t in tried.items() if t["ok"]]
    return {"config": name, "memory_limit_gib": memory_gib, "max_seq": max(ok) if ok else 0, "tried": dict(tried)}


class _Loaded:
    """What a finished trainer leaves for the next one: its model, tokenizer and adapter layers, not its optimizer."""

    def __init__(self, trainer):
        self.model, self.processing_class = trainer.model, trainer.processing_class
        self.layers = getattr(trainer, "layers", None)


def host_cpu() -> dict:
    """The host's CPU model and core count: a step bound by launching kernels (micro-batch 2 at the 8B shape)
    moves with the host, so a call's figures say which host they ran on."""
    model = platform.processor() or None
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count()}


def _versions() -> dict:
    import accelerate
    import bitsandbytes
    import peft
    import torch
    import transformers
    import trl

    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                "accelerate": accelerate.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
                "trl": trl.__version__}
    try:
        versions["liger_kernel"] = version("liger-kernel")
    except PackageNotFoundError:
        versions["liger_kernel"] = None
    return versions


def run_all(out: Path, model: str, configs: list[str], micro_batches: list[int], seq: int, steps: int,
            max_seq_configs: list[str], memory_gib: float, timeout: int, command: str,
            cap_gib: float | None = None, profile: bool = False, rounds: int = 1) -> dict:
    """Every (configuration, micro-batch) in its own process, one after the other; then the 24 GiB searches.

    `rounds` > 1 times every configuration again in that many rounds, each round running all of them in the
    same order (so a drift of the machine falls on every configuration alike): a run keeps its first round's
    figures and lists every round's tokens/s and step time under `rounds`; the report takes their medians, and
    its ratios pair each round with the same round of the run it is set against.

    `cap_gib` holds every timed run to that much GPU memory, as a card of that size would: a configuration
    that does not fit fails with the allocator's out-of-memory error, which the report shows. `profile`:
    each timed run profiles one step per phase into OUT/profiles/CONFIG@MB (`PhaseProfiles`)."""
    import torch

    from qlrlora.assets import build_from_config

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model_path = str(build_from_config(MODELS[model], "bfloat16"))
    build_s = time.perf_counter() - start
    peak = matmul_peak_tflops()
    path = out / "throughput.json"
    report = json.loads(path.read_text()) if path.is_file() else {"runs": {}, "max_seq": {}}
    report.update({
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "host_cpu": host_cpu(),
        "command": command, "date": time.strftime("%Y-%m-%d"), "model": model, "model_config": MODELS[model],
        "seq": seq, "bf16_matmul_peak_tflops": peak, "model_build_s": round(build_s, 1), "versions": _versions(),
        "cap_gib": cap_gib,
    })
    jobs = [("one", name, mb, r) for r in range(rounds) for mb in micro_batches for name in configs]
    jobs += [("max_seq", name, 1, 0) for name in max_seq_configs]
    for kind, name, mb, r in jobs:
        key = f"{name}@{mb}" if kind == "one" else name
        target = out / ("runs" if kind == "one" else "max_seq") / (f"{key}.json" if r == 0 else f"{key}.round{r + 1}.json")
        log = target.with_suffix(".log")
        target.parent.mkdir(parents=True, exist_ok=True)
        python = [sys.executable, "-c", UNSLOTH_FIRST] if CONFIGS[name][0] == "unsloth" else \
            [sys.executable, "-m", "qlrlora.throughput"]
        argv = [*python, kind, name, "--json", str(target), "--model-path", model_path, "--model", model,
                "--micro-batch", str(mb), "--seq", str(seq), "--steps", str(steps), "--work", str(out / "work")]
        if kind == "max_seq":
            argv += ["--memory-gib", str(memory_gib)]
        elif cap_gib:
            argv += ["--memory-gib", str(cap_gib)]
        if kind == "one" and profile and r == 0:
            argv += ["--profile", str(out / "profiles" / key)]
        began = time.perf_counter()
        with open(log, "w") as f:
            try:
                code = subprocess.run(argv, check=False, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        print(f"{kind} {key}{f' round {r + 1}' if rounds > 1 and kind == 'one' else ''}: exit {code} after "
              f"{time.perf_counter() - began:.0f} s", flush=True)
        section = report["runs" if kind == "one" else "max_seq"]
        result = json.loads(target.read_text()) if target.is_file() else \
            {"config": name, "micro_batch": mb, "error": _last_error(log)}
        if r == 0:
            section[key] = result
        if kind == "one" and rounds > 1:
            figures = {k: result[k] for k in ("error",) if k in result} or \
                {k: result[k] for k in ("tokens_per_s", "step_s", "tokens_per_step")}
            section[key].setdefault("rounds", []).append(figures)
        atomic_write_json(path, report)
    return report


def _timed(run: dict) -> list[dict]:
    """A run's timed figures (tokens_per_s, step_s, tokens_per_step) in each round that ran; one without rounds."""
    return [f for f in run["rounds"] if "error" not in f] if "rounds" in run else [run]


def _paired(ours: list[float], theirs: list[float]) -> tuple[float, list[float]]:
    """The ratio of two runs' tokens/s: the median of the round-by-round ratios when both ran the same rounds
    (with their range), else the ratio of the medians (range empty)."""
    if len(ours) == len(theirs) > 1:
        ratios = [a / b for a, b in zip(ours, theirs)]
        return statistics.median(ratios), [min(ratios), max(ratios)]
    return statistics.median(ours) / statistics.median(theirs), []


def _last_error(log: Path) -> str:
    """The exception that ended a run (the last traceback's last line), else its last line that names an error."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if tracebacks:
        raised = [line for line in lines[tracebacks[-1] + 1:] if not line.startswith((" ", "\t"))]
        if raised:
            return raised[-1][:500]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1][:500]


def configs_table(report: dict) -> dict:
    """Per (configuration, micro-batch): the measured figures, MFU, non-weight memory, and ratios to stock_peft."""
    peak = report.get("bf16_matmul_peak_tflops")
    table = {}
    for key, run in report["runs"].items():
        if "error" in run:
            table[key] = dict(run)
            continue
        stock = report["runs"].get(f"stock_peft@{run['micro_batch']}")
        row = {k: run[k] for k in ("config", "micro_batch", "peak_alloc_gib", "peak_reserved_gib", "model_gib")}
        timed = _timed(run)
        row["tokens_per_s"] = statistics.median(f["tokens_per_s"] for f in timed)
        row["step_s"] = statistics.median(f["step_s"] for f in timed)
        row["rounds"] = len(timed)
        row["non_weight_gib"] = round(run["peak_alloc_gib"] - run["model_gib"], 3) if run["peak_alloc_gib"] else None
        row["mfu"] = round(row["tokens_per_s"] * run["flops_per_token"] / (peak * 1e12), 4) if peak else None
        row["step_s_by_phase"] = run.get("step_s_by_phase")
        if stock and "error" not in stock:
            # unrounded: the tables round once, to two places (1.4946 rounded to 1.495 first would print 1.50x)
            row["tokens_vs_stock"], row["tokens_vs_stock_range"] = _paired(
                [f["tokens_per_s"] for f in timed], [f["tokens_per_s"] for f in _timed(stock)])
            if row["non_weight_gib"] is not None:
                stock_non_weight = stock["peak_alloc_gib"] - stock["model_gib"]
                row["non_weight_vs_stock"] = row["non_weight_gib"] / stock_non_weight
        searched = report.get("max_seq", {}).get(run["config"])
        row["max_seq_24gib"] = searched.get("max_seq") if searched and "error" not in searched else None
        table[key] = row
    return table


def full_run_estimates(report: dict) -> list[dict]:
    """A full-length `qlr_learned` run's speed from its phases timed on their own (`FULL_RUN_PHASES`): the step
    time averaged over the phases by their share of the steps, per kernel variant and micro-batch that ran all
    three, against the stock stack and against the rank fixed at 16 with the same kernels (issue 11's (c)/(b)) where
    they ran in the same call. An estimate: the pruning phase is timed at its mean rank, every layer at that rank."""
    runs, first = report["runs"], next(iter(FULL_RUN_PHASES))
    estimates = []
    for key in runs:
        name, mb = key.split("@")
        if not name.startswith(first):
            continue
        variant = name[len(first):]
        parts = [runs.get(f"{phase}{variant}@{mb}") for phase in FULL_RUN_PHASES]
        if any(part is None or "error" in part for part in parts):
            continue
        timed = [_timed(part) for part in parts]
        if len({len(t) for t in timed}) == 1:  # round by round
            rounds = list(zip(*timed))
        else:
            rounds = [[{k: statistics.median(f[k] for f in t) for k in ("step_s", "tokens_per_step")} for t in timed]]
        steps = [sum(share * f["step_s"] for share, f in zip(FULL_RUN_PHASES.values(), r)) for r in rounds]
        tokens = [statistics.fmean(f["tokens_per_step"] for f in r) / step for r, step in zip(rounds, steps)]
        row = {"config": f"qlr_learned{variant}", "micro_batch": int(mb), "step_s": statistics.median(steps),
               "tokens_per_s": statistics.median(tokens), "rounds": len(rounds)}
        for ratio, against in (("tokens_vs_stock", "stock_peft"), ("tokens_vs_fixed", f"qlr_fixed{variant}")):
            base = runs.get(f"{against}@{mb}")
            if base is not None and "error" not in base:
                row[ratio], row[f"{ratio}_range"] = _paired(tokens, [f["tokens_per_s"] for f in _timed(base)])
        estimates.append(row)
    return estimates


def format_report(report: dict) -> str:
    table = configs_table(report)
    lines = [f"{report['gpu']}, {report['model']}, sequence {report['seq']}; bf16 matmul peak "
             f"{report['bf16_matmul_peak_tflops']:.0f} TFLOP/s" if report.get("bf16_matmul_peak_tflops") else
             f"{report['gpu']}, {report['model']}, sequence {report['seq']}"]
    if report.get("cap_gib"):
        lines[0] += f"; every timed run held to {report['cap_gib']:g} GiB of GPU memory"
    if report.get("host_cpu"):
        lines[0] += f"; host {report['host_cpu']['model']}, {report['host_cpu']['cores']} cores"
    lines.append("")
    head = ["config", "micro-batch", "tokens/s", "vs stock", "step s", "peak alloc GiB", "peak reserved GiB",
            "model GiB", "non-weight GiB", "vs stock", "MFU", "max seq @24 GiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, row in table.items():
        if "error" in row:
            lines.append(f"| {row['config']} | {row['micro_batch']} | failed: {row['error']} |")
            continue
        cells = [row["config"], row["micro_batch"], f"{row['tokens_per_s']:,.0f}",
                 _ratio(row.get("tokens_vs_stock"), row.get("tokens_vs_stock_range")),
                 f"{row['step_s']:.3f}", row["peak_alloc_gib"], row["peak_reserved_gib"], row["model_gib"],
                 row["non_weight_gib"], _ratio(row.get("non_weight_vs_stock")),
                 f"{row['mfu']:.3f}" if row["mfu"] is not None else "", row["max_seq_24gib"] or ""]
        lines.append("| " + " | ".join(str(c) if c is not None else "" for c in cells) + " |")
    held = [run for run in report["runs"].values() if "optimizer_state_mib" in run]
    if held:
        lines += ["", ("What the run holds at its end: the optimizer's state, the adapter's components per layer "
                       "(mean; r_max unless cut at the freeze), and what one decoder block saves for its backward pass "
                       "(bytes per token; `saved_per_block`):"), "",
                  "| config | micro-batch | optimizer state MiB | components | saved per block, bytes/token |",
                  "| --- | --- | --- | --- | --- |"]
        for run in held:
            components, saved = run.get("components_mean"), run.get("saved_block_bytes_per_token")
            lines.append(f"| {run['config']} | {run['micro_batch']} | {run['optimizer_state_mib']:.1f} | "
                         f"{'' if components is None else f'{components:g}'} | "
                         f"{'' if saved is None else f'{saved:,.0f}'} |")
    estimates = full_run_estimates(report)
    if estimates:
        shares = ", ".join(f"{share:g} {name}" for name, share in FULL_RUN_PHASES.items())
        lines += ["", f"A full-length learned-rank run, estimated from its phases timed on their own ({shares}):", "",
                  "| config | micro-batch | step s | tokens/s | vs stock | vs fixed rank 16 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in estimates:
            lines.append(f"| {row['config']} | {row['micro_batch']} | {row['step_s']:.3f} | {row['tokens_per_s']:,.0f} | "
                         f"{_ratio(row.get('tokens_vs_stock'), row.get('tokens_vs_stock_range'))} | "
                         f"{_ratio(row.get('tokens_vs_fixed'), row.get('tokens_vs_fixed_range'))} |")
    phases = {k: r["step_s_by_phase"] for k, r in table.items() if "error" not in r and len(r["step_s_by_phase"]) > 1}
    if phases:
        lines += ["", "Median step time (s) by rank phase, learned ranks:", ""]
        lines += ["| run | warmup | pruning | frozen |", "| --- | --- | --- | --- |"]
        for key, by in phases.items():
            lines.append(f"| {key} | " + " | ".join(str(by.get(p, "")) for p in ("warmup", "pruning", "frozen")) + " |")
    searched = report.get("max_seq", {})
    if searched:
        lines += ["", (f"Longest sequence at micro-batch 1 within {next(iter(searched.values())).get('memory_limit_gib')} "
                      "GiB (doubling from 2048):"), "", "| config | max seq | tried |", "| --- | --- | --- |"]
        for name, s in searched.items():
            if "error" in s:
                lines.append(f"| {name} | failed: {s['error']} | |")
                continue
            tried = ", ".join(f"{k}: {_outcome(v)}" for k, v in s["tried"].items())
            lines.append(f"| {name} | {s['max_seq']} | {tried} |")
    return "\n".join(lines)


def combine(reports: dict[str, dict], command: str, searches: list[dict] = ()) -> dict:
    """One summary of several calls' reports (name -> throughput.json): per configuration, its figures at each
    micro-batch with the ratios to the stock stack measured in the same call, and its longest sequence within the
    memory limit. A run measured in several calls is kept from the first, with the others' tokens/s as repeats.
    `searches`: `max_seq` results run on their own; each replaces the calls' search of its configuration."""
    configs: dict[str, dict] = {}
    for call, report in reports.items():
        for row in configs_table(report).values():
            if "error" in row:
                continue
            entry = configs.setdefault(row["config"], {"micro_batch": {}})
            mb = str(row["micro_batch"])
            if mb in entry["micro_batch"]:
                entry["micro_batch"][mb].setdefault("repeats_tokens_per_s", []).append(row["tokens_per_s"])
                continue
            entry["micro_batch"][mb] = {**{k: v for k, v in row.items() if k not in ("config", "max_seq_24gib")},
                                        "call": call}
        for name, searched in report.get("max_seq", {}).items():
            if "error" not in searched:
                configs.setdefault(name, {"micro_batch": {}})["max_seq_24gib"] = searched["max_seq"]
                configs[name]["max_seq_tried"] = searched["tried"]
    for searched in searches:
        entry = configs.setdefault(searched["config"], {"micro_batch": {}})
        entry["max_seq_24gib"], entry["max_seq_tried"] = searched["max_seq"], searched["tried"]
    for entry in configs.values():
        headline = entry["micro_batch"].get("8") or next(iter(entry["micro_batch"].values()), {})
        for key in ("tokens_per_s", "step_s", "peak_alloc_gib", "peak_reserved_gib", "model_gib", "mfu"):
            entry[key] = headline.get(key)
        entry.setdefault("max_seq_24gib", None)
    first = next(iter(reports.values()))
    return {"gpu": first["gpu"], "command": command, "date": first["date"], "model": first["model"], "seq": first["seq"],
            "headline_micro_batch": 8, "bf16_matmul_peak_tflops": {c: r["bf16_matmul_peak_tflops"] for c, r in reports.items()},
            "versions": first["versions"], "configs": configs}


def format_combined(summary: dict) -> str:
    head = ["config", "micro-batch", "tokens/s", "vs stock (same call)", "step s", "peak alloc GiB", "peak reserved GiB",
            "model GiB", "non-weight GiB", "vs stock", "MFU", "call", "repeats (tokens/s)"]
    lines = [f"{summary['gpu']}, {summary['model']} shape, sequence {summary['seq']}", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for mb in ("8", "2"):
        for name, entry in summary["configs"].items():
            row = entry["micro_batch"].get(mb)
            if row is None:
                continue
            cells = [name, mb, f"{row['tokens_per_s']:,.0f}", _ratio(row.get("tokens_vs_stock")), f"{row['step_s']:.3f}",
                     row["peak_alloc_gib"], row["peak_reserved_gib"], row["model_gib"], row["non_weight_gib"],
                     _ratio(row.get("non_weight_vs_stock")), f"{row['mfu']:.3f}" if row.get("mfu") else "", row["call"],
                     ", ".join(f"{t:,.0f}" for t in row.get("repeats_tokens_per_s", []))]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "| config | longest sequence at micro-batch 1 in 24 GiB | tried |", "| --- | --- | --- |"]
    for name, entry in summary["configs"].items():
        if entry.get("max_seq_24gib"):
            tried = ", ".join(f"{k}: {_outcome(v)}" for k, v in entry["max_seq_tried"].items())
            lines.append(f"| {name} | {entry['max_seq_24gib']} | {tried} |")
    return "\n".join(lines)


def format_searches(searches: list[dict]) -> str:
    """The table of `max_seq` results (their JSON files): each length tried, its peak memory, the longest that trained."""
    lines = ["| config | memory limit GiB | tried (peak allocated GiB) | longest that trained |", "| --- | --- | --- | --- |"]
    for s in searches:
        tried = ", ".join(f"{k}: {_outcome(v, peak=True)}" for k, v in s["tried"].items())
        lines.append(f"| {s['config']} | {s['memory_limit_gib']} | {tried} | {s['max_seq'] or 'none of those tried'} |")
    return "\n".join(lines)


def _ratio(value: float | None, spread: list[float] | None = None) -> str:
    """A ratio as `1.23x`; with the range of its round-by-round ratios, `1.23x (1.20-1.25)`."""
    if value is None:
        return ""
    return f"{value:.2f}x ({spread[0]:.2f}-{spread[1]:.2f})" if spread else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_throughput.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    every = sub.add_parser("all", help="every configuration, one process each; writes OUT/throughput.json")
    every.add_argument("out", type=Path)
    every.add_argument("--configs", nargs="*", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS))
    every.add_argument("--micro-batches", nargs="*", type=int, default=[2, 8])
    every.add_argument("--max-seq", nargs="*", default=["stock_peft", "qlr_learned"], choices=list(CONFIGS),
                       help="configurations whose longest sequence within --memory-gib is searched")
    every.add_argument("--memory-gib", type=float, default=24.0)
    every.add_argument("--timeout", type=int, default=600, help="seconds for one process")
    every.add_argument("--cap-gib", type=float, help="hold every timed run to this much GPU memory (a smaller card)")
    every.add_argument("--profile", action="store_true", help="profile one step per rank phase of each timed run")
    every.add_argument("--rounds", type=int, default=1,
                       help="time every configuration this many times, all of them once per round")
    for name in ("one", "max_seq"):
        p = sub.add_parser(name)
        p.add_argument("config", choices=list(CONFIGS))
        p.add_argument("--json", type=Path, required=True)
        p.add_argument("--model-path")
        p.add_argument("--micro-batch", type=int, default=2)
        p.add_argument("--memory-gib", type=float)
        p.add_argument("--seq-step", type=int, help="max_seq: grow the sequence by this many tokens, not doubling")
        p.add_argument("--work", type=Path, default=Path("runs/bench_throughput"))
        if name == "one":
            p.add_argument("--profile", type=Path, help="a folder for a profile of one step per rank phase")
    for p in sub.choices.values():
        p.add_argument("--model", choices=list(MODELS), default="llama3-8b")
        p.add_argument("--seq", type=int, default=2048)
        p.add_argument("--steps", type=int, default=20)
    report = sub.add_parser("report", help="print the tables of a throughput.json")
    report.add_argument("json", type=Path)
    searches = sub.add_parser("searches", help="print the table of max_seq JSON files")
    searches.add_argument("files", nargs="+", type=Path)
    merged = sub.add_parser("combine", help="one summary of several calls' throughput.json files")
    merged.add_argument("calls", nargs="+", type=Path, help="folders holding a throughput.json, in the order they ran")
    merged.add_argument("--json", type=Path, required=True, help="where to write the summary")
    merged.add_argument("--searches", nargs="*", type=Path, default=[],
                        help="max_seq JSON files run on their own, each replacing the calls' search of its configuration")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        if args.command == "report":
            print(format_report(json.loads(args.json.read_text())))
            return 0
        if args.command == "searches":
            print(format_searches([json.loads(f.read_text()) for f in args.files]))
            return 0
        if args.command == "combine":
            reports = {folder.name: json.loads((folder / "throughput.json").read_text()) for folder in args.calls}
            command = " ".join(["python", "tools/bench_throughput.py", *(sys.argv[1:] if argv is None else argv)])
            summary = combine(reports, command, [json.loads(f.read_text()) for f in args.searches])
            atomic_write_json(args.json, summary)
            print(format_combined(summary))
            return 0
        if args.command == "all":
            command = " ".join(["python", "tools/bench_throughput.py", *(sys.argv[1:] if argv is None else argv)])
            run_all(args.out, args.model, args.configs, args.micro_batches, args.seq, args.steps, args.max_seq,
                    args.memory_gib, args.timeout, command, args.cap_gib, args.profile, args.rounds)
            print(format_report(json.loads((args.out / "throughput.json").read_text())))
            return 0
        from qlrlora.assets import build_from_config

        model_path = args.model_path or str(build_from_config(MODELS[args.model], "bfloat16"))
        args.work.mkdir(parents=True, exist_ok=True)
        if args.command == "one":
            result = run_one(args.config, model_path, MODELS[args.model], args.work, args.micro_batch, args.seq,
                             args.steps, args.memory_gib, args.profile)
        else:
            result = max_seq(args.config, model_path, args.work, args.memory_gib or 24.0, start=args.seq,
                             progress=lambda partial: atomic_write_json(args.json, partial), step=args.seq_step)
        result["versions"] = _versions()
        atomic_write_json(args.json, result)
        print(json.dumps({k: v for k, v in result.items() if k != "step_s_all"}, indent=2))
    except QLRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
