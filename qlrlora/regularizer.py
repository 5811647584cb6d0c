"""Rank control: how the learned ranks move, what they cost, and when they stop.

Every optimizer step the controller moves the rank vector (adapter.Ranks) by a gradient step on

    task loss + lambda * cost,   cost = sum over layers of (in + out) * rank / sum of (in + out)

(a size-weighted average rank: the adapter parameters in use over those of rank 1 everywhere).
The task's gradient on the ranks comes from the backward pass; the cost's is analytic. A run has
three phases (fractions of the optimizer steps):

1. warm-up, `warmup_fraction`: the ranks stay at their initial values (r_max by default) while
   every component trains, so that no component is cut before it has had a chance to matter;
2. pruning, until `freeze_fraction`: the ranks move. In budget mode the target cost falls from the
   cost at the start of pruning to the budget on AdaLoRA's cubic schedule, and lambda is, at every
   step, the smallest multiplier >= 0 whose step lands the total cost on the schedule's next value;
   the optimizer only decides *where* the parameters go. In penalty mode lambda is fixed;
3. frozen: every rank is set to its hard rank and stays there while the factors keep training (in
   budget mode, if rounding would overshoot the budget, the components least above their switching
   point are switched off first).

Why the step is not Adam's: Adam normalises every rank by its own gradient history, so once
lambda dominates, every rank moves at the same speed whatever its layer's size or usefulness, and
all layers end at the same rank (measured; docs/design/rank-control.md). Here the moving average
of the task gradient is divided by *one* scale shared by all ranks, its root mean square over the
layers, so the layers keep their relative importance and the task term has a unit spread whatever
the loss's scale or the batch's noise; the cost term keeps each layer's true parameter cost
(its size relative to the average layer). A rank keeps shrinking while its normalised task
gradient is weaker than lambda times its relative size: one global threshold, the first-order
optimality condition of "least loss for this many parameters".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from qlrlora.adapter import LRLoRALinear, Ranks
from qlrlora.config import RankConfig

# A rank moves by at most this much in one step, so one noisy step cannot drop a component outright.
MAX_STEP = 0.5
# The task gradient of a rank is noisy from step to step; its moving average over ~20 steps is what moves the rank.
MOMENTUM = 0.95


class RankController:
    """Moves the ranks: `step(...)` once per optimizer step, after the backward passes of that step."""

    def __init__(self, layers: dict[str, LRLoRALinear], config: RankConfig, total_steps: int):
        if not layers:
            raise ValueError("RankController needs at least one LR-LoRA layer")
        self.layers = layers
        self.ranks: Ranks = next(iter(layers.values())).ranks
        if any(layer.ranks is not self.ranks for layer in layers.values()) or len(self.ranks) != len(layers):
            raise ValueError("the layers of a RankController must share one Ranks vector, one entry each")
        order = sorted(layers.values(), key=lambda layer: layer.index)
        self.config = config
        self.total_steps = max(1, total_steps)
        device = self.ranks.device
        self.sizes = torch.tensor([float(m.in_features + m.out_features) for m in order], device=device)
        self.reference_params = float(self.sizes.sum())
        self.weights = self.sizes / self.sizes.mean()  # n * d cost / d sum(mask) of each layer
        self.budget = self._budget_in_cost_units(config)
        self.penalty = float(config.penalty) if config.mode == "penalty" else 0.0
        self.step_count = 0
        self.momentum = torch.zeros(len(self.ranks), device=device)
        self.moving_steps = 0
        self.start_cost: float | None = None
        self.frozen = False
        self.ranks.temperature = config.temperature
        self.ranks.learning = True
        if config.mode == "fixed":
            self._freeze()

    def _budget_in_cost_units(self, config: RankConfig) -> float | None:
        if config.mode != "budget":
            return None
        if config.budget_params is not None:
            return config.budget_params / self.reference_params
        return float(config.budget_avg_rank)

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps = max(1, total_steps)

    # ------------------------------------------------------------------ schedule

    @property
    def warmup_steps(self) -> int:
        return round(self.config.warmup_fraction * self.total_steps)

    @property
    def freeze_step(self) -> int:
        return max(self.warmup_steps, round(self.config.freeze_fraction * self.total_steps))

    @property
    def phase(self) -> str:
        if self.frozen:
            return "frozen"
        return "warmup" if self.step_count < self.warmup_steps else "pruning"

    def target(self, step: int | None = None) -> float | None:
        """The budget mode's target cost after `step` optimizer steps (default: now)."""
        if self.budget is None:
            return None
        step = self.step_count if step is None else step
        start = self.cost() if self.start_cost is None else self.start_cost  # before pruning, where the ranks are
        if start <= self.budget or step >= self.freeze_step:
            return self.budget
        if step <= self.warmup_steps:
            return start
        progress = (step - self.warmup_steps) / (self.freeze_step - self.warmup_steps)
        return self.budget + (start - self.budget) * (1 - progress) ** 3

    # ------------------------------------------------------------------ measures

    @torch.no_grad()
    def cost(self) -> float:
        """Adapter parameters at the continuous ranks / parameters of rank 1 everywhere (a size-weighted average rank)."""
        return float((self.sizes * self.ranks.values).sum()) / self.reference_params

    def hard_ranks(self) -> list[int]:
        return self.ranks.hard().tolist()

    def live_params(self) -> int:
        """Adapter parameters that pruning would keep (hard ranks)."""
        return int((self.sizes * self.ranks.hard().float()).sum())

    def budget_params(self) -> int | None:
        return None if self.budget is None else round(self.budget * self.reference_params)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, grad_scale: float = 1.0) -> None:
        """Take the ranks' gradient of this optimizer step and move them; then clear the gradient.

        `reduce` averages a tensor over data-parallel processes (the ranks are replicated, so every
        process must apply the same step); `grad_scale` is the fp16 loss scale the gradient carries.
        """
        values = self.ranks.values
        grad = values.grad if values.grad is not None else torch.zeros_like(values)
        values.grad = None
        if reduce is not None:
            grad = reduce(grad)
        grad = grad.float() / grad_scale
        if not bool(torch.isfinite(grad).all()):
            return  # an fp16 overflow: the optimizer skips this step too
        if not self.frozen:
            if self.step_count >= self.freeze_step:
                self._freeze()
            else:
                self._move(grad)
        self.step_count += 1

    def _move(self, grad: torch.Tensor) -> None:
        self.momentum.mul_(MOMENTUM).add_(grad, alpha=1 - MOMENTUM)
        self.moving_steps += 1
        if self.step_count < self.warmup_steps or self.config.rank_lr == 0:
            return
        if self.start_cost is None:
            self.start_cost = self.cost()
        average = self.momentum / (1 - MOMENTUM**self.moving_steps)
        scale = float(average.pow(2).mean().sqrt())
        task = average / scale if scale > 0 else torch.zeros_like(average)
        if self.budget is not None:
            self.penalty = self._multiplier_for_target(task)
        delta = (-self.config.rank_lr * (task + self.penalty * self.weights)).clamp(-MAX_STEP, MAX_STEP)
        self.ranks.values.add_(delta)
        self.ranks.clamp_()

    def _multiplier_for_target(self, task: torch.Tensor) -> float:
        """The lambda >= 0 whose step moves the cost onto the schedule's next target (ignoring the clamps).

        d cost / d rank_l = w_l / n (w: sizes relative to the mean), so a step
        delta_l = -rank_lr * (task_l + lambda * w_l) changes the cost by -rank_lr / n * (w . task + lambda * w . w)."""
        w = self.weights
        wanted = self.cost() - self.target(self.step_count + 1)  # the decrease the schedule asks for
        return max(0.0, (len(w) * wanted / self.config.rank_lr - float(w @ task)) / float(w @ w))

    @torch.no_grad()
    def _freeze(self) -> None:
        if self.budget is not None:
            self._round_within_budget()
        self.ranks.snap_()
        self.frozen = True
        self.ranks.learning = False  # the forward pass stops computing the ranks' gradient
        if self.config.mode == "budget":
            self.penalty = 0.0

    def _round_within_budget(self) -> None:
        """Rounding to hard ranks can overshoot the budget: switch off, one at a time, the component
        whose rank is least above its switching point (ties: the rank whose task gradient pushes it
        down hardest), until the hard ranks fit. A layer's next component sits one rank further above,
        so when the ranks stopped far above the budget (a run too short for the schedule) every layer
        gives up components in turn, and none is emptied while the others keep theirs."""
        values, hard = self.ranks.values, self.ranks.hard()
        over = float((self.sizes * hard).sum()) - self.budget * self.reference_params
        keep = self.momentum / (self.momentum.abs().max() + 1e-30)  # in [-1, 1]; > 0: the task wants it smaller
        while over > 0 and bool((hard > 0).any()):
            margin = torch.round((values - (hard - 0.5)) * 1000) - keep / 2
            margin = torch.where(hard > 0, margin, torch.full_like(values, float("inf")))
            layer = int(margin.argmin())
            hard[layer] -= 1
            over -= float(self.sizes[layer])
        values.copy_(hard.to(values.dtype))

    def unreachable_budget(self) -> str | None:
        """Why the ranks cannot follow the budget's schedule in this run, or None when they can.

        The cost (a size-weighted average rank) moves by at most MAX_STEP per step, and the cubic
        schedule asks for its steepest fall, 3 * (start - budget) / pruning steps, at the start."""
        if self.budget is None:
            return None
        start, pruning = self.cost(), self.freeze_step - self.warmup_steps
        if start <= self.budget:
            return None
        needed = math.ceil(3 * (start - self.budget) / MAX_STEP)
        if pruning >= needed:
            return None
        return (
            f"rank.budget_*: out of reach: the ranks start at an average of {start:.1f} against a budget of "
            f"{self.budget:.1f}; following the schedule down needs at least {needed} pruning steps, and this run has "
            f"{pruning} (steps between rank.warmup_fraction={self.config.warmup_fraction:g} and "
            f"rank.freeze_fraction={self.config.freeze_fraction:g} of the run). Train longer, widen the pruning phase "
            f"or start adapter.init_rank nearer the budget; at the freeze the ranks are cut to the budget regardless."
        )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "penalty": self.penalty,
            "step_count": self.step_count,
            "momentum": self.momentum.cpu().tolist(),
            "moving_steps": self.moving_steps,
            "start_cost": self.start_cost,
            "frozen": self.frozen,
        }

    def load_state_dict(self, state: dict) -> None:
        self.penalty = float(state["penalty"])
        self.step_count = int(state["step_count"])
        self.momentum = torch.tensor(state["momentum"], dtype=torch.float32, device=self.ranks.device)
        self.moving_steps = int(state["moving_steps"])
        self.start_cost = state["start_cost"]
        self.frozen = bool(state["frozen"])
        self.ranks.learning = not self.frozen
