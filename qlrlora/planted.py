"""Planted-rank recovery: the benchmarks for rank control.

Two problems whose right answer is known, both on a CPU in seconds:

- `run_planted`: independent square regression layers; layer l must learn W0_l + U_l V_l with
  rank(U_l V_l) = planted[l];
- `run_planted_network`: a small Llama (random weights, built from a config) whose teacher differs
  from the frozen base by low-rank updates of different ranks in a few projections of different
  kinds and depths; the student, LR-LoRA on every linear layer from a uniform start, learns the
  teacher's logits on random tokens under a budget equal to the planted parameters.

A good rank controller ends with hard ranks ordered like the planted ones, close to them, and zero
where nothing was planted. tools/planted_ranks.py runs both from the command line; the tests pin them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qlrlora.adapter import LRLoRALinear, Ranks
from qlrlora.config import AdapterConfig, RankConfig
from qlrlora.regularizer import RankController

# Projections of a 4-block Llama and the rank of the update planted in each; every other projection gets none.
NETWORK_PLANTED = {
    "model.layers.0.mlp.up_proj": 8,
    "model.layers.1.self_attn.v_proj": 2,
    "model.layers.2.mlp.down_proj": 6,
    "model.layers.3.self_attn.o_proj": 4,
}
NETWORK_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
}


@dataclass
class PlantedResult:
    hard_ranks: dict[str, int]
    ranks: dict[str, float]
    live_params: int
    budget_params: int | None
    penalty: float
    final_loss: float


def run_planted(
    planted: tuple[int, ...] = (2, 12, 6, 0),
    rank: RankConfig | None = None,
    init_rank: float = 32,
    r_max: int = 32,
    dim: int = 64,
    steps: int = 1500,
    lr: float = 5e-3,
    batch: int = 128,
    seed: int = 0,
) -> PlantedResult:
    rank = rank or RankConfig(mode="budget", budget_avg_rank=sum(planted) / len(planted))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    shared = Ranks([r_max] * len(planted), [init_rank] * len(planted))
    layers, targets = {}, []
    for i, r in enumerate(planted):
        base = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.randn(dim, dim, generator=g) / dim**0.5)
        update = torch.randn(dim, r, generator=g) @ torch.randn(r, dim, generator=g) / (dim**0.5 * max(r, 1) ** 0.25)
        # alpha = sqrt(r_max) makes the scaling 1, so factor sizes mean the same for every r_max.
        layers[f"layers.{i}.mlp.proj"] = LRLoRALinear(
            base, r_max=r_max, alpha=r_max**0.5, dtype=torch.float32, ranks=shared, index=i
        )
        targets.append(base.weight.detach() + update)

    def loss_of_batch():
        x = torch.randn(batch, dim, generator=g)
        return sum(((layer(x) - x @ W.t()) ** 2).mean() for layer, W in zip(layers.values(), targets))

    return _train(layers, rank, steps, lr, loss_of_batch)


def run_planted_network(
    planted: dict[str, int] | None = None,
    rank: RankConfig | None = None,
    r_max: int = 16,
    steps: int = 800,
    lr: float = 5e-3,
    batch: int = 32,
    length: int = 16,
    seed: int = 0,
    order_components: bool = False,
) -> PlantedResult:
    """Without `rank`: a budget of the planted parameters, (in + out) * rank summed over the planted
    projections, with `order_components` (`rank.order_components`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlrlora.model import inject_adapters

    planted = NETWORK_PLANTED if planted is None else planted
    config = LlamaConfig(**NETWORK_CONFIG)
    torch.manual_seed(seed)
    student = LlamaForCausalLM(config)
    teacher = LlamaForCausalLM(config)
    teacher.load_state_dict(student.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, r in planted.items():
            weight = teacher.get_submodule(name).weight
            update = torch.randn(weight.shape[0], r, generator=g) @ torch.randn(r, weight.shape[1], generator=g)
            # The update's size grows with its rank (sqrt(r / 4) of the weight's norm), so every planted
            # component matters about as much whatever the rank it belongs to.
            weight.add_(update * (weight.norm() / update.norm() * math.sqrt(r / 4)))
    teacher.eval()
    layers = inject_adapters(student, AdapterConfig(r_max=r_max, alpha=r_max**0.5, dropout=0.0, dtype="float32"))
    if rank is None:
        sizes = {name: layer.in_features + layer.out_features for name, layer in layers.items()}
        budget = sum(sizes[name] * r for name, r in planted.items())
        rank = RankConfig(mode="budget", budget_params=budget, order_components=order_components)

    def loss_of_batch():
        ids = torch.randint(0, config.vocab_size, (batch, length), generator=g)
        with torch.no_grad():
            target = teacher(ids).logits
        return ((student(ids).logits - target) ** 2).mean()

    return _train(layers, rank, steps, lr, loss_of_batch)


def _train(layers: dict[str, LRLoRALinear], rank: RankConfig, steps: int, lr: float, loss_of_batch) -> PlantedResult:
    controller = RankController(layers, rank, total_steps=steps)
    optimizer = torch.optim.Adam([p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)], lr=lr)
    for _ in range(steps):
        loss = loss_of_batch()
        optimizer.zero_grad()
        loss.backward()
        controller.step()
        optimizer.step()
        if rank.order_components and controller.phase == "pruning":
            hard_ranks = controller.hard_ranks()
            for layer in layers.values():
                layer.order_components_(hard_ranks[layer.index], optimizer.state)
    return PlantedResult(
        hard_ranks={name: layer.hard_rank() for name, layer in layers.items()},
        ranks={name: round(float(layer.rank.detach()), 2) for name, layer in layers.items()},
        live_params=controller.live_params(),
        budget_params=controller.budget_params(),
        penalty=controller.penalty,
        final_loss=float(loss.detach()),
    )
