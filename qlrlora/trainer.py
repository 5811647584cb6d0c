"""QLRSFTTrainer: TRL's SFTTrainer plus the rank regulariser, rank logging and LR-LoRA checkpoints.

What it adds to SFTTrainer, and where:
- `compute_loss`: adds lambda * cost once per optimizer step's worth of loss, whatever the gradient
  accumulation and TRL's num_items_in_batch normalisation;
- `create_optimizer`: a separate group for the ranks (`rank.rank_lr`, no weight decay);
- `__init__`: keeps the ranks (and fp32 factors) in their dtype although SFTTrainer casts the trainable
  parameters of quantized models to bf16;
- `_RankStep` callback: steps the budget controller and the temperature after every optimizer step;
- `log`: rank metrics at every logging step (console, TensorBoard, trainer_state.json);
- `_save` / `_load_from_checkpoint`: the adapter as safetensors + JSON with ranks.json and ranks.png,
  instead of a copy of the whole quantized model, and an exact resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from qlrlora.adapter import LRLoRALinear
from qlrlora.checkpoint import load_adapter, save_adapter
from qlrlora.config import AdapterConfig, RankConfig
from qlrlora.errors import QLRError
from qlrlora.io import atomic_write_json
from qlrlora.regularizer import RankController
from qlrlora.report import write_rank_report

COMPLETE_MARKER = "qlrlora-complete.json"


class QLRSFTTrainer(SFTTrainer):
    def __init__(
        self,
        *args,
        layers: dict[str, LRLoRALinear],
        adapter_config: AdapterConfig,
        rank_config: RankConfig,
        **kwargs,
    ):
        model = kwargs["model"]
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        with _adapters_declared(model):
            super().__init__(*args, **kwargs)
        # SFTTrainer casts every trainable parameter of a quantized model to bf16; put back what we chose.
        for name, param in model.named_parameters():
            if name in trainable and param.dtype != trainable[name].dtype:
                param.data = trainable[name].to(param.device)
        self.layers = layers
        self.adapter_config = adapter_config
        self.rank_config = rank_config
        self.controller = RankController(layers, rank_config, total_steps=max(self.args.max_steps, 1))
        self._regularizer_since_log = 0.0
        self._steps_since_log = 0
        self.add_callback(_RankStep(self))

    # ------------------------------------------------------------------ loss and optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training or self.controller.penalty == 0:
            return result
        loss, outputs = result if return_outputs else (result, None)
        # Trainer divides the returned loss by the accumulation steps unless it is already normalised over the
        # whole accumulated batch (num_items_in_batch); the regulariser must count once per optimizer step.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        steps = self.current_gradient_accumulation_steps
        regularizer = self.controller.regularizer().to(loss.device)
        loss = loss + (1.0 / steps if scaled else 1.0) * regularizer
        # What this micro-batch adds to the logged loss (Trainer divides unscaled losses by the steps).
        self._regularizer_since_log = self._regularizer_since_log + regularizer.detach() / steps
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        rank_ids = {id(layer.rank) for layer in self.layers.values()}
        decay = set(self.get_decay_parameter_names(model))
        groups = [
            {"params": [], "weight_decay": self.args.weight_decay},
            {"params": [], "weight_decay": 0.0},
            {"params": [], "weight_decay": 0.0, "lr": self.rank_config.rank_lr},
        ]
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            index = 2 if id(param) in rank_ids else (0 if name in decay else 1)
            groups[index]["params"].append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            c = self.controller
            # `loss` is what is minimised (task loss + regulariser), averaged per optimizer step like Trainer's.
            regularizer = float(self._regularizer_since_log) / max(self._steps_since_log, 1)
            self._regularizer_since_log = 0.0
            self._steps_since_log = 0
            logs.update(
                {
                    "task_loss": logs["loss"] - regularizer,
                    "rank/regularizer": regularizer,
                    "rank/lambda": c.penalty,
                    "rank/temperature": c.temperature,
                    "rank/mean_attention": c.mean_rank("attention"),
                    "rank/mean_mlp": c.mean_rank("mlp"),
                    "rank/live_params": c.live_params(),
                }
            )
            logs = {k: v for k, v in logs.items() if v is not None}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving and resuming

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        spread = self._rank_spread_across_processes()  # a collective: every process reaches _save
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(output_dir, self.layers, self.adapter_config, self.rank_config, self.controller.state_dict())
        write_rank_report(
            output_dir,
            self.controller,
            extra={"processes": self.accelerator.num_processes, "rank_spread_across_processes": spread},
        )
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            # Written last and atomically: a checkpoint without it was interrupted and is never resumed from.
            atomic_write_json(folder / COMPLETE_MARKER, {"global_step": self.state.global_step})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not (Path(resume_from_checkpoint) / COMPLETE_MARKER).is_file():
            raise QLRError(f"{resume_from_checkpoint}: incomplete checkpoint (the run stopped while saving it)")
        _, meta = load_adapter(resume_from_checkpoint, self.model if model is None else model)
        self.controller.load_state_dict(meta["controller"])

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        _, meta = load_adapter(best, self.model)
        self.controller.load_state_dict(meta["controller"])

    def _rank_spread_across_processes(self) -> float:
        """Largest difference of any layer's rank between processes; 0 when DDP keeps them in sync."""
        ranks = self.controller.ranks().detach()
        gathered = self.accelerator.gather(ranks.to(self.accelerator.device)[None])
        return float((gathered.max(dim=0).values - gathered.min(dim=0).values).max())


class _RankStep(TrainerCallback):
    """After each optimizer step: dual update of lambda, rank clamping, temperature for the next step."""

    def __init__(self, trainer: QLRSFTTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer.controller.set_total_steps(state.max_steps)  # known only now when training by epochs
        schedule_sum = _rank_schedule_sum(trainer, state.global_step, state.max_steps)
        problem = trainer.controller.unreachable_budget(schedule_sum)
        if problem and trainer.is_world_process_zero():
            print(f"warning: {problem}", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.controller.step()
        self.trainer._steps_since_log += 1


def _rank_schedule_sum(trainer: QLRSFTTrainer, first: int, steps: int) -> float:
    """Sum of the rank group's learning-rate multipliers over steps first..steps-1 (1 each if unreadable)."""
    scheduler = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)  # accelerate wraps it
    lambdas = getattr(scheduler, "lr_lambdas", None)
    rank = next(iter(trainer.layers.values())).rank
    groups = trainer.optimizer.param_groups
    index = next((i for i, g in enumerate(groups) if any(p is rank for p in g["params"])), None)
    if lambdas is None or index is None:
        return float(steps - first)
    return sum(lambdas[index](step) for step in range(first, steps))


@contextlib.contextmanager
def _adapters_declared(model):
    """transformers refuses to train a quantized model unless PEFT adapters are attached; ours are attached."""
    had = getattr(model, "_hf_peft_config_loaded", False)
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        model._hf_peft_config_loaded = had


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step whose save finished."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return max(done, key=lambda p: json.loads((p / COMPLETE_MARKER).read_text())["global_step"], default=None)
