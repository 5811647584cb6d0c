"""Planted-rank recovery: the benchmark for rank control (LR-LORA.md, invariant 2).

Independent square regression layers; layer l must learn W0_l + U_l V_l with rank(U_l V_l) = planted[l].
A good rank controller ends with hard ranks ordered like `planted` and close to it. Runs on a CPU in
seconds; tools/planted_ranks.py runs it from the command line and tests/test_regularizer.py pins it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qlrlora.adapter import LRLoRALinear
from qlrlora.config import RankConfig
from qlrlora.regularizer import RankController


@dataclass
class PlantedResult:
    hard_ranks: list[int]
    ranks: list[float]
    live_params: int
    budget_params: int | None
    penalty: float
    final_loss: float


def run_planted(
    planted: tuple[int, ...] = (2, 12, 6, 0),
    rank: RankConfig | None = None,
    init_rank: float = 8,
    r_max: int = 32,
    dim: int = 64,
    steps: int = 1500,
    lr: float = 5e-3,
    batch: int = 128,
    seed: int = 0,
) -> PlantedResult:
    rank = rank or RankConfig(mode="penalty", penalty=0.03, rank_lr=5e-2)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers, targets = {}, []
    for i, r in enumerate(planted):
        base = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.randn(dim, dim, generator=g) / dim**0.5)
        update = torch.randn(dim, r, generator=g) @ torch.randn(r, dim, generator=g) / (dim**0.5 * max(r, 1) ** 0.25)
        # alpha = sqrt(r_max) makes the scaling 1, so factor sizes mean the same for every r_max.
        layers[f"layers.{i}.mlp.proj"] = LRLoRALinear(
            base, r_max=r_max, init_rank=init_rank, alpha=r_max**0.5, dtype=torch.float32
        )
        targets.append(base.weight.detach() + update)
    controller = RankController(layers, rank, total_steps=steps)
    factors = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    ranks = [layer.rank for layer in layers.values()]
    optimizer = torch.optim.Adam([{"params": factors, "lr": lr}, {"params": ranks, "lr": rank.rank_lr}])
    for _ in range(steps):
        x = torch.randn(batch, dim, generator=g)
        loss = sum(((layer(x) - x @ W.t()) ** 2).mean() for layer, W in zip(layers.values(), targets))
        optimizer.zero_grad()
        (loss + controller.regularizer()).backward()
        optimizer.step()
        controller.step()
    return PlantedResult(
        hard_ranks=[layer.hard_rank() for layer in layers.values()],
        ranks=[round(float(layer.rank.detach()), 2) for layer in layers.values()],
        live_params=controller.live_params(),
        budget_params=controller.budget_params(),
        penalty=controller.penalty,
        final_loss=float(loss.detach()),
    )
