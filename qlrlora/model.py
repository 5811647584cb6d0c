"""Load a causal LM backbone (NF4 through BitsAndBytesConfig, or bf16) and inject LR-LoRA adapters."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from qlrlora.adapter import LRLoRALinear, Ranks, is_linear
from qlrlora.config import AdapterConfig, ModelConfig
from qlrlora.errors import QLRError
from qlrlora.typed_yaml import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

_ATTENTION = re.compile(r"attn|attention|(^|\.)(q|k|v|o|qkv|query|key|value)(_proj)?$")
_MLP = re.compile(r"mlp|ffn|feed_forward|(^|\.)(gate|up|down|fc\d?|w\d)(_proj)?$")
_LAYER = re.compile(r"\.(\d+)\.")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a recipe names (bfloat16, float16, float32, uint8)."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}[name]


def module_kind(name: str) -> str:
    """attention | mlp | other, read off the module name (Llama, Mistral, Qwen, GPT-style names)."""
    if _ATTENTION.search(name):
        return "attention"
    if _MLP.search(name):
        return "mlp"
    return "other"


def layer_index(name: str) -> int | None:
    """The decoder block a module belongs to: the first integer component of its name."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def load_backbone(config: ModelConfig, device_map=None):
    """The model (quantized to NF4 unless quantize: none, all weights frozen) and its tokenizer."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlrlora.assets import resolve_model

    with PartialState().main_process_first():  # one process downloads, converts or builds; the others read the cache
        path, gguf_file = resolve_model(config)
    dtype = torch_dtype(config.dtype)
    kwargs = {
        "dtype": dtype,
        "revision": config.revision,
        "trust_remote_code": config.trust_remote_code,
        "attn_implementation": _attention_implementation(config.attn_implementation),
        "device_map": device_map if device_map is not None else _default_device_map(),
    }
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if config.quantize == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch_dtype(config.quant_storage),
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=config.revision, trust_remote_code=config.trust_remote_code, gguf_file=gguf_file
        )
    except OSError as e:
        raise QLRError(
            f"model.name_or_path: cannot load {config.name_or_path or path!r}: it is neither a local model "
            f"directory nor reachable on the Hugging Face Hub ({str(e).splitlines()[0]})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _attention_implementation(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _default_device_map():
    """Each process loads its whole copy onto its own device (DDP); quantization happens on the way."""
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return "cpu"


def inject_adapters(model: nn.Module, config: AdapterConfig, where: str = "adapter") -> dict[str, LRLoRALinear]:
    """Freeze the model and wrap every targeted linear layer in an LR-LoRA adapter (`config` as validated by
    the recipe loader)."""
    names = resolve_targets(model, config.targets, where)
    return wrap_modules(model, _resolve_overrides(names, config, where), config)


def wrap_modules(
    model: nn.Module, ranks: dict[str, tuple[int, float]], config: AdapterConfig
) -> dict[str, LRLoRALinear]:
    """Freeze the model and wrap each named linear layer; `ranks` maps a name to (r_max, init_rank).

    The layers share one rank vector (adapter.Ranks), in the order of `ranks`."""
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = torch_dtype(config.dtype)
    bases = {name: model.get_submodule(name) for name in ranks}
    device = next(iter(bases.values())).weight.device
    shared = Ranks([r for r, _ in ranks.values()], [rank for _, rank in ranks.values()], device=device)
    layers = {}
    for index, (name, (r_max, _)) in enumerate(ranks.items()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LRLoRALinear(
            bases[name],
            r_max=r_max,
            alpha=config.alpha,
            dropout=config.dropout,
            dtype=dtype,
            ranks=shared,
            index=index,
        )
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def adapter_layers(model: nn.Module) -> dict[str, LRLoRALinear]:
    """The LR-LoRA layers of a model, by the name of the module they replaced."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LRLoRALinear)}


def resolve_targets(model: nn.Module, targets: str | list[str], where: str = "adapter") -> list[str]:
    wrapped = {f"{name}.base" for name, m in model.named_modules() if isinstance(m, LRLoRALinear)}
    modules = {n: m for n, m in model.named_modules() if n and n not in wrapped and not isinstance(m, LRLoRALinear)}
    block_linears = [n for n, m in modules.items() if is_linear(m) and layer_index(n) is not None]
    if targets == "all-linear":
        found = [n for n in block_linears if not n.endswith("lm_head")]
        if not found:
            raise ConfigError(f"{where}.targets: all-linear found no linear layer inside the model's decoder blocks")
        return found
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in block_linears})
    chosen = []
    for entry in targets:
        if entry.startswith("re:"):
            pattern = _compile(entry[3:], f"{where}.targets")
            matched = [n for n in modules if pattern.fullmatch(n)]
        else:
            matched = [n for n in modules if n == entry or n.endswith("." + entry)]
        if not matched:
            hint = did_you_mean(entry.rsplit(".", 1)[-1], suffixes)
            raise ConfigError(
                f"{where}.targets: {entry!r} matches no module{hint}; linear layers of this model's blocks "
                f"end with: {', '.join(suffixes)}"
            )
        for n in matched:
            if not is_linear(modules[n]):
                raise ConfigError(
                    f"{where}.targets: {entry!r} matches {n} ({type(modules[n]).__name__}); "
                    "expected a linear layer (nn.Linear or bitsandbytes Linear4bit)"
                )
            if n not in chosen:
                chosen.append(n)
    return chosen


def _resolve_overrides(names: list[str], config: AdapterConfig, where: str) -> dict[str, tuple[int, float]]:
    patterns = [(i, _compile(o.pattern, f"{where}.overrides[{i}].pattern"), o) for i, o in enumerate(config.overrides)]
    learned = _learned_ranks(config.ranks_file, where) if config.ranks_file else None
    used = set()
    result = {}
    for name in names:
        r_max, init_rank = config.r_max, config.start_rank(config.r_max)
        for i, pattern, override in patterns:
            if pattern.search(name):
                used.add(i)
                r_max = override.r_max if override.r_max is not None else r_max
                init_rank = config.start_rank(r_max, override)
                break
        if learned is not None:
            if name not in learned:
                raise ConfigError(f"{where}.ranks_file: {config.ranks_file} has no rank for {name}")
            if learned[name] > r_max:
                raise ConfigError(
                    f"{where}.ranks_file: {config.ranks_file} gives {name} rank {learned[name]}, over its r_max {r_max}"
                )
            init_rank = float(learned[name])
        result[name] = (r_max, init_rank)
    for i, _, override in patterns:
        if i not in used:
            raise ConfigError(f"{where}.overrides[{i}].pattern: {override.pattern!r} matches none of the targeted modules")
    return result


def _compile(pattern: str, field: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{field}: {pattern!r} is not a valid regular expression ({e})") from None


def _learned_ranks(path: str, where: str) -> dict[str, int]:
    """module -> hard rank from a ranks.json that a run wrote."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{where}.ranks_file: {path} does not exist (expected the ranks.json of a run)")
    try:
        rows = json.loads(file.read_text())["layers"]
        return {row["module"]: int(row["hard_rank"]) for row in rows}
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{where}.ranks_file: {path}: expected a ranks.json with layers[].module and "
                          f"layers[].hard_rank ({type(e).__name__}: {e})") from None
