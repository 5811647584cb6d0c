import os
from pathlib import Path

import pytest
import torch

from qlrlora.throughput import TINY

# The tiny Llama of the benchmark tool's CPU runs, with a shorter position range.
TINY_LLAMA = {**TINY, "max_position_embeddings": 256}


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """Every test run gets its own asset cache, so nothing depends on what an earlier run left."""
    os.environ["QLRLORA_CACHE"] = str(tmp_path_factory.mktemp("qlrlora-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The output directory of recipes/tiny_cpu.yaml run through the CLI once (for export and merge tests)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    result = subprocess.run([sys.executable, "-m", "qlrlora.sft", str(root / "recipes" / "tiny_cpu.yaml"),
                             f"--output.dir={out}", "--train.report_to=none"], check=False,
                            capture_output=True, text=True, cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_wheel(folder, name: str, version: str, files: dict) -> Path:
    """A minimal wheel with a RECORD of sha256 hashes, as pip download would fetch it."""
    import base64
    import hashlib
    import zipfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    entries = {**files, f"{dist}.dist-info/METADATA": metadata,
               f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in entries.items():
            zf.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{member},sha256={digest},{len(data)}")
        record.append(f"{dist}.dist-info/RECORD,,")
        zf.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip download reads wheels from this folder only (PIP_NO_INDEX / PIP_FIND_LINKS), like an offline index."""
    folder = tmp_path / "index"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("QLRLORA_CACHE", str(tmp_path / "cache"))
    return folder
