"""Merge a trained LR-LoRA adapter into its base model: a bf16 checkpoint, or an NF4 one.

    qlrlora-merge --adapter RUN_OR_CHECKPOINT --out DIR --dtype bfloat16|nf4 [--method ...] [--force]

`bfloat16`: every adapted weight becomes `W + scale * B @ A`, saved as a standard transformers
checkpoint. `nf4`: the merged weights are quantized again with bitsandbytes (NF4, the recipe's double
quantization) and saved as a checkpoint that `from_pretrained` loads in 4-bit. The adapter was trained
on the NF4 base, dequant(Q(W)); re-quantizing `dequant(Q(W)) + update` rounds most of a small update
back onto the NF4 grid. The methods (`--method`, measured in docs/export.md):

- `original` (the default): Q(W + update), from the unquantized base weights (the base checkpoint is
  bf16 here). W's own position between grid points dithers the rounding, so the update survives on
  average: on the CPU demo's adapter the merged model stays closest to the trained one by far;
- `naive`: Q(dequant(Q(W)) + update), merging into the NF4 weights the adapter saw: every weight
  starts on the grid and a small update rounds straight back to it, so most of the adapter is lost.

The command prints, per module, the error of the stored weight against `dequant(Q(W)) + update`
(what the trained model computes) relative to the update's norm. It is near 1 for both methods and
does not tell them apart: what matters is the merged model's output (docs/export.md). Writes are atomic; an existing
`--out` is replaced only with `--force`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from qlrlora.errors import QLRError
from qlrlora.export import ModuleAdapter, adapters_from_run, base_model_of, kept
from qlrlora.io import atomic_directory

METHODS = ("original", "naive")
MERGE_FILE = "qlrlora-merge.json"


def nf4_roundtrip(weight: torch.Tensor, double_quant: bool) -> torch.Tensor:
    """dequant(Q(weight)) as bitsandbytes computes it (NF4, blocks of 64), in the weight's dtype."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight.contiguous(), compress_statistics=double_quant, quant_type="nf4")
    return F.dequantize_4bit(packed, state, quant_type="nf4").to(weight.dtype)


def merge(run_dir: Path, out: Path, dtype: str, method: str = "original") -> dict:
    """Write the merged checkpoint into `out` (atomically); returns the per-module errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if dtype not in ("bfloat16", "nf4"):
        raise QLRError(f"--dtype: expected bfloat16 or nf4, got {dtype!r}")
    if method not in METHODS:
        raise QLRError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    adapters, _ = adapters_from_run(run_dir)
    modules = kept(adapters)
    if not modules:
        raise QLRError("merge: every learned rank is 0, so there is nothing to merge")
    base_dir = base_model_of(run_dir)
    double_quant = _recorded_model(run_dir).get("double_quant", True)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    _check_shapes(model, modules)
    errors = {}
    with torch.no_grad():
        for name, a in modules.items():
            linear = model.get_submodule(name)
            original = linear.weight.float()
            update = a.scale * (a.B @ a.A)
            start = nf4_roundtrip(original, double_quant) if dtype == "nf4" and method == "naive" else original
            linear.weight.copy_((start + update).to(linear.weight.dtype))
            if dtype == "nf4":
                trained = nf4_roundtrip(original, double_quant) + update  # what the trained model computes
                stored = nf4_roundtrip(linear.weight.float(), double_quant)
                errors[name] = float((stored - trained).norm() / update.norm().clamp(min=1e-30))

    def fill(tmp: Path) -> None:
        if dtype == "bfloat16":
            model.save_pretrained(str(tmp))
        else:
            staging = tmp / ".bf16"
            model.save_pretrained(str(staging))
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
            quantized = AutoModelForCausalLM.from_pretrained(str(staging), quantization_config=config,
                                                             dtype=torch.bfloat16, device_map=_device())
            quantized.save_pretrained(str(tmp))
            shutil.rmtree(staging)
        tokenizer.save_pretrained(str(tmp))
        record = {"adapter": str(run_dir), "base": str(base_dir), "dtype": dtype, "method": method if dtype == "nf4"
                  else None, "error_over_update": errors}
        (tmp / MERGE_FILE).write_text(json.dumps(record, indent=2) + "\n")

    atomic_directory(out, fill)
    return errors


def _recorded_model(run_dir: Path) -> dict:
    from qlrlora.rundir import RUN_FILE

    for folder in (run_dir, run_dir.parent):
        if (folder / RUN_FILE).is_file():
            return json.loads((folder / RUN_FILE).read_text())["recipe"]["model"]
    return {}


def _check_shapes(model, modules: dict[str, ModuleAdapter]) -> None:
    for name, a in modules.items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise QLRError(f"merge: the adapter has {name}, which the base model lacks") from None
        expected = (a.B.shape[0], a.A.shape[1])
        if tuple(weight.shape) != expected:
            raise QLRError(f"merge: {name}: the base weight is {tuple(weight.shape)}, the adapter's update {expected}")


def _device():
    return {"": 0} if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlrlora-merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="a run's output.dir or one of its checkpoint-N directories")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", choices=["bfloat16", "nf4"], required=True)
    parser.add_argument("--method", choices=METHODS, default="original", help="nf4 only (see above)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not args.force:
            raise QLRError(f"--out: {out} exists; give --force to replace it")
        errors = merge(Path(args.adapter), out, args.dtype, args.method)
    except QLRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if errors:
        worst = sorted(errors.items(), key=lambda kv: -kv[1])
        print(f"re-quantization error / update norm: median {sorted(errors.values())[len(errors) // 2]:.3f}, "
              f"worst {worst[0][1]:.3f} ({worst[0][0]})")
    print(f"merged {args.dtype} checkpoint: {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
