"""The training state of an LR-LoRA adapter on disk: one safetensors file, and a JSON copy to read.

    lrlora_adapter.safetensors   <module>.lora_A, <module>.lora_B (adapter dtype; r_max components, or
                                 the hard rank's once the trainer cut them at the freeze), <module>.rank (fp32),
                                 and in its header the metadata: adapter and rank settings, per-module
                                 shapes, temperature, controller state
    lrlora_adapter.json          the same metadata, for people and tools; never read back

Tensors and metadata are one file written atomically, so they cannot disagree after a kill. This is
what resume and export read; the PEFT format for inference servers is export's job.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qlrlora.adapter import LRLoRALinear
from qlrlora.config import AdapterConfig, RankConfig
from qlrlora.distributed import copy_full, full_tensor
from qlrlora.errors import QLRError
from qlrlora.io import atomic_write, atomic_write_json
from qlrlora.model import adapter_layers, wrap_modules
from qlrlora.typed_yaml import build_dataclass

WEIGHTS_NAME = "lrlora_adapter.safetensors"
CONFIG_NAME = "lrlora_adapter.json"
FORMAT = "qlrlora.lrlora-adapter"
VERSION = 1
HEADER_KEY = "qlrlora"


def adapter_tensors(layers: dict[str, LRLoRALinear]) -> dict[str, torch.Tensor]:
    """Factors and ranks on the CPU, whole: under FSDP a collective that every process must call."""
    tensors = {}
    with torch.no_grad():
        for name, layer in layers.items():
            tensors[f"{name}.lora_A"] = full_tensor(layer.lora_A.detach()).contiguous().cpu()
            tensors[f"{name}.lora_B"] = full_tensor(layer.lora_B.detach()).contiguous().cpu()
            tensors[f"{name}.rank"] = layer.rank.detach().float().reshape(()).cpu()
    return tensors


def save_adapter(
    directory: str | Path,
    layers: dict[str, LRLoRALinear],
    adapter_config: AdapterConfig,
    rank_config: RankConfig | None = None,
    controller_state: dict | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """`tensors`: what `adapter_tensors(layers)` returned, when every process had to gather them first."""
    directory = Path(directory)
    tensors = adapter_tensors(layers) if tensors is None else tensors
    modules = {name: {"r_max": layer.r_max, "in_features": layer.in_features, "out_features": layer.out_features}
               for name, layer in layers.items()}
    temperature = next(iter(layers.values())).ranks.temperature
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "adapter": dataclasses.asdict(adapter_config),
        "rank": dataclasses.asdict(rank_config) if rank_config else None,
        "temperature": temperature,
        "controller": controller_state,
        "modules": modules,
    }
    header = {"format": "pt", HEADER_KEY: json.dumps(meta)}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    atomic_write_json(directory / CONFIG_NAME, meta)


def read_adapter_meta(directory: str | Path) -> dict:
    """The metadata in the header of the adapter's safetensors file."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise QLRError(f"{directory}: no LR-LoRA adapter here (expected {WEIGHTS_NAME})")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise QLRError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        meta = json.loads(header[HEADER_KEY])
    except (KeyError, ValueError):
        raise QLRError(f"{path}: not an LR-LoRA adapter (its header has no {HEADER_KEY!r} metadata)") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise QLRError(f"{path}: not an LR-LoRA adapter of format {FORMAT} v{VERSION}")
    return meta


def load_adapter(directory: str | Path, model: nn.Module) -> tuple[dict[str, LRLoRALinear], dict]:
    """Load factors and ranks into `model`, injecting the adapters first if it has none.

    Returns the layers and the JSON metadata (adapter / rank settings, controller state)."""
    directory = Path(directory)
    meta = read_adapter_meta(directory)
    layers = adapter_layers(model)
    if not layers:
        adapter_config = build_dataclass(AdapterConfig, meta["adapter"], "adapter", str(directory / WEIGHTS_NAME))
        ranks = {name: (spec["r_max"], 0.0) for name, spec in meta["modules"].items()}
        missing = [name for name in ranks if not _has_module(model, name)]
        if missing:
            raise QLRError(f"{directory}: the adapter targets modules this model lacks: {', '.join(missing[:5])}")
        layers = wrap_modules(model, ranks, adapter_config)
    if set(layers) != set(meta["modules"]):
        extra = sorted(set(meta["modules"]) ^ set(layers))
        raise QLRError(f"{directory}: the adapter and the model's adapters differ at {', '.join(extra[:5])}")
    tensors = load_file(str(directory / WEIGHTS_NAME))
    with torch.no_grad():
        for name, layer in layers.items():
            saved_A = tensors.get(f"{name}.lora_A")
            if saved_A is not None and saved_A.dim() == 2 and layer.components != saved_A.shape[0] <= layer.r_max:
                layer.resize_(saved_A.shape[0])  # factors cut at the freeze are saved cut
            for field in ("lora_A", "lora_B", "rank"):
                saved = tensors.get(f"{name}.{field}")
                target = getattr(layer, field)
                if saved is None or saved.shape != target.shape:
                    got = "nothing" if saved is None else tuple(saved.shape)
                    raise QLRError(f"{directory}: {name}.{field}: expected shape {tuple(target.shape)}, found {got}")
                if field == "rank":
                    layer.ranks.values[layer.index] = saved.float()
                else:
                    copy_full(target, saved)  # under FSDP2 each process keeps its shard
            layer.ranks.temperature = meta["temperature"]
        for name, layer in layers.items():
            if layer.hard_rank() > layer.components:
                raise QLRError(f"{directory}: {name}: rank {layer.hard_rank()} needs more components than the "
                               f"{layer.components} saved")
    return layers, meta


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
