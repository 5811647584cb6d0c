"""The same properties on a CUDA GPU (skipped without one); the CPU tests carry the evidence on CPU."""

import pytest
import torch

from qlrlora.config import AdapterConfig, ModelConfig
from qlrlora.model import inject_adapters, load_backbone
from tests.conftest import TINY_LLAMA
from tests.test_trainer import RankGrads, tiny_recipe

pytestmark = pytest.mark.gpu


def test_nf4_on_cuda_trains_only_adapters_and_keeps_ranks_fp32():
    model, tokenizer = load_backbone(ModelConfig(init_config=TINY_LLAMA))
    layers = inject_adapters(model, AdapterConfig(r_max=8, init_rank=4, dropout=0.0))
    assert all(layer.lora_A.is_cuda and layer.rank.is_cuda for layer in layers.values())
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokenizer(["gpu check"], return_tensors="pt").to("cuda")
    before = [float(layer.rank.detach()) for layer in layers.values()]
    for _ in range(3):
        loss = model(**ids, labels=ids["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(layer.rank.dtype == torch.float32 for layer in layers.values())
    assert all(float(layer.rank.detach()) != b for layer, b in zip(layers.values(), before))  # every rank moved
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)


def test_trainer_with_bf16_autocast_and_paged_8bit_adamw(tmp_path):
    from qlrlora.sft import build_trainer

    recipe = tiny_recipe(tmp_path, train={"use_cpu": False, "bf16": True, "optim": "paged_adamw_8bit", "max_steps": 8,
                                          "save_strategy": "no"})
    trainer = build_trainer(recipe)
    probe = RankGrads(trainer)
    trainer.add_callback(probe)
    start = [float(layer.rank.detach()) for layer in trainer.layers.values()]
    trainer.train()
    assert len(probe.grads) == 8 and all(g.dtype == torch.float32 for g in probe.grads)
    assert all(layer.rank.dtype == torch.float32 for layer in trainer.layers.values())
    assert any(abs(float(layer.rank.detach()) - s) > 0.05 for layer, s in zip(trainer.layers.values(), start))
    assert {g["lr"] for g in trainer.optimizer.param_groups} >= {recipe.rank.rank_lr}
