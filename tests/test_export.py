import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from qlrlora.config import AdapterConfig, ModelConfig
from qlrlora.errors import QLRError
from qlrlora.export import adapters_from_run, check_export, export_peft, main, size_report, vllm_rank
from qlrlora.model import inject_adapters, load_backbone
from tests.conftest import TINY_LLAMA


def fp32_model():
    return load_backbone(ModelConfig(init_config=TINY_LLAMA, quantize="none", dtype="float32"))


def trained():
    model, tokenizer = fp32_model()
    layers = inject_adapters(model, AdapterConfig(r_max=8, init_rank=4, alpha=6.0, dtype="float32", dropout=0.0))
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
    scale = 6.0 / 8**0.5
    for name, rank in exported.items():  # PEFT's alpha / r is our alpha / sqrt(r_max)
        r = config["rank_pattern"].get(name, config["r"])
        alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
        assert r == rank and alpha / r == pytest.approx(scale)

    base, _ = fp32_model()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
    ids = tokenizer(["export is exact", "or it is a bug"], return_tensors="pt", padding=True).to(model.device)
    model.eval(), peft_model.eval()
    with torch.no_grad():
        ours, theirs = model(**ids).logits, peft_model(**ids).logits
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(**ids).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapter changes the outputs, so the match means something
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_all_zero_ranks_is_an_error(tmp_path):
    _model, _, layers = trained()
    with torch.no_grad():
        next(iter(layers.values())).ranks.values.zero_()
    with pytest.raises(QLRError, match="every learned rank is 0"):
        export_peft(layers, tmp_path / "peft")


def export(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_peft_and_portable_exports_pass_their_check_and_agree(tiny_run, tmp_path, capsys):
    code, out, err = export(capsys, "--adapter", tiny_run, "--out", tmp_path / "peft", "--check")
    assert code == 0, err
    assert "check: logits within" in out and "exported adapter parameters" in out
    code, out, err = export(capsys, "--adapter", tiny_run, "--out", tmp_path / "portable", "--format", "portable",
                            "--check")
    assert code == 0, err
    adapters, _ = adapters_from_run(tiny_run)
    largest = max(a.rank for a in adapters.values())
    config = json.loads((tmp_path / "portable" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == vllm_rank(largest) and not config["rank_pattern"]
    assert f"padding every module to rank {config['r']}" in out
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    portable = load_file(str(tmp_path / "portable" / "adapter_model.safetensors"))
    assert peft.keys() == portable.keys()
    for key in peft:  # the same update, padded with zeros
        if key.endswith("lora_B.weight"):
            a_key = key.replace("lora_B", "lora_A")
            module = key[len("base_model.model."):-len(".lora_B.weight")]
            ours = adapters[module]
            torch.testing.assert_close(portable[key] @ portable[a_key], ours.scale * (peft[key] @ peft[a_key]))


def test_a_wrong_export_fails_its_check(tiny_run, tmp_path, capsys):
    from qlrlora.export import base_model_of

    assert export(capsys, "--adapter", tiny_run, "--out", tmp_path / "peft")[0] == 0
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors = {k: v * 1.5 if "lora_B" in k else v for k, v in tensors.items()}
    save_file(tensors, str(weights))
    with pytest.raises(QLRError, match="does not reproduce the trained adapter"):
        check_export(tiny_run, tmp_path / "peft", "peft", base_model_of(tiny_run), 1e-3)


def test_bad_inputs_are_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    code, _, err = export(capsys, "--adapter", tiny_run, "--out", tmp_path / "taken")
    assert code == 2 and err.strip() == f"error: --out: {tmp_path / 'taken'} exists; give --force to replace it"
    code, _, err = export(capsys, "--adapter", tmp_path / "nothing", "--out", tmp_path / "x")
    assert code == 2 and "no LR-LoRA adapter here" in err
    code, _, err = export(capsys, "--adapter", tiny_run, "--out", tmp_path / "y", "--format", "portable", "--pad-to", "1")
    assert code == 2 and "--pad-to: 1 is below the largest learned rank" in err
    assert not (tmp_path / "y").exists()  # nothing half-written
    assert export(capsys, "--adapter", tiny_run, "--out", tmp_path / "taken", "--force")[0] == 0


def test_size_report_counts_against_r_max_and_uniform(tiny_run):
    adapters, _ = adapters_from_run(tiny_run)
    report = size_report(adapters)
    total = sum(a.rank * (a.A.shape[1] + a.B.shape[0]) for a in adapters.values())
    assert f"exported adapter parameters: {total:,}" in report and "as many as uniform rank" in report
