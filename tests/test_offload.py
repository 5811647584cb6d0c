"""Offloaded and partial gradient checkpointing (qlrlora/offload.py) compute what plain checkpointing computes."""

import pytest
import torch

from qlrlora.config import AdapterConfig, ModelConfig
from qlrlora.model import inject_adapters, load_backbone
from qlrlora.offload import checkpoint_first_blocks, enable_offloaded_checkpoints, offloaded_checkpoint
from tests.conftest import TINY_LLAMA


def loss_and_grads(offload: bool, autocast: bool, checkpointed_blocks: int | None = None, calls: list | None = None):
    """One forward and backward pass of a tiny model with checkpointing; `calls` collects the index of each block
    whose MLP starts, in the forward pass and in each recomputation."""
    torch.manual_seed(0)
    model, tokenizer = load_backbone(ModelConfig(init_config=TINY_LLAMA, quantize="none", dtype="float32"),
                                     device_map="cpu")
    layers = inject_adapters(model, AdapterConfig(r_max=8, init_rank=5.3, dropout=0.2, dtype="float32"))
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(std=0.1)
    if offload:
        enable_offloaded_checkpoints(model)
    if checkpointed_blocks is not None:
        checkpoint_first_blocks(model, checkpointed_blocks)
    if calls is not None:
        for i, block in enumerate(model.model.layers):
            block.mlp.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
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
    blocks = [m for m in model.model.layers if m.gradient_checkpointing]
    assert len(blocks) == TINY_LLAMA["num_hidden_layers"] and all(m._gradient_checkpointing_func is offloaded_checkpoint for m in blocks)
    torch.testing.assert_close(offloaded_loss, loss, rtol=1e-6, atol=0)
    assert grads.keys() == offloaded_grads.keys() and len(grads) == 2 * 7 * TINY_LLAMA["num_hidden_layers"]
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(offloaded_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(offloaded_rank_grad, rank_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointing_the_first_block_only_recomputes_that_block_and_changes_no_number(offload):
    every = []
    loss, grads, rank_grad, _ = loss_and_grads(offload=False, autocast=False, calls=every)
    assert sorted(every) == [0, 0, 1, 1]  # plain checkpointing runs every block again in the backward pass
    calls = []
    partial_loss, partial_grads, partial_rank_grad, model = loss_and_grads(offload, autocast=False,
                                                                          checkpointed_blocks=1, calls=calls)
    assert [m.gradient_checkpointing for m in model.model.layers] == [True, False]
    assert sorted(calls) == [0, 0, 1]  # the first block ran again in the backward pass, the second did not
    torch.testing.assert_close(partial_loss, loss, rtol=1e-6, atol=0)
    assert partial_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(partial_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(partial_rank_grad, rank_grad, rtol=1e-4, atol=1e-6)


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


def test_checkpoint_layers_without_checkpointing_or_below_zero_is_a_one_line_error(tmp_path):
    from qlrlora import sft
    from qlrlora.errors import QLRError
    from qlrlora.typed_yaml import ConfigError
    from tests.test_trainer import tiny_recipe

    recipe = tiny_recipe(tmp_path, model={"checkpoint_layers": 4}, train={"gradient_checkpointing": False})
    with pytest.raises(QLRError, match="model.checkpoint_layers: .*set train.gradient_checkpointing: true"):
        sft.build_trainer(recipe)
    with pytest.raises(ConfigError, match="model.checkpoint_layers: expected a number of decoder blocks >= 0, got -1"):
        tiny_recipe(tmp_path, model={"checkpoint_layers": -1})
