"""Training data: load rows from the Hub, a saved dataset or files, check them, and shape them for TRL.

Three row formats are accepted and all leave here as TRL prompt/completion rows, so the loss is on
the completion only (TRL's completion_only_loss):
- prompt_completion: `prompt`, `completion` (strings, or lists of chat messages);
- messages: `messages`, a chat whose last turn is the assistant's; the earlier turns become the
  prompt and the chat template is applied by TRL;
- instruction: `instruction`, optional `input`, `output` (Alpaca / LLM-Adapters commonsense_170k),
  rendered with the LLM-Adapters prompt template below.
"""

from __future__ import annotations

import glob
from pathlib import Path

from qlrlora.commonsense import named_dataset_files
from qlrlora.config import DataConfig
from qlrlora.errors import QLRError
from qlrlora.io import jsonl_rows

FILE_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FORMAT_COLUMNS = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "instruction": ("instruction", "output"),
}
INSTRUCTION_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
INSTRUCTION_WITH_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def load_sft_dataset(config: DataConfig, spec=None, base_dir: Path | None = None):
    """The rows of `spec` (default: config.dataset) as a prompt/completion `datasets.Dataset`."""
    spec = config.dataset if spec is None else spec
    named = named_dataset_files(spec, "train", config.commonsense_source)
    spec = [str(f) for f in named] if named else spec
    parts = [(name, _check_rows(rows, name, config.format)) for name, rows in _load_parts(spec, config, base_dir)]
    from datasets import concatenate_datasets

    formats = {fmt for _, (_, fmt) in parts}
    if len(formats) > 1:
        raise QLRError(f"data.dataset: the files mix row formats ({', '.join(sorted(formats))}); use one format")
    dataset = concatenate_datasets([rows for _, (rows, _) in parts]) if len(parts) > 1 else parts[0][1][0]
    if config.max_samples is not None and config.max_samples < len(dataset):
        dataset = dataset.shuffle(seed=config.seed).select(range(config.max_samples))
    return _to_prompt_completion(dataset, formats.pop())


def _load_parts(spec, config: DataConfig, base_dir: Path | None):
    """(name for errors, Dataset) per file, or one part for a hub / saved dataset."""
    import datasets

    specs = spec if isinstance(spec, list) else [spec]
    files = []
    for item in specs:
        matches = _local_matches(item, base_dir)
        if matches is None:
            if len(specs) > 1:
                raise QLRError(f"data.dataset: {item!r} does not exist (a list holds local files only)")
            yield from _load_named(item, config)
            return
        files.extend(matches)
    for path in files:
        if path.is_dir():
            try:
                yield str(path), _select_split(datasets.load_from_disk(str(path)), config.split, str(path))
            except FileNotFoundError:
                raise QLRError(f"data.dataset: {path} is not a dataset saved with save_to_disk") from None
            continue
        loader = _file_loader(path)
        if loader is None:
            raise QLRError(f"data.dataset: {path}: expected a .json, .jsonl or .parquet file (optionally .gz)")
        if path.stat().st_size == 0:
            raise QLRError(f"{path}: the dataset is empty")
        if _is_jsonl(path):
            _check_jsonl(path, config.format)
        try:
            rows = datasets.load_dataset(loader, data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 - the loaders raise arrow / json errors of many types
            raise QLRError(_describe_bad_file(path, e)) from None
        yield str(path), rows


def _is_jsonl(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[-2:] in ([".jsonl", ".gz"], [".jsonl"]) or suffixes[-1:] == [".jsonl"]


def _check_jsonl(path: Path, requested: str) -> None:
    """Check every row of a JSON-lines file as written, before datasets infers column types: it would
    turn a number in one row into the column's type and blame another row for it."""
    fmt = None
    for number, row in jsonl_rows(path):
        fmt = fmt or detect_format(list(row), f"{path}: line {number}", requested)
        problem = _row_problem(row, fmt)
        if problem:
            raise QLRError(f"{path}: line {number}: {problem}")


def _file_loader(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return FILE_LOADERS.get(suffixes[-1]) if suffixes else None


def _local_matches(item: str, base_dir: Path | None) -> list[Path] | None:
    """Local paths `item` names (relative paths: the current directory, then the recipe's), or None for a hub name."""
    for root in (Path.cwd(), base_dir):
        if root is None:
            continue
        pattern = str(root / Path(item).expanduser())
        found = sorted(Path(p) for p in glob.glob(pattern))
        if found:
            return found
    looks_local = item.startswith(("/", ".", "~")) or any(ch in item for ch in "*?") or Path(item).suffix.lower() in {
        ".json", ".jsonl", ".parquet", ".gz",
    }
    if looks_local:
        raise QLRError(f"data.dataset: {item!r} does not exist")
    return None


def _load_named(name: str, config: DataConfig):
    import datasets

    try:
        rows = datasets.load_dataset(name, config.subset, split=config.split)
    except Exception as e:  # noqa: BLE001 - the Hub, network and dataset-script errors are of many types
        raise QLRError(
            f"data.dataset: cannot load {name!r} (split {config.split!r}) from the Hugging Face Hub: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    yield f"{name} [{config.split}]", rows


def _select_split(loaded, split: str, name: str):
    from datasets import DatasetDict

    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise QLRError(f"data.split: {name} has splits {', '.join(loaded)}, not {split!r}")
        return loaded[split]
    return loaded


def _describe_bad_file(path: Path, error: Exception) -> str:
    """JSON-lines files were checked line by line before (_check_jsonl); this is for the other formats."""
    first = str(error).strip().splitlines()
    return f"{path}: cannot read it as a dataset ({first[0] if first else type(error).__name__})"


def detect_format(columns: list[str], name: str, requested: str = "auto") -> str:
    if requested != "auto":
        missing = [c for c in FORMAT_COLUMNS[requested] if c not in columns]
        if missing:
            raise QLRError(
                f"{name}: data.format {requested} needs the columns {', '.join(FORMAT_COLUMNS[requested])}; "
                f"missing {', '.join(missing)} (found: {', '.join(columns) or 'none'})"
            )
        return requested
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return fmt
    raise QLRError(
        f"{name}: no known row format in columns [{', '.join(columns) or 'none'}]; expected prompt + completion, "
        "messages, or instruction + output (+ input)"
    )


def _check_rows(rows, name: str, requested: str):
    if len(rows) == 0:
        raise QLRError(f"{name}: the dataset is empty")
    fmt = detect_format(rows.column_names, name, requested)
    line_numbers = name.endswith(".jsonl")
    for index, row in enumerate(rows):
        problem = _row_problem(row, fmt)
        if problem:
            where = f"line {index + 1}" if line_numbers else f"row {index}"
            raise QLRError(f"{name}: {where}: {problem}")
    return rows, fmt


def _row_problem(row: dict, fmt: str) -> str | None:
    if fmt == "prompt_completion":
        for field in ("prompt", "completion"):
            if not _is_text_or_chat(row.get(field)):
                return f"field '{field}' is missing or empty (expected a string or a list of messages)"
        return None
    if fmt == "messages":
        messages = row.get("messages")
        if isinstance(messages, str) or not _is_text_or_chat(messages):
            return "field 'messages' is missing or not a list of {role, content} messages"
        if messages[-1].get("role") != "assistant":
            return "field 'messages': the last message must be the assistant's (it is what the model learns)"
        return None
    for field in ("instruction", "output"):
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            return f"field '{field}' is missing or empty (expected a string)"
    if row.get("input") is not None and not isinstance(row["input"], str):
        return "field 'input' must be a string when present"
    return None


def _is_text_or_chat(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    )


def _to_prompt_completion(dataset, fmt: str):
    if fmt == "prompt_completion":
        return dataset.select_columns(["prompt", "completion"])
    if fmt == "messages":
        return dataset.map(
            lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
            remove_columns=dataset.column_names,
        )

    def render(row):
        extra = (row.get("input") or "").strip()
        template = INSTRUCTION_WITH_INPUT_TEMPLATE if extra else INSTRUCTION_TEMPLATE
        return {"prompt": template.format(instruction=row["instruction"], input=extra), "completion": row["output"]}

    return dataset.map(render, remove_columns=dataset.column_names)
