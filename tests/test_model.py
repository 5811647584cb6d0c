import pytest
import torch

from qlrlora.config import AdapterConfig, ConfigError, ModelConfig, RankOverride
from qlrlora.model import adapter_layers, inject_adapters, layer_index, load_backbone, module_kind
from tests.conftest import TINY_LLAMA

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(quantize="nf4"):
    return load_backbone(ModelConfig(init_config=TINY_LLAMA, quantize=quantize))


def batch(tokenizer, device, n=2):
    enc = tokenizer(["the quick brown fox", "jumps over the lazy dog"][:n], return_tensors="pt", padding=True).to(device)
    return {**enc, "labels": enc["input_ids"].clone()}


def frozen_bytes(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_all_linear_injection_trains_only_adapters(quantize):
    import bitsandbytes as bnb

    model, tokenizer = tiny(quantize)
    layers = inject_adapters(model, AdapterConfig(r_max=8, init_rank=4, dropout=0.0))
    expected = {f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for i in range(2) for p in PROJECTIONS}
    assert set(layers) == expected
    assert "lm_head" not in " ".join(layers)
    base_type = bnb.nn.Linear4bit if quantize == "nf4" else torch.nn.Linear
    assert all(isinstance(layer.base, base_type) for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in layers for p in ("lora_A", "lora_B")}
    ranks = next(iter(layers.values())).ranks
    assert all(layer.ranks is ranks for layer in layers.values()) and len(ranks) == len(layers)
    assert sorted(layer.index for layer in layers.values()) == list(range(len(layers)))
    for layer in layers.values():
        assert layer.rank.dtype == torch.float32 and layer.lora_A.dtype == torch.bfloat16

    model.train()
    before_frozen = frozen_bytes(model)
    factors = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    optimizer = torch.optim.AdamW(factors, lr=1e-2)
    inputs = batch(tokenizer, model.device)
    for _ in range(3):
        loss = model(**inputs).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        ranks.values.grad = None
        loss.backward()
        optimizer.step()
    # every rank gets a task gradient through the forward pass (B is no longer zero after the first step)
    assert ranks.values.grad.dtype == torch.float32 and bool((ranks.values.grad != 0).all())
    after_frozen = frozen_bytes(model)
    assert before_frozen.keys() == after_frozen.keys()
    assert all(torch.equal(before_frozen[n], after_frozen[n]) for n in before_frozen)


def test_named_regex_targets_and_overrides():
    model, _ = tiny()
    config = AdapterConfig(
        targets=["q_proj", "self_attn.v_proj", r"re:model\.layers\.1\.mlp\.down_proj"],
        r_max=8,
        init_rank=6,
        overrides=[RankOverride(pattern=r"mlp\.", r_max=4)],
    )
    layers = inject_adapters(model, config)
    assert sorted(layers) == sorted(
        [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")] + ["model.layers.1.mlp.down_proj"]
    )
    down = layers["model.layers.1.mlp.down_proj"]
    assert down.r_max == 4 and float(down.rank.detach()) == 4.0  # init_rank clipped to the override's r_max
    assert float(layers["model.layers.0.self_attn.q_proj"].rank.detach()) == 6.0
    assert layers["model.layers.0.self_attn.q_proj"].r_max == 8
    assert adapter_layers(model).keys() == layers.keys()


def test_unknown_target_names_the_field_and_suggests():
    model, _ = tiny()
    with pytest.raises(ConfigError, match=r"adapter\.targets: 'qproj' matches no module \(did you mean 'q_proj'\?\)"):
        inject_adapters(model, AdapterConfig(targets=["qproj"]))


def test_non_linear_target_is_rejected():
    model, _ = tiny()
    with pytest.raises(ConfigError, match=r"adapter\.targets: 'embed_tokens' matches model\.embed_tokens \(Embedding\); expected a linear layer"):
        inject_adapters(model, AdapterConfig(targets=["embed_tokens"]))


def test_override_matching_nothing_is_rejected():
    model, _ = tiny()
    with pytest.raises(ConfigError, match=r"adapter\.overrides\[0\]\.pattern: 'ffn' matches none"):
        inject_adapters(model, AdapterConfig(overrides=[RankOverride(pattern="ffn", r_max=4)]))


def test_names_map_to_kind_and_layer():
    assert module_kind("model.layers.3.self_attn.k_proj") == "attention"
    assert module_kind("model.layers.3.mlp.gate_proj") == "mlp"
    assert module_kind("transformer.h.2.attn.c_attn") == "attention"
    assert layer_index("model.layers.17.mlp.up_proj") == 17
    assert layer_index("lm_head") is None


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="model.name_or_path: .*does not exist"):
        load_backbone(ModelConfig(name_or_path=str(tmp_path / "no-such-model")))
