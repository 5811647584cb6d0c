"""The CLI's answer to bad input: one line on stderr, exit code 2, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlrlora.sft import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny_cpu.yaml"


def error_of(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]  # library progress bars may come before it
    assert last.startswith("error: "), err
    return last


def test_no_argument_says_what_to_run():
    result = subprocess.run([sys.executable, "-m", "qlrlora.sft"], check=False, capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 2
    assert "qlrlora-sft RECIPE" in result.stderr and "  tiny_cpu\n" in result.stderr


def test_missing_recipe_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qlrlora.sft", str(tmp_path / "nope.yaml")], check=False,
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: recipe not found: {tmp_path / 'nope.yaml'} is neither a file nor")


def test_a_shipped_recipe_is_found_by_name_and_a_typo_gets_a_suggestion():
    from qlrlora.config import ConfigError, find_recipe

    assert find_recipe("tiny_cpu") == find_recipe("tiny_cpu.yaml") == TINY.resolve()
    with pytest.raises(ConfigError, match="did you mean 'tiny_cpu'"):
        find_recipe("tiny_cpy")


def test_yaml_syntax_error_names_the_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: x\n  quantize: [nf4\n")
    # The unclosed list on line 3 is noticed where the stream ends, line 4.
    assert f"{bad}: line 4, column 1: invalid YAML: expected ',' or ']'" in error_of(capsys, bad)


def test_unknown_key_suggests_the_right_one(capsys):
    err = error_of(capsys, TINY, "--adapter.rmax=8")
    assert "unknown key 'adapter.rmax' (did you mean 'r_max'?)" in err
    err = error_of(capsys, TINY, "--train.learning_rat=1e-4")
    assert "unknown key 'train.learning_rat'" in err and "did you mean 'learning_rate'" in err
    assert "unknown section 'trian'" in error_of(capsys, TINY, "--trian.max_steps=3")


def test_wrong_types(capsys):
    assert "adapter.r_max: expected an integer, got 'many' (str)" in error_of(capsys, TINY, "--adapter.r_max=many")
    assert "train.learning_rate: expected a number, got 'fast'" in error_of(capsys, TINY, "--train.learning_rate=fast")
    assert "train.bf16: expected true or false or null, got 2 (int)" in error_of(capsys, TINY, "--train.bf16=2")
    assert "train.max_steps: expected an integer, got 2.5" in error_of(capsys, TINY, "--train.max_steps=2.5")


def test_model_path_that_does_not_exist(capsys, tmp_path):
    err = error_of(capsys, TINY, "--model.init_config=null", f"--model.name_or_path={tmp_path / 'missing'}")
    assert "model.name_or_path:" in err and "does not exist" in err


@pytest.mark.parametrize(
    "rows, message",
    [("", "the dataset is empty"), ('{"question": "q", "answer": "a"}\n', "no known row format in columns")],
)
def test_unusable_datasets(capsys, tmp_path, rows, message):
    data = tmp_path / "rows.jsonl"
    data.write_text(rows)
    assert message in error_of(capsys, TINY, f"--data.dataset={data}", f"--output.dir={tmp_path / 'out'}")


def test_overrides_are_typed_like_the_recipe(tmp_path):
    from qlrlora.config import load_recipe

    recipe = load_recipe(TINY, ["--train.learning_rate=2e-4", "--train.save_strategy=no", "--adapter.targets=[q_proj]",
                                "--rank.budget_avg_rank=5"])
    assert recipe.train["learning_rate"] == 2e-4 and recipe.train["save_strategy"] == "no"
    assert recipe.adapter.targets == ["q_proj"] and recipe.rank.budget_avg_rank == 5.0


def rows_file(tmp_path, prompts):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": " 7"}) + "\n" for p in prompts))
    return path


def test_rows_whose_prompt_fills_max_length_are_counted_when_dropped(tmp_path, capsys):
    from qlrlora.sft import build_trainer
    from tests.test_trainer import tiny_recipe

    # Byte-level tokenizer: a 70-character prompt is more than the tiny recipe's 64 tokens.
    prompts = ["Q: 3 + 4 ="] * 5 + ["Q: " + "1 + " * 17 + "0 ="] * 3
    trainer = build_trainer(tiny_recipe(tmp_path, data={"dataset": str(rows_file(tmp_path, prompts))}))
    assert len(trainer.train_dataset) == 5
    assert "data: 3 of 8 training rows dropped: their prompt alone fills train.max_length=64" in capsys.readouterr().err


def test_every_prompt_filling_max_length_is_an_error(tmp_path, capsys):
    data = rows_file(tmp_path, ["Q: " + "1 + " * 17 + "0 ="] * 4)
    err = error_of(capsys, TINY, f"--data.dataset={data}", f"--output.dir={tmp_path / 'out'}", "--train.report_to=none")
    assert err == "error: data: the prompt of every one of the 4 training rows fills train.max_length=64; raise it"


def test_several_gpus_in_one_process_is_refused_before_anything_loads(monkeypatch, tmp_path):
    import torch

    from qlrlora.config import load_recipe
    from qlrlora.errors import QLRError
    from qlrlora.sft import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("accelerate.PartialState", lambda cpu: type("State", (), {"num_processes": 1})())
    recipe = load_recipe("tiny_cpu", ["--train.use_cpu=false", f"--output.dir={tmp_path / 'out'}"])
    with pytest.raises(QLRError, match="2 GPUs are visible to one process.*CUDA_VISIBLE_DEVICES=0"):
        run(recipe)
    assert not (tmp_path / "out").exists()  # refused before the output directory is touched
