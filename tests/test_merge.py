import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlrlora.errors import QLRError
from qlrlora.export import base_model_of
from qlrlora.merge import MERGE_FILE, main, merge


def logits_of(model, tokenizer, text="merging must not change the model"):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits[0].float()


def trained_on_unquantized_base(tiny_run):
    from transformers import AutoTokenizer

    from qlrlora.checkpoint import load_adapter

    base = base_model_of(tiny_run)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    for layer in load_adapter(tiny_run, model)[0].values():
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
    return model.eval(), AutoTokenizer.from_pretrained(str(base))


def test_bf16_merge_equals_base_plus_adapter(tiny_run, tmp_path):
    merge(tiny_run, tmp_path / "bf16", "bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    reference, tokenizer = trained_on_unquantized_base(tiny_run)
    expected, got = logits_of(reference, tokenizer), logits_of(merged, tokenizer)

    plain = logits_of(AutoModelForCausalLM.from_pretrained(str(base_model_of(tiny_run)), dtype=torch.float32), tokenizer)
    # bf16 weights and activations against an fp32 reference: within bf16's noise, far below the adapter's effect
    assert (expected - plain).abs().max() > 0.1
    assert (got - expected).abs().max() < 0.1 * (expected - plain).abs().max()


@pytest.mark.parametrize("method", ["naive", "original"])
def test_nf4_merge_loads_as_4bit_and_reports_its_error(tiny_run, tmp_path, method):
    import bitsandbytes as bnb

    errors = merge(tiny_run, tmp_path / method, "nf4", method)
    assert errors and all(0 <= e < 1 for e in errors.values())
    record = json.loads((tmp_path / method / MERGE_FILE).read_text())
    assert record["method"] == method and record["error_over_update"] == pytest.approx(errors)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / method, dtype=torch.bfloat16)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_bad_merges_are_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["--adapter", str(tiny_run), "--out", str(tmp_path / "taken"), "--dtype", "bfloat16"]) == 2
    assert "exists; give --force" in capsys.readouterr().err
    assert main(["--adapter", str(tmp_path), "--out", str(tmp_path / "o"), "--dtype", "nf4"]) == 2
    assert "no LR-LoRA adapter here" in capsys.readouterr().err
    with pytest.raises(QLRError, match="--method: expected one of"):
        merge(tiny_run, tmp_path / "x", "nf4", "magic")
