import json

import pytest
import torch
from peft import PeftModel

from qlrlora.config import AdapterConfig, ModelConfig
from qlrlora.errors import QLRError
from qlrlora.export import export_peft
from qlrlora.model import inject_adapters, load_backbone
from tests.conftest import TINY_LLAMA


def fp32_model():
    return load_backbone(ModelConfig(init_config=TINY_LLAMA, quantize="none", dtype="float32"))


def trained():
    model, tokenizer = fp32_model()
    layers = inject_adapters(model, AdapterConfig(r_max=8, init_rank=4, dtype="float32", dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):
            layer.lora_B.normal_(std=0.3)
            layer.ranks.values[layer.index] = [0.2, 2.0, 3.0, 5.0, 6.0, 7.7, 8.0][i % 7]
    return model, tokenizer, layers


def test_exported_adapter_reproduces_the_trained_model(tmp_path):
    """Invariant 4: PEFT's loader on the export gives the trained model's outputs."""
    model, tokenizer, layers = trained()
    exported = export_peft(layers, tmp_path / "peft", base_model="tiny")
    assert exported == {n: m.hard_rank() for n, m in layers.items() if m.hard_rank()}
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    zero = [n for n, m in layers.items() if m.hard_rank() == 0]
    assert zero and not set(zero) & set(config["target_modules"])  # rank-0 layers get no adapter
    ranks = {n: m.hard_rank() for n, m in layers.items() if m.hard_rank()}
    assert {n: config["rank_pattern"].get(n, config["r"]) for n in config["target_modules"]} == ranks
    assert config["alpha_pattern"] == config["rank_pattern"] and config["lora_alpha"] == config["r"]

    base, _ = fp32_model()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
    ids = tokenizer(["export is exact", "or it is a bug"], return_tensors="pt", padding=True).to(model.device)
    model.eval(), peft_model.eval()
    with torch.no_grad():
        ours, theirs = model(**ids).logits, peft_model(**ids).logits
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(**ids).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapter changes the outputs, so the match means something
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_all_zero_ranks_is_an_error(tmp_path):
    model, _, layers = trained()
    with torch.no_grad():
        next(iter(layers.values())).ranks.values.zero_()
    with pytest.raises(QLRError, match="every learned rank is 0"):
        export_peft(layers, tmp_path / "peft")
