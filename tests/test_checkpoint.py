
import pytest
import torch

from qlrlora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter_meta, save_adapter
from qlrlora.config import AdapterConfig, ModelConfig, RankConfig
from qlrlora.errors import QLRError
from qlrlora.model import inject_adapters, load_backbone
from tests.conftest import TINY_LLAMA


def trained_model():
    torch.manual_seed(0)
    model, tokenizer = load_backbone(ModelConfig(init_config=TINY_LLAMA))
    config = AdapterConfig(r_max=8, init_rank=3.5, dropout=0.0)
    layers = inject_adapters(model, config)
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):
            layer.lora_B.normal_()
            layer.ranks.values[layer.index] = 1.25 + 0.5 * i
        layer.ranks.temperature = 0.3
    return model, tokenizer, layers, config


def test_round_trip_gives_identical_outputs_and_ranks(tmp_path):
    model, tokenizer, layers, config = trained_model()
    save_adapter(tmp_path, layers, config, RankConfig(mode="budget", budget_avg_rank=2), {"penalty": 0.5, "step_count": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])

    fresh, _ = load_backbone(ModelConfig(init_config=TINY_LLAMA))
    loaded, meta = load_adapter(tmp_path, fresh)
    assert meta["controller"] == {"penalty": 0.5, "step_count": 7}
    assert meta["rank"]["budget_avg_rank"] == 2
    assert {n: float(m.rank.detach()) for n, m in loaded.items()} == {n: float(m.rank.detach()) for n, m in layers.items()}
    assert all(m.rank.dtype == torch.float32 and m.ranks.temperature == 0.3 for m in loaded.values())
    ids = tokenizer(["a round trip"], return_tensors="pt").to(model.device)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, fresh(**ids).logits)


def test_loading_into_an_injected_model_with_other_targets_fails(tmp_path):
    _model, _, layers, config = trained_model()
    save_adapter(tmp_path, layers, config)
    other, _ = load_backbone(ModelConfig(init_config=TINY_LLAMA))
    inject_adapters(other, AdapterConfig(targets=["q_proj"], r_max=8, init_rank=2))
    with pytest.raises(QLRError, match="the adapter and the model's adapters differ"):
        load_adapter(tmp_path, other)


def test_a_directory_without_adapter_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(QLRError, match="no LR-LoRA adapter here"):
        read_adapter_meta(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not safetensors at all")
    with pytest.raises(QLRError, match="not a readable safetensors file"):
        read_adapter_meta(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / WEIGHTS_NAME))  # a PEFT or other safetensors file
    with pytest.raises(QLRError, match="not an LR-LoRA adapter"):
        read_adapter_meta(tmp_path)


def test_tensors_and_metadata_are_one_file_and_the_json_is_only_a_copy(tmp_path):
    _model, _, layers, config = trained_model()
    save_adapter(tmp_path, layers, config, RankConfig(mode="budget", budget_avg_rank=2), {"step_count": 3})
    (tmp_path / CONFIG_NAME).unlink()  # e.g. a kill between the two writes: the adapter is still whole
    fresh, _ = load_backbone(ModelConfig(init_config=TINY_LLAMA))
    _, meta = load_adapter(tmp_path, fresh)
    assert meta["controller"] == {"step_count": 3}


def test_a_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    _model, _, layers, config = trained_model()
    save_adapter(tmp_path, layers, config)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    with torch.no_grad():
        next(iter(layers.values())).ranks.values.fill_(7.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("qlrlora.checkpoint.save_file", crash)
    with pytest.raises(OSError):
        save_adapter(tmp_path, layers, config)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_cut_factors_are_saved_cut_and_load_into_a_fresh_model(tmp_path):
    model, tokenizer, layers, config = trained_model()
    for layer in layers.values():
        layer.resize_(layer.hard_rank())
    save_adapter(tmp_path, layers, config)
    fresh, _ = load_backbone(ModelConfig(init_config=TINY_LLAMA))
    loaded, _ = load_adapter(tmp_path, fresh)
    assert {n: m.components for n, m in loaded.items()} == {n: m.components for n, m in layers.items()}
    assert len({m.components for m in loaded.values()}) > 1
    ids = tokenizer(["a round trip"], return_tensors="pt").to(model.device)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, fresh(**ids).logits)


def test_a_rank_beyond_the_saved_components_is_refused(tmp_path):
    _model, _, layers, config = trained_model()
    name, layer = list(layers.items())[1]  # rank 1.75: two components switched on
    layer.resize_(1)
    save_adapter(tmp_path, layers, config)
    fresh, _ = load_backbone(ModelConfig(init_config=TINY_LLAMA))
    with pytest.raises(QLRError, match=f"{name}: rank 2 needs more components than the 1 saved"):
        load_adapter(tmp_path, fresh)
