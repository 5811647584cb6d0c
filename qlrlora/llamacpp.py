"""llama.cpp as a runtime for exported adapters: its own converters and, where installed, its inference.

The converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py` and the `gguf-py` they import) come
from the source distribution of llama-cpp-python, which vendors llama.cpp: fetched once with
`pip download` and unpacked into the cache, so the scripts always match the llama.cpp that
llama-cpp-python (`pip install 'qlrlora[llamacpp]'`, built from source) runs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from qlrlora.errors import QLRError
from qlrlora.io import atomic_directory

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
_VENDORED = "vendor/llama.cpp/"
_NEEDED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


def llama_cpp_tools() -> Path:
    """The folder holding llama.cpp's converters and gguf-py, unpacked from the source distribution once."""
    from qlrlora.assets import cache_dir

    target = cache_dir() / "tools" / LLAMA_CPP_PYTHON.replace("==", "-")
    if (target / "convert_lora_to_gguf.py").is_file():
        return target
    downloads = cache_dir() / "downloads" / LLAMA_CPP_PYTHON.replace("==", "-")
    sdists = sorted(downloads.glob("*.tar.gz")) if downloads.is_dir() else []
    if not sdists:
        print(f"fetching {LLAMA_CPP_PYTHON} (source) from the package index for llama.cpp's converters", flush=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                   "-d", str(downloads), LLAMA_CPP_PYTHON]
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        sdists = sorted(downloads.glob("*.tar.gz"))
        if result.returncode != 0 or not sdists:
            detail = (result.stderr.strip().splitlines() or ["nothing downloaded"])[-1]
            raise QLRError(f"cannot fetch {LLAMA_CPP_PYTHON} with pip download: {detail}")

    def unpack(tmp: Path) -> None:
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                _, _, inside = member.name.partition("/")
                if inside.startswith(_VENDORED) and inside[len(_VENDORED):].startswith(_NEEDED) and member.isfile():
                    member.name = inside[len(_VENDORED):]
                    tar.extract(member, tmp, filter="data")

    atomic_directory(target, unpack)
    return target


def converter_script(name: str) -> Path:
    return llama_cpp_tools() / name


def converter_environment() -> dict:
    """The converters import `gguf` from the gguf-py they ship with."""
    gguf_py = str(llama_cpp_tools() / "gguf-py")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [gguf_py, os.environ.get("PYTHONPATH")]))}


def base_gguf(base_dir: Path) -> Path:
    """The base model as an f32 GGUF (llama.cpp's convert_hf_to_gguf.py), cached by the checkpoint's files."""
    from qlrlora.assets import cache_dir

    digest = hashlib.sha256()
    for file in sorted(base_dir.glob("*.safetensors")) + sorted(base_dir.glob("config.json")):
        digest.update(file.name.encode())
        digest.update(str(file.stat().st_size).encode())
    out = cache_dir() / "models" / f"gguf-f32-{digest.hexdigest()[:16]}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    result = subprocess.run(
        [sys.executable, str(converter_script("convert_hf_to_gguf.py")), str(base_dir), "--outtype", "f32",
         "--outfile", str(partial)], check=False, capture_output=True, text=True, env=converter_environment(),
    )
    if result.returncode != 0 or not partial.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise QLRError(f"llama.cpp's convert_hf_to_gguf.py failed on {base_dir}: {last}")
    partial.rename(out)
    return out


def gguf_logits(base_dir: Path, adapter: Path | None, token_lists: list[list[int]],
                every_position: int | None = None) -> list[torch.Tensor]:
    """Logits from llama.cpp running the base GGUF with the LoRA adapter applied: at every position for the
    first `every_position` token lists (all by default), at the last position for the rest."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise QLRError("llama.cpp inference needs llama-cpp-python: pip install 'qlrlora[llamacpp]' "
                       "(it builds from source; on older CPUs with CMAKE_ARGS=\"-DGGML_NATIVE=OFF\")") from None
    model = Llama(model_path=str(base_gguf(base_dir)), lora_path=str(adapter) if adapter else None, n_ctx=512,
                  logits_all=True, verbose=False, n_threads=max(1, min(4, os.cpu_count() or 1)))
    out = []
    for i, tokens in enumerate(token_lists):
        model.reset()
        model.eval(tokens)
        whole = every_position is None or i < every_position
        out.append(torch.tensor(model.scores[: len(tokens)] if whole else model.scores[len(tokens) - 1: len(tokens)],
                                dtype=torch.float32))
    return out
