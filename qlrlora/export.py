"""Export a trained LR-LoRA adapter for inference runtimes, and check that the runtime reproduces it.

    qlrlora-export --adapter RUN_OR_CHECKPOINT --out DIR --format peft|portable|gguf [--pad-to N] [--check] [--force]

Every format holds, for each layer, exactly the components its forward pass used (the first
`hard_rank`); layers whose learned rank is 0 get no adapter.

- `peft`: PEFT's LoRA format, written through PEFT's own `LoraConfig`: each module at its own rank
  (`rank_pattern`) with `lora_alpha = scale * rank` (`alpha_pattern`), so PEFT's `alpha / r` is our
  scale `alpha / sqrt(r_max)` and the factors are stored as trained. Loads with
  `PeftModel.from_pretrained` / `AutoPeftModelForCausalLM`.
- `portable`: for runtimes that apply one `r` and one `lora_alpha` to every module (vLLM ignores the
  patterns; llama.cpp's converter reads one alpha): the scale is folded into B, every module is
  zero-padded to one rank (`--pad-to`, default the smallest of vLLM's allowed ranks that holds the
  largest learned rank), and `lora_alpha = r`. The zeros change nothing but the file's size.
- `gguf`: a llama.cpp LoRA adapter, converted by llama.cpp's own `convert_lora_to_gguf.py` (from the
  llama-cpp-python source distribution, fetched once into the cache; qlrlora/llamacpp.py). llama.cpp
  takes each tensor pair's rank from its shape, so no padding is needed.

`--check` loads the base model and the exported adapter the way the target runtime does (PEFT for
`peft` and `portable`, llama.cpp for `gguf`), compares next-token logits on a fixed batch with our
own model carrying the training adapter (both on the unquantized base in float32, so that only the
export is compared), and exits with an error beyond tolerance. The export is written to a temporary
directory and moved into place only once complete and checked; an existing `--out` is replaced only
with `--force`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qlrlora.adapter import LRLoRALinear
from qlrlora.errors import QLRError
from qlrlora.io import atomic_directory

# The LoRA ranks vLLM accepts (`max_lora_rank`); the portable format pads to one of them.
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
FORMATS = ("peft", "portable", "gguf")


@dataclass
class ModuleAdapter:
    """One module's adapter as its forward pass used it: delta_W = scale * B @ A."""

    A: torch.Tensor  # (rank, in_features), fp32
    B: torch.Tensor  # (out_features, rank), fp32
    scale: float
    r_max: int
    learned_rank: float  # the continuous rank, for the report

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def adapters_from_layers(layers: dict[str, LRLoRALinear]) -> dict[str, ModuleAdapter]:
    out = {}
    for name, layer in layers.items():
        r = layer.hard_rank()
        out[name] = ModuleAdapter(
            A=layer.lora_A[:r].detach().float().cpu(), B=layer.lora_B[:, :r].detach().float().cpu(),
            scale=layer.scaling, r_max=layer.r_max, learned_rank=float(layer.rank.detach()),
        )
    return out


def adapters_from_run(directory: str | Path) -> tuple[dict[str, ModuleAdapter], dict]:
    """The adapter of a run or checkpoint directory, read from its file alone (no model needed)."""
    from qlrlora.checkpoint import WEIGHTS_NAME, read_adapter_meta

    directory = Path(directory)
    meta = read_adapter_meta(directory)
    alpha = float(meta["adapter"]["alpha"])
    out = {}
    try:
        with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
            for name, spec in meta["modules"].items():
                rank = float(f.get_tensor(f"{name}.rank"))
                r = sum(1 for i in range(spec["r_max"]) if rank >= i + 0.5)
                out[name] = ModuleAdapter(
                    A=f.get_tensor(f"{name}.lora_A")[:r].float(), B=f.get_tensor(f"{name}.lora_B")[:, :r].float(),
                    scale=alpha / math.sqrt(spec["r_max"]), r_max=spec["r_max"], learned_rank=rank,
                )
    except (SafetensorError, KeyError) as e:
        raise QLRError(f"{directory / WEIGHTS_NAME}: a tensor is missing or unreadable ({e})") from None
    return out, meta


def kept(adapters: dict[str, ModuleAdapter]) -> dict[str, ModuleAdapter]:
    return {name: a for name, a in adapters.items() if a.rank > 0}


# ---------------------------------------------------------------- formats


def write_peft(adapters: dict[str, ModuleAdapter], out: Path, base_model: str | None, dtype=torch.float32) -> None:
    """PEFT's LoRA format with per-module ranks and scales, through PEFT's LoraConfig."""
    from peft import LoraConfig

    modules = kept(_check_nonempty(adapters))
    ranks = {name: a.rank for name, a in modules.items()}
    alphas = {name: a.scale * a.rank for name, a in modules.items()}
    default = max(set(ranks.values()), key=list(ranks.values()).count)
    default_alpha = next(alphas[n] for n in ranks if ranks[n] == default)
    config = LoraConfig(
        r=default, lora_alpha=default_alpha, target_modules=sorted(modules), lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True,
        rank_pattern={n: r for n, r in ranks.items() if r != default},
        alpha_pattern={n: a for n, a in alphas.items() if a != default_alpha},
    )
    config.save_pretrained(str(out))
    tensors = {}
    for name, a in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.A.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = a.B.to(dtype).contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def write_portable(adapters: dict[str, ModuleAdapter], out: Path, base_model: str | None, pad_to: int,
                   dtype=torch.float32) -> None:
    """One rank and one alpha for every module: scale folded into B, factors zero-padded to `pad_to`."""
    from peft import LoraConfig

    modules = kept(_check_nonempty(adapters))
    largest = max(a.rank for a in modules.values())
    if pad_to < largest:
        raise QLRError(f"--pad-to: {pad_to} is below the largest learned rank, {largest}")
    config = LoraConfig(r=pad_to, lora_alpha=pad_to, target_modules=sorted(modules), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True)
    config.save_pretrained(str(out))
    tensors = {}
    for name, a in modules.items():
        A = torch.zeros(pad_to, a.A.shape[1])
        B = torch.zeros(a.B.shape[0], pad_to)
        A[: a.rank], B[:, : a.rank] = a.A, a.B * a.scale
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype).contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def write_gguf(adapters: dict[str, ModuleAdapter], out: Path, base_dir: Path) -> None:
    """A llama.cpp LoRA adapter (adapter.gguf), converted by llama.cpp's own convert_lora_to_gguf.py.

    llama.cpp scales every tensor pair by one global alpha over that pair's own rank, so the PEFT files
    handed to the converter say alpha 1 and carry `scale * rank` folded into B: no padding is needed."""
    import subprocess
    import tempfile

    from peft import LoraConfig

    from qlrlora.llamacpp import converter_environment, converter_script

    modules = kept(_check_nonempty(adapters))
    script = converter_script("convert_lora_to_gguf.py")
    with tempfile.TemporaryDirectory() as tmp:
        ranks = {name: a.rank for name, a in modules.items()}
        default = max(set(ranks.values()), key=list(ranks.values()).count)
        LoraConfig(r=default, lora_alpha=1, target_modules=sorted(modules), lora_dropout=0.0, bias="none",
                   task_type="CAUSAL_LM", base_model_name_or_path=str(base_dir),
                   rank_pattern={n: r for n, r in ranks.items() if r != default}).save_pretrained(tmp)
        tensors = {}
        for name, a in modules.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.A.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = (a.B * (a.scale * a.rank)).contiguous()
        save_file(tensors, str(Path(tmp) / "adapter_model.safetensors"), metadata={"format": "pt"})
        result = subprocess.run(
            [sys.executable, str(script), "--base", str(base_dir), "--outtype", "f32",
             "--outfile", str(out / "adapter.gguf"), tmp], check=False,
            capture_output=True, text=True, env=converter_environment(),
        )
    if result.returncode != 0 or not (out / "adapter.gguf").is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise QLRError(f"--format gguf: llama.cpp's convert_lora_to_gguf.py failed: {last}")


def vllm_rank(largest: int) -> int:
    """The smallest rank vLLM accepts that holds `largest`."""
    for r in VLLM_RANKS:
        if r >= largest:
            return r
    raise QLRError(f"--pad-to: the largest learned rank, {largest}, is above vLLM's largest, {VLLM_RANKS[-1]}")


def export_peft(layers: dict[str, LRLoRALinear], out_dir: str | Path, base_model: str | None = None) -> dict:
    """What training writes at the end (<output.dir>/peft_adapter): the PEFT format in the factors' dtype.
    Returns {module: exported rank} of the modules kept."""
    adapters = adapters_from_layers(layers)
    dtype = next(iter(layers.values())).lora_A.dtype
    atomic_directory(out_dir, lambda tmp: write_peft(adapters, tmp, base_model, dtype))
    return {name: a.rank for name, a in kept(adapters).items()}


def export_run_peft(run_dir: str | Path, out_dir: str | Path, base_model: str | None = None) -> dict:
    """export_peft from the adapter file a run saved (gathered whole even under FSDP), so that one process
    exports while the others are done. Returns {module: exported rank} of the modules kept."""
    from qlrlora.model import torch_dtype

    adapters, meta = adapters_from_run(run_dir)
    dtype = torch_dtype(meta["adapter"]["dtype"])
    atomic_directory(out_dir, lambda tmp: write_peft(adapters, tmp, base_model, dtype))
    return {name: a.rank for name, a in kept(adapters).items()}


def _check_nonempty(adapters: dict[str, ModuleAdapter]) -> dict[str, ModuleAdapter]:
    if not kept(adapters):
        raise QLRError("export: every learned rank is 0, so there is no adapter to export")
    return adapters


# ---------------------------------------------------------------- report


def size_report(adapters: dict[str, ModuleAdapter], pad_to: int | None = None) -> str:
    """Per module the learned and exported rank; in total, the exported parameters against r_max everywhere
    and against the uniform rank that spends the same parameters."""
    rows = [f"{'module':48} {'learned':>8} {'exported':>8} {'params':>10}"]
    total = full = sizes = 0
    for name, a in adapters.items():
        size = a.A.shape[1] + a.B.shape[0]
        exported = a.rank if pad_to is None or a.rank == 0 else pad_to
        rows.append(f"{name:48} {a.learned_rank:8.2f} {exported:8d} {exported * size:10,}")
        total, full, sizes = total + exported * size, full + a.r_max * size, sizes + size
    learned = sum(a.rank * (a.A.shape[1] + a.B.shape[0]) for a in adapters.values())
    rows.append(f"exported adapter parameters: {total:,} ({total / full:.1%} of r_max everywhere, {full:,}); "
                f"the learned ranks hold {learned:,}, as many as uniform rank {learned / sizes:.2f}")
    if pad_to is not None:
        rows.append(f"padding every module to rank {pad_to} for runtimes with one rank costs {total - learned:,} "
                    f"parameters of zeros ({(total - learned) * 4 / 2**20:.1f} MiB in float32)")
    return "\n".join(rows)


# ---------------------------------------------------------------- check


def check_export(run_dir: Path, out: Path, fmt: str, base_dir: Path, tolerance: float) -> dict:
    """Next-token logits of the runtime with the export against our model with the training adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlrlora.checkpoint import load_adapter

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    texts = ["The capital of France is", "Question: Is water wet?\nAnswer:", "1 2 3 4 5 6"]
    ours = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    for layer in load_adapter(run_dir, ours)[0].values():  # the trained values, computed in float32 like the export
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
    ours.eval()
    with torch.no_grad():
        expected = [ours(**tokenizer(t, return_tensors="pt")).logits[0].float() for t in texts]
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        plain = [base(**tokenizer(t, return_tensors="pt")).logits[0].float() for t in texts]
    noise = 0.0
    if fmt == "gguf":
        from qlrlora.llamacpp import gguf_logits

        tokens = [tokenizer(t)["input_ids"] for t in texts]
        got = gguf_logits(base_dir, out / "adapter.gguf", tokens)
        # llama.cpp's own arithmetic differs from PyTorch's even without an adapter: measured on the base alone
        noise = max(float((a - b).abs().max()) for a, b in zip(gguf_logits(base_dir, None, tokens), plain))
        tolerance = max(tolerance, 2 * noise)
    else:
        from peft import PeftModel

        runtime = PeftModel.from_pretrained(base, str(out)).eval()
        with torch.no_grad():
            got = [runtime(**tokenizer(t, return_tensors="pt")).logits[0].float() for t in texts]
    diff = max(float((a - b).abs().max()) for a, b in zip(got, expected))
    effect = max(float((a - b).abs().max()) for a, b in zip(expected, plain))
    kl = max(float(torch.nn.functional.kl_div(torch.log_softmax(a, -1), torch.log_softmax(b, -1), log_target=True,
                                                reduction="batchmean")) for a, b in zip(got, expected))
    result = {"max_abs_logit_diff": diff, "kl": max(kl, 0.0), "adapter_effect": effect, "tolerance": tolerance,
              "runtime_noise": noise}
    if not diff <= tolerance:
        raise QLRError(f"--check: the {fmt} export does not reproduce the trained adapter: logits differ by up to "
                       f"{diff:.3g} (tolerance {tolerance:g}; the adapter itself moves them by up to {effect:.3g})")
    return result


# ---------------------------------------------------------------- command line


def base_model_of(run_dir: Path) -> Path:
    """The local checkpoint of the base model a run trained on (what its recipe's model section resolves to)."""
    from qlrlora.assets import resolve_model
    from qlrlora.config import ModelConfig
    from qlrlora.rundir import RUN_FILE
    from qlrlora.typed_yaml import build_dataclass

    for folder in (run_dir, run_dir.parent):
        record = folder / RUN_FILE
        if record.is_file():
            model = json.loads(record.read_text())["recipe"]["model"]
            path, gguf_file = resolve_model(build_dataclass(ModelConfig, model, "model", str(record)))
            if gguf_file is not None or not Path(path).is_dir():
                raise QLRError(f"export: the base model {path} is not a local checkpoint; download it first")
            return Path(path)
    raise QLRError(f"--adapter: {run_dir} has no {RUN_FILE} (beside it or in its parent); give the run's directory "
                   f"or one of its checkpoints")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlrlora-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="a run's output.dir or one of its checkpoint-N directories")
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", choices=FORMATS, default="peft")
    parser.add_argument("--pad-to", type=int, help="portable: the one rank (default: the smallest vLLM rank that "
                                                   "holds the largest learned rank)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="of the exported tensors (peft, portable)")
    parser.add_argument("--check", action="store_true", help="compare the runtime's logits with the trained model's")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="--check: largest logit difference allowed (gguf: at least twice what llama.cpp differs "
                             "by on the base alone)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        result = run_export(args)
    except QLRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result)
    return 0


def run_export(args) -> str:
    run_dir, out = Path(args.adapter), Path(args.out)
    if out.exists() and not args.force:
        raise QLRError(f"--out: {out} exists; give --force to replace it")
    adapters, _ = adapters_from_run(run_dir)
    _check_nonempty(adapters)
    base_dir = base_model_of(run_dir)
    pad = None
    if args.format == "portable":
        pad = args.pad_to or vllm_rank(max(a.rank for a in adapters.values()))
    dtype = getattr(torch, args.dtype)
    checked = {}

    def fill(tmp: Path) -> None:
        if args.format == "peft":
            write_peft(adapters, tmp, str(base_dir), dtype)
        elif args.format == "portable":
            write_portable(adapters, tmp, str(base_dir), pad, dtype)
        else:
            write_gguf(adapters, tmp, base_dir)
        if args.check:
            checked.update(check_export(run_dir, tmp, args.format, base_dir, args.tolerance))

    atomic_directory(out, fill)
    lines = [size_report(adapters, pad), f"{args.format} adapter: {out.resolve()}"]
    if checked:
        noise = f"; the runtime alone differs by {checked['runtime_noise']:.2e}" if checked["runtime_noise"] else ""
        lines.append(f"check: logits within {checked['max_abs_logit_diff']:.2e} of the trained adapter's "
                     f"(tolerance {checked['tolerance']:.2g}{noise}; KL {checked['kl']:.2e}; the adapter moves them "
                     f"by up to {checked['adapter_effect']:.3g})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
