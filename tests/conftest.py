import os

import pytest
import torch

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "vocab_size": 320,
}


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """Every test run gets its own asset cache, so nothing depends on what an earlier run left."""
    os.environ["QLRLORA_CACHE"] = str(tmp_path_factory.mktemp("qlrlora-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
