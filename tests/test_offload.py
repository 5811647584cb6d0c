"""Offloaded gradient checkpointing (qlrlora/offload.py) computes what plain checkpointing computes."""

import pytest
import torch

from qlrlora.config import AdapterConfig, ModelConfig
from qlrlora.model import inject_adapters, load_backbone
from qlrlora.offload import enable_offloaded_checkpoints, offloaded_checkpoint
from tests.conftest import TINY_LLAMA


def loss_and_grads(offload: bool, autocast: bool):
    torch.manual_seed(0)
    model, tokenizer = load_backbone(ModelConfig(init_config=TINY_LLAMA, quantize="none", dtype="float32"),
                                     device_map="cpu")
    layers = inject_adapters(model, AdapterConfig(r_max=8, init_rank=5.3, dropout=0.2, dtype="float32"))
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(std=0.1)
    if offload:
        enable_offloaded_checkpoints(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    ids = tokenizer(["offloaded checkpoints", "keep the block inputs on the host"], return_tensors="pt", padding=True)
    torch.manual_seed(1)  # the dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**ids, labels=ids["input_ids"]).loss
    loss.backward()
    ranks = next(iter(layers.values())).ranks
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, ranks.values.grad.clone(), model


@pytest.mark.parametrize("autocast", [False, True])
def test_offloaded_checkpoints_give_the_loss_and_gradients_of_plain_checkpointing(autocast):
    loss, grads, rank_grad, _ = loss_and_grads(offload=False, autocast=autocast)
    offloaded_loss, offloaded_grads, offloaded_rank_grad, model = loss_and_grads(offload=True, autocast=autocast)
    blocks = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert blocks and all(m._gradient_checkpointing_func is offloaded_checkpoint for m in blocks)
    torch.testing.assert_close(offloaded_loss, loss, rtol=1e-6, atol=0)
    assert grads.keys() == offloaded_grads.keys() and len(grads) == 2 * 7 * TINY_LLAMA["num_hidden_layers"]
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(offloaded_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(offloaded_rank_grad, rank_grad, rtol=1e-4, atol=1e-6)


def test_a_block_input_beside_the_hidden_state_that_needs_a_gradient_is_refused():
    weight = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="only the first input"):
        offloaded_checkpoint(lambda h, w: h * w, torch.randn(3, requires_grad=True), weight)


def test_offload_without_checkpointing_is_a_one_line_error_before_the_model_loads(tmp_path, monkeypatch):
    from qlrlora import sft
    from qlrlora.errors import QLRError
    from tests.test_trainer import tiny_recipe

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("qlrlora.model.load_backbone", no_load)
    recipe = tiny_recipe(tmp_path, model={"offload_checkpoints": True}, train={"gradient_checkpointing": False})
    with pytest.raises(QLRError, match="model.offload_checkpoints: .*set train.gradient_checkpointing: true"):
        sft.build_trainer(recipe)
