import json

import pytest

from qlrlora.config import DataConfig
from qlrlora.data import INSTRUCTION_TEMPLATE, INSTRUCTION_WITH_INPUT_TEMPLATE, load_sft_dataset
from qlrlora.errors import QLRError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(spec, **kwargs):
    return load_sft_dataset(DataConfig(dataset=str(spec), **kwargs))


def test_prompt_completion_rows_pass_through(tmp_path):
    rows = load(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "2+2=", "completion": " 4", "extra": 1}] * 3))
    assert rows.column_names == ["prompt", "completion"] and len(rows) == 3 and rows[0]["completion"] == " 4"


def test_instruction_rows_use_the_llm_adapters_template(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"instruction": "Pick the right answer.", "input": "", "output": "the correct answer is answer1"},
        {"instruction": "Translate", "input": "chat", "output": "cat"},
    ])
    rows = load(path)
    assert rows[0]["prompt"] == INSTRUCTION_TEMPLATE.format(instruction="Pick the right answer.")
    assert rows[0]["completion"] == "the correct answer is answer1"
    assert rows[1]["prompt"] == INSTRUCTION_WITH_INPUT_TEMPLATE.format(instruction="Translate", input="chat")
    assert rows[1]["prompt"].endswith("### Response:\n")


def test_messages_become_a_conversational_prompt_and_completion(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    rows = load(write_jsonl(tmp_path / "m.jsonl", [{"messages": chat}]))
    assert rows[0]["prompt"] == chat[:2] and rows[0]["completion"] == chat[2:]


def test_parquet_saved_dataset_and_glob(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"prompt": "a", "completion": "b"}] * 2).to_parquet(str(tmp_path / "x.parquet"))
    Dataset.from_list([{"prompt": "c", "completion": "d"}] * 3).save_to_disk(str(tmp_path / "saved"))
    write_jsonl(tmp_path / "p1.jsonl", [{"prompt": "e", "completion": "f"}])
    write_jsonl(tmp_path / "p2.jsonl", [{"prompt": "g", "completion": "h"}])
    assert len(load(tmp_path / "x.parquet")) == 2
    assert len(load(tmp_path / "saved")) == 3
    assert len(load(tmp_path / "p*.jsonl")) == 2


def test_max_samples_is_a_deterministic_subset(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": str(i), "completion": "x"} for i in range(50)])
    a, b = load(path, max_samples=10, seed=3), load(path, max_samples=10, seed=3)
    assert len(a) == 10 and a["prompt"] == b["prompt"] and a["prompt"] != [str(i) for i in range(10)]


def test_malformed_row_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "completion": "ok"}, {"prompt": "ok", "completion": "ok"}, {"prompt": "lost its answer"},
    ])
    with pytest.raises(QLRError, match=r"bad\.jsonl: line 3: field 'completion' is missing or empty"):
        load(path)


def test_invalid_json_line_is_located(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(QLRError, match=r"broken\.jsonl: line 2: invalid JSON"):
        load(path)


def test_missing_columns_empty_and_missing_files(tmp_path):
    with pytest.raises(QLRError, match=r"no known row format in columns \[question, answer\]; expected prompt \+ completion"):
        load(write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}]))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(QLRError, match=r"empty\.jsonl: the dataset is empty"):
        load(tmp_path / "empty.jsonl")
    with pytest.raises(QLRError, match=r"data.dataset: '.*nowhere.jsonl' does not exist"):
        load(tmp_path / "nowhere.jsonl")
    with pytest.raises(QLRError, match="needs the columns messages"):
        load(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}]), format="messages")


def test_last_message_must_be_the_assistants(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(QLRError, match=r"m\.jsonl: line 1: field 'messages': the last message must be the assistant's"):
        load(path)


def test_a_bad_row_is_blamed_on_its_own_line_even_when_the_first_row_looks_like_a_number(tmp_path):
    rows = [{"prompt": f"{i}+1=", "completion": f" {i + 1}"} for i in range(11)] + [{"prompt": "x", "completion": 12}]
    with pytest.raises(QLRError, match=r"line 12: field 'completion' is missing or empty"):
        load(write_jsonl(tmp_path / "mixed.jsonl", rows))


def test_a_file_that_is_not_text_or_not_objects_names_the_line(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n\xff\xfe\x00garbage\n')
    with pytest.raises(QLRError, match="bin.jsonl: not UTF-8 text"):
        load(tmp_path / "bin.jsonl")
    (tmp_path / "list.jsonl").write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    with pytest.raises(QLRError, match="list.jsonl: line 2: expected a JSON object, got list"):
        load(tmp_path / "list.jsonl")
