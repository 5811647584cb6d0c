"""Export a trained LR-LoRA adapter in PEFT's LoRA format, pruned to the learned ranks.

Each layer keeps its first `hard_rank` components, exactly those its forward pass used;
`alpha / sqrt(r_max)` is folded into B, and each layer's lora_alpha equals its rank so PEFT's
scaling (alpha / r) is 1. Layers whose learned rank is 0 get no adapter. The result loads with `peft.PeftModel.from_pretrained` and in
servers that read PEFT adapters (vLLM, llama.cpp's converter). Training writes one into
<output.dir>/peft_adapter at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from qlrlora.adapter import LRLoRALinear
from qlrlora.errors import QLRError
from qlrlora.io import atomic_directory


def export_peft(layers: dict[str, LRLoRALinear], out_dir: str | Path, base_model: str | None = None) -> dict:
    """Write adapter_config.json + adapter_model.safetensors; returns {module: exported rank} (rank > 0 only)."""
    tensors, ranks = {}, {}
    for name, layer in layers.items():
        pruned = layer.pruned()
        r = pruned.A.shape[0]
        if r == 0:
            continue
        ranks[name] = r
        dtype = layer.lora_A.dtype
        tensors[f"base_model.model.{name}.lora_A.weight"] = pruned.A.to(dtype).contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = pruned.B.to(dtype).contiguous().cpu()
    if not ranks:
        raise QLRError("export: every learned rank is 0, so there is no adapter to export")
    default = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": sorted(ranks),
        "r": default,
        "lora_alpha": default,
        "rank_pattern": {name: r for name, r in ranks.items() if r != default},
        "alpha_pattern": {name: r for name, r in ranks.items() if r != default},
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    atomic_directory(out_dir, fill)
    return ranks

