"""Rank control: what the ranks cost, how hard that cost is pushed, and how sharp the masks are.

The cost of a layer is the adapter parameters it uses, (in + out) * sum(mask). The total is divided
by the parameters of rank 1 on every target, so the cost reads as a size-weighted average rank and
`lambda` means the same whatever the initial or maximum rank.

- penalty mode: loss += lambda * cost with a fixed lambda;
- budget mode: lambda is a dual variable, lambda <- max(0, lambda + dual_lr * (cost - budget)),
  stepped once per optimizer step, so the ranks end up spending the budget while the optimizer
  decides where. The step is skipped while the ranks are already travelling toward the budget
  (conditional integration): Adam moves a rank by about rank_lr per step however large lambda is,
  so plain dual ascent keeps growing lambda while the ranks travel, then overshoots the budget and
  collapses them (measured on the planted-rank problem, docs/design/rank-control.md).

The temperature of every mask anneals geometrically from `tau_start` to `tau_end`, so the final
masks are near-binary and pruning to the hard rank loses almost nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlrlora.adapter import LRLoRALinear
from qlrlora.config import RankConfig
from qlrlora.model import layer_index, module_kind


@dataclass
class LayerRank:
    """One adapted layer as the rank report shows it."""

    module: str
    kind: str  # attention | mlp | other
    layer: int | None
    r_max: int
    rank: float
    hard_rank: int
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return (self.in_features + self.out_features) * self.hard_rank


class RankController:
    """Called by a trainer: `regularizer()` inside the loss, `step()` after each optimizer step."""

    def __init__(self, layers: dict[str, LRLoRALinear], config: RankConfig, total_steps: int):
        if not layers:
            raise ValueError("RankController needs at least one LR-LoRA layer")
        self.layers = layers
        self.config = config
        self.total_steps = max(1, total_steps)
        self.reference_params = sum(m.in_features + m.out_features for m in layers.values())
        # All layers at once: a few kernels per step instead of a few per layer (hundreds of layers).
        first = next(iter(layers.values())).rank
        self.device = first.device
        self._sizes = torch.tensor([m.in_features + m.out_features for m in layers.values()], device=self.device)
        r_max = torch.tensor([m.r_max for m in layers.values()], device=self.device)
        self._offsets = torch.arange(int(r_max.max()), device=self.device, dtype=torch.float32) + 0.5
        self._exists = self._offsets[None, :] < r_max[:, None]
        self._r_max = r_max.float()
        self._ranks_by_r_max: dict[int, list[torch.Tensor]] = {}
        for m in layers.values():
            self._ranks_by_r_max.setdefault(m.r_max, []).append(m.rank)
        self.budget = self._budget_in_cost_units(config)
        self.penalty = float(config.penalty)
        self.previous_cost: float | None = None
        self.step_count = 0
        self._set_temperature()

    def _budget_in_cost_units(self, config: RankConfig) -> float | None:
        if config.mode != "budget":
            return None
        if config.budget_params is not None:
            return config.budget_params / self.reference_params
        return float(config.budget_avg_rank)

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps = max(1, total_steps)
        self._set_temperature()

    @property
    def temperature(self) -> float:
        c = self.config
        steps = c.anneal_steps or self.total_steps
        progress = min(1.0, self.step_count / steps)
        return c.tau_start * (c.tau_end / c.tau_start) ** progress

    def _set_temperature(self) -> None:
        tau = self.temperature
        for layer in self.layers.values():
            layer.temperature = tau

    def ranks(self) -> torch.Tensor:
        """The rank of every layer, stacked, differentiable."""
        return torch.stack([m.rank.to(self.device).float().reshape(()) for m in self.layers.values()])

    def cost(self) -> torch.Tensor:
        """Soft adapter parameters in use / parameters of rank 1 everywhere; differentiable."""
        masks = torch.sigmoid((self.ranks()[:, None] - self._offsets) / self.temperature) * self._exists
        return (self._sizes * masks.sum(dim=1)).sum() / self.reference_params

    def hard_ranks(self) -> list[int]:
        with torch.no_grad():
            return ((self.ranks()[:, None] >= self._offsets) & self._exists).sum(dim=1).tolist()

    def regularizer(self) -> torch.Tensor:
        """The term added to the loss of one optimizer step."""
        return self.penalty * self.cost()

    @torch.no_grad()
    def step(self) -> None:
        """After an optimizer step: move lambda toward the budget, then sharpen the masks."""
        if self.budget is not None:
            cost = float(self.cost())
            gap = cost - self.budget
            # "Travelling" means at least a tenth of the ranks (size-weighted) moving at Adam's full speed.
            travel = 0.0 if self.previous_cost is None else (self.previous_cost - cost) * math.copysign(1.0, gap)
            moving_toward = travel > self.config.rank_lr / 10
            if not moving_toward:
                self.penalty = max(0.0, self.penalty + self.config.dual_lr * gap)
            self.previous_cost = cost
        for r_max, ranks in self._ranks_by_r_max.items():
            torch._foreach_clamp_min_(ranks, 0.0)
            torch._foreach_clamp_max_(ranks, float(r_max))
        self.step_count += 1
        self._set_temperature()

    def unreachable_budget(self, schedule_sum: float) -> str | None:
        """Why the ranks cannot get down to the budget in this run, or None when they can.

        Adam moves a rank by about `rank_lr` times the schedule's multiplier per step, however large
        lambda grows, so over a run a rank travels at most about `rank_lr * schedule_sum`, where
        `schedule_sum` is the sum of the rank group's learning-rate multipliers over all steps.
        """
        if self.budget is None or schedule_sum <= 0:
            return None
        travel = self.config.rank_lr * schedule_sum
        lowest = self._cost_after_travel(travel)
        if lowest <= self.budget:
            return None
        low, high = travel, float(self._r_max.max())  # travelling r_max reaches any budget
        for _ in range(40):  # bisection: the cost falls monotonically with the travel
            middle = (low + high) / 2
            if self._cost_after_travel(middle) <= self.budget:
                high = middle
            else:
                low = middle
        needed = high / schedule_sum
        return (
            f"rank.budget_*: out of reach: at rank.rank_lr={self.config.rank_lr:g} a rank moves by about "
            f"{travel:.1f} over this run's learning-rate schedule, so the adapters end at an average rank of "
            f"at least {lowest:.1f} against a budget of {self.budget:.1f}. Set rank.rank_lr to at least "
            f"{needed:.3g} (more to reach the budget before the end), or adapter.init_rank nearer the budget."
        )

    @torch.no_grad()
    def _cost_after_travel(self, travel: float) -> float:
        ranks = torch.minimum((self.ranks() - travel).clamp(min=0), self._r_max)
        return float((self._sizes * ranks).sum() / self.reference_params)

    def live_params(self) -> int:
        """Adapter parameters that pruning would keep (hard ranks)."""
        return sum((m.in_features + m.out_features) * r for m, r in zip(self.layers.values(), self.hard_ranks()))

    def budget_params(self) -> int | None:
        return None if self.budget is None else round(self.budget * self.reference_params)

    def report(self) -> list[LayerRank]:
        ranks = self.ranks().detach().tolist()
        return [
            LayerRank(
                module=name,
                kind=module_kind(name),
                layer=layer_index(name),
                r_max=m.r_max,
                rank=rank,
                hard_rank=hard,
                in_features=m.in_features,
                out_features=m.out_features,
            )
            for (name, m), rank, hard in zip(self.layers.items(), ranks, self.hard_ranks())
        ]

    def mean_rank(self, kind: str) -> float | None:
        ranks = [r.rank for r in self.report() if r.kind == kind]
        return sum(ranks) / len(ranks) if ranks else None

    def state_dict(self) -> dict:
        return {"penalty": self.penalty, "previous_cost": self.previous_cost, "step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.penalty = float(state["penalty"])
        self.previous_cost = state["previous_cost"]
        self.step_count = int(state["step_count"])
        self._set_temperature()

