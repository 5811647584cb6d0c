"""QLRSFTTrainer: TRL's SFTTrainer plus rank control, rank logging and LR-LoRA checkpoints.

What it adds to SFTTrainer, and where:
- `__init__`: the rank controller; keeps fp32 factors in fp32 although SFTTrainer casts the trainable
  parameters of quantized models to bf16;
- `StopOnDivergence` callback and `train`: a run whose loss or gradient norm is no longer finite
  stops with a one-line error instead of training NaN parameters to the end;
- `StopOnSignal` callback: on SIGTERM, saves a checkpoint at the end of the step and stops (every
  process at the same step), so that a run stopped on purpose (a preempted job) resumes where it stopped;
- `_RankStep` callback, before every optimizer step: the controller moves the ranks from their
  gradient (averaged over data-parallel processes, fp16 loss scale removed) and clears it. The
  ranks are not model parameters, so the optimizer, gradient clipping and DDP never touch them.
  After the step that froze them, `cut_frozen_factors` cuts the factors and their optimizer state
  to the hard ranks; while they move, with `rank.order_components`, `order_components` sorts each layer's
  switched-on components largest first after every optimizer step;
- `log`: rank metrics at every logging step (console, TensorBoard, trainer_state.json);
- `save_model`: the adapter as safetensors + JSON with ranks.json and ranks.png, instead of a copy of
  the whole quantized model; `MarkCompleteCheckpoints`, a completion marker for every checkpoint;
- `_load_from_checkpoint` / `_load_best_model` (private: Trainer has no public hook for loading a
  checkpoint of another format; fenced by a test): an exact resume;
- `_get_train_sampler` (private, fenced by the same test): `group_by_length` draws each pass's order
  from the seed and the pass (`resumable_sampler`), so a resume in a later pass is exact too.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer

from qlrlora.adapter import LRLoRALinear
from qlrlora.checkpoint import adapter_tensors, load_adapter, save_adapter
from qlrlora.config import AdapterConfig, RankConfig
from qlrlora.distributed import reduce_mean
from qlrlora.errors import QLRError
from qlrlora.io import atomic_write_json
from qlrlora.regularizer import RankController
from qlrlora.report import layer_ranks, mean_rank, write_rank_report
from qlrlora.rundir import COMPLETE_MARKER


def unwrap_optimizer(optimizer):
    """The optimizer inside accelerate's wrapper (None stays None: before the trainer creates one)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


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
        self.add_callback(_RankStep(self))
        self.add_callback(MarkCompleteCheckpoints())
        self.divergence = StopOnDivergence()
        self.add_callback(self.divergence)

    def train(self, *args, **kwargs):
        """Trainer.train, raising TrainingDiverged where the loss or the gradient norm stopped being finite."""
        output = super().train(*args, **kwargs)
        self.divergence.check()
        return output

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            c = self.controller
            rows = layer_ranks(self.layers)
            logs.update(
                {
                    "rank/cost": c.cost(),
                    "rank/target": c.target(),
                    "rank/lambda": c.penalty,
                    "rank/mean_attention": mean_rank(rows, "attention"),
                    "rank/mean_mlp": mean_rank(rows, "mlp"),
                    "rank/spread": _coefficient_of_variation([r.rank for r in rows]),
                    "rank/live_params": c.live_params(),
                }
            )
            logs = {k: v for k, v in logs.items() if v is not None}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter (safetensors + JSON), ranks.json / ranks.png, the tokenizer and the training arguments,
        instead of a copy of the whole quantized model. Trainer calls it for every checkpoint too."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        spread = self._rank_spread_across_processes()  # collectives: every process gets here
        tensors = adapter_tensors(self.layers)  # whole factors even when FSDP shards them
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(output_dir, self.layers, self.adapter_config, self.rank_config, self.controller.state_dict(),
                     tensors=tensors)
        write_rank_report(
            output_dir,
            self.controller,
            extra={"processes": self.accelerator.num_processes, "rank_spread_across_processes": spread},
        )
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _rank_spread_across_processes(self) -> float:
        """Largest difference of any layer's rank between processes; 0 when the controller keeps them in sync."""
        ranks = self.controller.ranks.values.detach()
        gathered = self.accelerator.gather(ranks.to(self.accelerator.device)[None])
        return float((gathered.max(dim=0).values - gathered.min(dim=0).values).max())

    def cut_frozen_factors(self) -> None:
        """Once the ranks are frozen, cut every layer's factors (and their gradients) to its hard rank, and the
        optimizer's state of them alike (`rank.cut_at_freeze`).

        The forward pass is unchanged (the components cut are switched off for good), and the step stops
        zero-filling their gradients, updating them and keeping their optimizer moments: at r_max 64 and a
        budget of 16, three quarters of the adapter's memory and optimizer work. Only where the shapes are
        ours to change: one process (DDP's gradient buckets and FSDP's flat parameters are sized when they
        wrap the model), and an optimizer of torch's or of bitsandbytes' whose state per factor is tensors
        of its shape (`_cut_state`). Elsewhere the factors keep r_max and the switched-off components stay
        masked, as before the freeze; `cut_blocked` says why."""
        if not (self.rank_config.cut_at_freeze and self.controller.frozen) or self.cut_blocked():
            return
        optimizer = unwrap_optimizer(self.optimizer)
        hard_ranks = self.controller.hard_ranks()
        for layer in self.layers.values():
            hard = hard_ranks[layer.index]
            if layer.components == hard:
                continue
            shapes = {p: p.shape for p in (layer.lora_A, layer.lora_B)}
            layer.resize_(hard)
            if optimizer is None:
                continue
            for p, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):  # the components: A's rows, B's columns
                if p in optimizer.state:
                    _cut_state(optimizer, p, shapes[p], dim, hard)

    def cut_blocked(self) -> str | None:
        """Why `cut_frozen_factors` cannot cut here, or None."""
        if self.accelerator.distributed_type != DistributedType.NO:
            return f"{self.accelerator.distributed_type.value} fixes the parameters' shapes when it wraps the model"
        optimizer = unwrap_optimizer(self.optimizer)
        if optimizer is None:
            return None
        name = type(optimizer).__name__
        if not type(optimizer).__module__.startswith(("torch.optim", "bitsandbytes.optim")):
            return f"the optimizer {name} keeps a state this trainer does not know how to cut"
        for layer in self.layers.values():
            for p in (layer.lora_A, layer.lora_B):
                for key, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape and key not in _BNB_SIDE_STATE:
                        return (f"the optimizer {name} keeps {key} of shape {tuple(value.shape)} for a factor of shape "
                                f"{tuple(p.shape)}, a state this trainer does not know how to cut")
        return None

    def order_components(self) -> None:
        """Sort every layer's switched-on components largest first, their optimizer state alike
        (`rank.order_components`; `LRLoRALinear.order_components_`). Under DDP every process holds the same
        factors, so every process sorts them the same way."""
        optimizer = unwrap_optimizer(self.optimizer)
        state = optimizer.state if optimizer is not None else {}
        hard_ranks = self.controller.hard_ranks()
        for layer in self.layers.values():
            layer.order_components_(hard_ranks[layer.index], state)

    def order_blocked(self) -> str | None:
        """Why `order_components` cannot sort here, or None."""
        if self.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU,
                                                     DistributedType.MULTI_CPU):
            return f"{self.accelerator.distributed_type.value} shards the factors"
        optimizer = unwrap_optimizer(self.optimizer)
        if optimizer is not None and not type(optimizer).__module__.startswith("torch.optim"):
            return f"the optimizer {type(optimizer).__name__} keeps a state this trainer does not know how to sort"
        return None

    def finished_at(self, checkpoint: str | Path) -> bool:
        """True when `checkpoint` was saved at the last step of its run: there is nothing left to train."""
        state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
        return state.max_steps > 0 and state.global_step >= state.max_steps

    def restore(self, checkpoint: str | Path) -> None:
        """Load a finished run's adapter, rank state and trainer state (its log history) without training."""
        self._load_from_checkpoint(str(checkpoint))
        self.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))

    # ------------------------------------------------------------------ private seams of transformers
    # Trainer has no public hook for these; tests/test_trainer.py::test_the_private_trainer_seams_we_use_exist
    # checks every supported release still has them with the signature used here.

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume: our adapter and rank state, where Trainer would look for a full model's weights."""
        if not (Path(resume_from_checkpoint) / COMPLETE_MARKER).is_file():
            raise QLRError(f"{resume_from_checkpoint}: incomplete checkpoint (the run stopped while saving it)")
        _, meta = load_adapter(resume_from_checkpoint, self.model if model is None else model)
        self.controller.load_state_dict(meta["controller"])

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: the best checkpoint's adapter and rank state."""
        _, meta = load_adapter(self.state.best_model_checkpoint, self.model)
        self.controller.load_state_dict(meta["controller"])

    def _get_train_sampler(self, train_dataset=None):
        return resumable_sampler(super()._get_train_sampler(train_dataset), self.args)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """`group_by_length`'s sampler, each pass's order drawn from `seed + epoch` (Trainer calls `set_epoch`
    before every pass). Trainer's own draws it from the global RNG as the pass begins, and a run resumed
    in its second pass or later restores that RNG only after drawing: it trained another order than the
    run it continues, some rows of the pass twice and others not at all."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


def resumable_sampler(sampler, args):
    """Trainer's training sampler, or, for `group_by_length`, one whose order a resume reproduces."""
    if type(sampler) is LengthGroupedSampler and sampler.generator is None:
        seed = args.data_seed if args.data_seed is not None else args.seed
        return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
    return sampler


class TrainingDiverged(QLRError):
    """The loss or the gradient norm is NaN or infinite; `step` is the logging step that showed it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class TrainingStopped(QLRError):
    """SIGTERM stopped training at a checkpoint that `output.resume` continues."""


class StopOnDivergence(TrainerCallback):
    """Stop at the first logging step whose loss or gradient norm is not finite; `check()` raises it.

    Once the gradient norm is NaN, clipping and AdamW write NaN into every trainable parameter, and the
    rest of the run trains nothing. The logged values are already reduced over the processes, so every
    process stops at the same step. The loop is stopped rather than interrupted, so that the progress
    bar closes before the error prints, and no checkpoint is saved from that step on. The gradient norm
    is the signal that counts: Trainer's default `logging_nan_inf_filter` logs a NaN loss as a finite
    one. Under fp16 a non-finite gradient norm is an overflow that the loss scaler skips, so there only
    the loss is read, and fp16 runs are guarded only with that filter off."""

    def __init__(self):
        self.error: TrainingDiverged | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key, name in (("loss", "training loss"), ("grad_norm", "gradient norm")):
            value = logs.get(key)
            if self.error or value is None or (key == "grad_norm" and args.fp16) or math.isfinite(float(value)):
                continue
            rate = logs.get("learning_rate", args.learning_rate)
            self.error = TrainingDiverged(
                f"training diverged: the {name} is {float(value)} at step {state.global_step} (learning rate "
                f"{rate:.3g}), and every later step would train NaN parameters, so the run stopped; start it "
                f"again with a lower train.learning_rate or a longer train.warmup_steps (output.overwrite: true)",
                state.global_step)
        return self._halt(control)

    def on_step_end(self, args, state, control, **kwargs):
        return self._halt(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._halt(control)

    def _halt(self, control):
        if self.error:
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False
        return control

    def check(self) -> None:
        if self.error:
            raise self.error


class MarkCompleteCheckpoints(TrainerCallback):
    """Called once the whole checkpoint (adapter, optimizer, scheduler, RNG, trainer state) is written, it writes
    the marker last and atomically: a checkpoint without it was interrupted and is never resumed."""

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            atomic_write_json(folder / COMPLETE_MARKER, {"global_step": state.global_step})


class StopOnSignal(TrainerCallback):
    """Once `request` has run (`on_sigterm` installs it as the handler), save a checkpoint at the end of the
    step and stop."""

    def __init__(self):
        self.requested = False

    def request(self, signum=None, frame=None) -> None:
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if args.world_size > 1:  # every process stops at the step the first signal arrived in: the saves meet
            requested = bool(reduce_mean(torch.tensor([float(requested)], device=args.device)) > 0)
        if requested:
            control.should_save = control.should_training_stop = True
        return control

    @contextlib.contextmanager
    def on_sigterm(self):
        """SIGTERM (a scheduler's preemption, `kill`, a launcher passing it on) calls `request` while the block
        runs."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self.request)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


class _RankStep(TrainerCallback):
    """The rank step before each optimizer step; the factors cut once the ranks are frozen (at the start of a run
    whose ranks are fixed or that resumes frozen, else after the step that froze them)."""

    def __init__(self, trainer: QLRSFTTrainer):
        self.trainer = trainer
        self.cut_done = False
        self.order_blocked: str | None = None  # why the components cannot be sorted; "" once they can

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer.controller.set_total_steps(state.max_steps)  # known only now when training by epochs
        problem = trainer.controller.unreachable_budget()
        if problem and trainer.is_world_process_zero():
            print(f"warning: {problem}", file=sys.stderr, flush=True)
        self._cut()

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.controller.frozen and not self.cut_done:
            self._cut()
        elif trainer.rank_config.order_components and trainer.controller.phase == "pruning":
            self._order()

    def _order(self) -> None:
        if self.order_blocked is None:
            self.order_blocked = self.trainer.order_blocked() or ""
            if self.order_blocked and self.trainer.is_world_process_zero():
                print(f"note: rank.order_components is off for this run ({self.order_blocked})",
                      file=sys.stderr, flush=True)
        if not self.order_blocked:
            self.trainer.order_components()

    def _cut(self) -> None:
        trainer = self.trainer
        if not (trainer.rank_config.cut_at_freeze and trainer.controller.frozen):
            return
        self.cut_done = True
        blocked = trainer.cut_blocked()
        if blocked is None:
            trainer.cut_frozen_factors()
        elif trainer.is_world_process_zero():
            print(f"note: the ranks are frozen; the factors keep r_max components, masked ({blocked})",
                  file=sys.stderr, flush=True)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        self.trainer.controller.step(
            reduce=reduce_mean,  # the same step on every process: DDP and FSDP never see the ranks
            grad_scale=float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0,
        )


# bitsandbytes' optimizer state beside the moments: the 8-bit code books, the block maxima of 8-bit
# moments, the update norm.
_BNB_SIDE_STATE = ("qmap1", "qmap2", "absmax1", "absmax2", "unorm_vec")
_BNB_BLOCK = 256  # bitsandbytes' 8-bit optimizers quantize their moments in blocks of 256 values


def _cut_state(optimizer, p: torch.nn.Parameter, old_shape: torch.Size, dim: int, n: int) -> None:
    """Cut the optimizer's state of the factor `p`, already cut to its first `n` components along `dim`,
    alike: every tensor of the factor's old shape keeps its first `n` along `dim`.

    bitsandbytes' 8-bit moments (uint8 codes, with `absmax` the maximum of each block of 256 values of the
    flattened moment) keep their codes and block maxima exactly where the kept part is whole blocks in
    front (A's rows, when a row's length times `n` is a multiple of 256); elsewhere (B's columns) the
    kept values are decoded and quantized again in blocks of their own, one more rounding to the 8-bit
    code of the kind every 8-bit step makes. A paged optimizer's state stays paged."""
    state = optimizer.state[p]
    for key, old in list(state.items()):
        if not (torch.is_tensor(old) and old.shape == old_shape):
            continue
        value = old.to(p.device)  # a paged moment is a host tensor over CUDA managed memory: decode it on p's device
        kept = value.narrow(dim, 0, n)
        if value.dtype != torch.uint8:
            cut = kept.clone()
        else:
            absmax_key, code = "absmax" + key.removeprefix("state"), state["qmap" + key.removeprefix("state")]
            if kept.is_contiguous() and kept.numel() % _BNB_BLOCK == 0:
                cut, state[absmax_key] = kept.clone(), state[absmax_key][: kept.numel() // _BNB_BLOCK].clone()
            else:
                from bitsandbytes.functional import dequantize_blockwise, quantize_blockwise

                whole = dequantize_blockwise(value, absmax=state[absmax_key], code=code, blocksize=_BNB_BLOCK)
                cut, quantized = quantize_blockwise(whole.narrow(dim, 0, n).contiguous(), code=code, blocksize=_BNB_BLOCK)
                state[absmax_key] = quantized.absmax
        if getattr(optimizer, "is_paged", False):  # bitsandbytes pages large moments; free the old page
            optimizer.page_mng.paged_tensors = [t for t in optimizer.page_mng.paged_tensors if t is not old]
            cut = optimizer.get_state_buffer(p, dtype=cut.dtype).copy_(cut)
        state[key] = cut


def _coefficient_of_variation(values: list[float]) -> float:
    mean = sum(values) / len(values)
    if mean == 0:
        return 0.0
    return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 / mean


@contextlib.contextmanager
def _adapters_declared(model):
    """transformers refuses to train a quantized model unless PEFT adapters are attached (it reads the private
    `_hf_peft_config_loaded`, checked by the same test as the seams above); ours are attached."""
    had = getattr(model, "_hf_peft_config_loaded", False)
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        model._hf_peft_config_loaded = had
