"""The same properties on a CUDA GPU (skipped without one); the CPU tests carry the evidence on CPU."""

import pytest
import torch

from qlrlora.config import AdapterConfig, ModelConfig
from qlrlora.model import inject_adapters, load_backbone
from tests.conftest import TINY_LLAMA
from tests.test_trainer import tiny_recipe

pytestmark = pytest.mark.gpu


def test_nf4_on_cuda_trains_only_adapters_and_the_ranks_get_fp32_gradients():
    model, tokenizer = load_backbone(ModelConfig(init_config=TINY_LLAMA))
    layers = inject_adapters(model, AdapterConfig(r_max=8, init_rank=4, dropout=0.0))
    ranks = next(iter(layers.values())).ranks
    assert all(layer.lora_A.is_cuda for layer in layers.values()) and ranks.values.is_cuda
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokenizer(["gpu check"], return_tensors="pt").to("cuda")
    for _ in range(3):
        loss = model(**ids, labels=ids["input_ids"]).loss
        optimizer.zero_grad()
        ranks.values.grad = None
        loss.backward()
        optimizer.step()
    assert ranks.values.grad.dtype == torch.float32 and bool((ranks.values.grad != 0).all())
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)


def test_trainer_with_bf16_autocast_and_paged_8bit_adamw_moves_fp32_ranks(tmp_path):
    from qlrlora.sft import build_trainer

    recipe = tiny_recipe(tmp_path, train={"use_cpu": False, "bf16": True, "optim": "paged_adamw_8bit", "max_steps": 20,
                                          "save_strategy": "no"})
    trainer = build_trainer(recipe)
    ranks = trainer.controller.ranks
    start = ranks.values.detach().clone()
    trainer.train()
    assert ranks.values.dtype == torch.float32 and ranks.values.is_cuda
    assert bool((ranks.values.detach() != start).any())
    assert trainer.controller.frozen and trainer.controller.live_params() <= trainer.controller.budget_params()
    assert all(layer.components == layer.hard_rank() for layer in trainer.layers.values())  # cut at the freeze
    assert all(p.dtype == torch.bfloat16 for layer in trainer.layers.values() for p in (layer.lora_A, layer.lora_B))


def test_paged_8bit_adamw_moments_on_cuda_are_cut_paged_when_the_ranks_freeze(tmp_path):
    """Factors of 100,000 values or more get paged 8-bit moments (r_max 64 on rows of 2,048); after the freeze (step
    14 of 20) they are cut to the hard ranks, stay paged where still that large, and the run follows the uncut one."""
    from qlrlora.sft import run
    from qlrlora.trainer import unwrap_optimizer

    model = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 4096, "num_hidden_layers": 2,
             "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 256, "vocab_size": 320}
    runs = {}
    for cut in (True, False):
        recipe = tiny_recipe(tmp_path / str(cut), model={"init_config": model}, adapter={"r_max": 64},
                             rank={"budget_avg_rank": 16, "cut_at_freeze": cut},
                             train={"use_cpu": False, "bf16": True, "optim": "paged_adamw_8bit", "save_strategy": "no"})
        runs[cut] = run(recipe)
    for cut, trainer in runs.items():
        state = unwrap_optimizer(trainer.optimizer).state
        for name, layer in trainer.layers.items():
            assert (layer.components == layer.hard_rank() < 64) if cut else layer.components == 64, name
            for p in (layer.lora_A, layer.lora_B):
                moment = state[p]["state1"]
                assert moment.dtype == torch.uint8 and moment.shape == p.shape, name
                assert getattr(moment, "is_paged", False) == (p.numel() >= 100_000), name
    losses = {cut: [row["loss"] for row in t.state.log_history if "loss" in row] for cut, t in runs.items()}
    assert len(losses[True]) == 20 and losses[True] == pytest.approx(losses[False], abs=2e-2)


def test_dropout_on_cuda_draws_its_mask_again_and_matches_the_reference(monkeypatch):
    """On a GPU the adapter keeps no dropout mask for the backward pass; the gradients are those of x * mask / (1 - p)
    written out with the mask drawn from the same seed."""
    from torch import nn

    from qlrlora import adapter

    torch.manual_seed(0)
    layer = adapter.LRLoRALinear(nn.Linear(64, 32, bias=False).cuda(), r_max=8, alpha=4.0, dtype=torch.float32,
                                 dropout=0.3)
    with torch.no_grad():
        layer.lora_B.normal_()
    monkeypatch.setattr(adapter, "_dropout_seed", lambda: 7)
    x = torch.randn(16, 64, device="cuda", requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = layer(x)
    assert not any(t.dtype == torch.bool for t in kept)
    out.square().sum().backward()
    mask = adapter._kept(x.detach(), 0.3, 7)
    assert mask.is_cuda and 0.5 < float(mask.float().mean()) < 0.9
    x_ref, A, B = (t.detach().clone().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B))
    ref = layer.base(x_ref) + (x_ref * mask / 0.7) @ A.t() @ B.t() * layer.scaling
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for ours, theirs in ((x.grad, x_ref.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad)):
        # cuBLAS sums in another order than the reference's three products: fp32 rounding, 1e-4 of the largest
        # entry (a mask drawn wrong moves a third of the entries by their own size)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))
