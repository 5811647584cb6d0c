"""An output directory holds one run: what it may hold, when it may be reused, and what resume continues.

A run records its recipe in `qlrlora-run.json` when it starts. Starting again into a directory that
holds a run is refused unless the recipe says how to go on: `output.resume` continues that run (with
the recipe it recorded: a different setting is named and refused, since a resumed run that silently
changed its learning rate is not the run that was started), `output.overwrite` replaces it.

Before anything is written, what a killed run left behind is cleared: temporary files and directories
of interrupted atomic writes (io.py), and checkpoints whose save never completed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from qlrlora.config import Recipe
from qlrlora.errors import QLRError
from qlrlora.io import atomic_write_json, recover_interrupted_writes

RUN_FILE = "qlrlora-run.json"
COMPLETE_MARKER = "qlrlora-complete.json"
# What a run writes; a directory holding any of these holds a run.
RUN_OUTPUTS = (RUN_FILE, "lrlora_adapter.json", "lrlora_adapter.safetensors", "ranks.json", "peft_adapter")
# Settings a resumed run may change: how to go on, and how often to report.
RESUMABLE_CHANGES = ("output.resume", "output.overwrite", "output.dir", "train.logging_steps", "train.report_to",
                     "train.dataloader_num_workers", "eval.batch_size")


def prepare_output_dir(recipe: Recipe) -> Path | None:
    """Make `recipe.output.dir` ready for this run; returns the checkpoint to resume from, if any."""
    directory = Path(recipe.output.dir)
    resume = recipe.output.resume
    if directory.is_dir():
        recover_interrupted_writes(directory)
        _remove_incomplete_checkpoints(directory)
    held = _held_run(directory)
    if resume is False:
        if held and not recipe.output.overwrite:
            raise QLRError(
                f"output.dir: {directory} holds another run ({', '.join(held)}); continue it with "
                f"--output.resume=true, replace it with --output.overwrite=true, or choose another --output.dir"
            )
        if held:
            _clear(directory)
        _record(directory, recipe)
        return None
    if resume is True:
        recorded = directory / RUN_FILE
        if not recorded.is_file():
            what = f"holds no run recorded by this version ({', '.join(held)})" if held else "holds no run"
            raise QLRError(f"output.resume: {directory} {what}; there is nothing to continue")
        _check_same_recipe(recipe, json.loads(recorded.read_text()), recorded)
        return last_complete_checkpoint(directory)
    checkpoint = Path(resume)
    if not (checkpoint / COMPLETE_MARKER).is_file():
        raise QLRError(f"output.resume: {checkpoint} is not a complete checkpoint (expected {COMPLETE_MARKER} in it)")
    origin = checkpoint.parent / RUN_FILE
    if origin.is_file():
        _check_same_recipe(recipe, json.loads(origin.read_text()), origin)
    if held and directory.resolve() != checkpoint.parent.resolve() and not recipe.output.overwrite:
        raise QLRError(f"output.dir: {directory} holds another run ({', '.join(held)}); resume into a new "
                       f"--output.dir, or replace it with --output.overwrite=true")
    if not (directory / RUN_FILE).is_file():
        _record(directory, recipe)
    return checkpoint


def last_complete_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the highest step whose save finished."""
    folder = Path(directory)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return max(done, key=lambda p: json.loads((p / COMPLETE_MARKER).read_text())["global_step"], default=None)


def recipe_record(recipe: Recipe) -> dict:
    """The recipe as the run records it: every section, resolved, as plain JSON."""
    sections = {f.name: dataclasses.asdict(getattr(recipe, f.name)) for f in dataclasses.fields(recipe)
                if f.name not in ("train", "source")}
    return json.loads(json.dumps({**sections, "train": recipe.train}, default=str))


def _held_run(directory: Path) -> list[str]:
    """What a run left here; a run that stopped before writing anything but its record leaves nothing to keep."""
    if not directory.is_dir():
        return []
    held = [name for name in RUN_OUTPUTS if name != RUN_FILE and (directory / name).exists()]
    held += sorted(p.name for p in directory.glob("checkpoint-*"))
    return held


def _record(directory: Path, recipe: Recipe) -> None:
    atomic_write_json(directory / RUN_FILE, {"recipe": recipe_record(recipe), "source": recipe.source})


def _check_same_recipe(recipe: Recipe, recorded: dict, where: Path) -> None:
    old, new = _flatten(recorded["recipe"]), _flatten(recipe_record(recipe))
    changed = [key for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES)]
    if changed:
        shown = "; ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise QLRError(
            f"output.resume: the recipe differs from the one the run recorded in {where} ({shown}{more}); a resumed "
            f"run continues with its own settings: drop these changes, or start a new run in another --output.dir"
        )


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "init_config":
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _remove_incomplete_checkpoints(directory: Path) -> None:
    for checkpoint in directory.glob("checkpoint-*"):
        if checkpoint.is_dir() and not (checkpoint / COMPLETE_MARKER).is_file():
            shutil.rmtree(checkpoint)


def _clear(directory: Path) -> None:
    """Remove a previous run's outputs (only what a run writes; other files stay)."""
    for name in (*RUN_OUTPUTS, "lrlora_adapter.safetensors", "ranks.png", "eval_before.json", "eval_after.json",
                 "training_args.bin", "runs"):
        target = directory / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for checkpoint in directory.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
