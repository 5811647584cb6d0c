import json

import pytest

from qlrlora.errors import QLRError
from qlrlora.rundir import COMPLETE_MARKER, RUN_FILE, prepare_output_dir, recipe_record
from qlrlora.sft import run
from tests.test_trainer import tiny_recipe


def fake_run(directory, steps=(10, 20), complete=(10, 20)):
    """A directory as a run leaves it: its record, checkpoints (some complete), outputs."""
    directory.mkdir(parents=True)
    for step in steps:
        (directory / f"checkpoint-{step}").mkdir()
        if step in complete:
            (directory / f"checkpoint-{step}" / COMPLETE_MARKER).write_text(json.dumps({"global_step": step}))
    (directory / "lrlora_adapter.json").write_text("{}")


def test_a_finished_run_is_never_overwritten_silently(tmp_path):
    first = tiny_recipe(tmp_path, train={"max_steps": 4, "save_steps": 2})
    run(first)
    again = tiny_recipe(tmp_path, train={"max_steps": 3})
    with pytest.raises(QLRError) as error:
        run(again)
    message = str(error.value)
    assert "holds another run" in message and "checkpoint-4" in message
    assert "--output.resume=true" in message and "--output.overwrite=true" in message
    assert (tmp_path / "out" / "checkpoint-4" / COMPLETE_MARKER).is_file()  # untouched

    replace = tiny_recipe(tmp_path, train={"max_steps": 3, "save_steps": 3}, output={"overwrite": True})
    run(replace)
    names = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert names == ["checkpoint-3"]  # the old run's checkpoints went with it
    assert json.loads((tmp_path / "out" / RUN_FILE).read_text())["recipe"]["train"]["max_steps"] == 3


def test_resume_continues_the_recorded_run_and_refuses_changed_settings(tmp_path):
    recipe = tiny_recipe(tmp_path, train={"max_steps": 4, "save_steps": 2})
    run(recipe)
    changed = tiny_recipe(tmp_path, train={"max_steps": 4, "save_steps": 2, "learning_rate": 0.5},
                          output={"resume": True})
    with pytest.raises(QLRError, match=r"train.learning_rate: 0.002 -> 0.5"):
        prepare_output_dir(changed)
    same = tiny_recipe(tmp_path, train={"max_steps": 4, "save_steps": 2, "logging_steps": 2}, output={"resume": True})
    assert prepare_output_dir(same).name == "checkpoint-4"  # logging may change


def test_resume_needs_a_recorded_run(tmp_path):
    with pytest.raises(QLRError, match="holds no run; there is nothing to continue"):
        prepare_output_dir(tiny_recipe(tmp_path, output={"resume": True}))
    fake_run(tmp_path / "out")
    with pytest.raises(QLRError, match="holds no run recorded by this version"):
        prepare_output_dir(tiny_recipe(tmp_path, output={"resume": True}))


def test_what_a_killed_run_left_is_cleared_before_starting(tmp_path):
    recipe = tiny_recipe(tmp_path, output={"resume": True})
    out = tmp_path / "out"
    fake_run(out, steps=(10, 20), complete=(10,))
    (out / RUN_FILE).write_text(json.dumps({"recipe": recipe_record(recipe), "source": "x"}))
    (out / ".ranks.png.abc123.tmp").write_text("half")
    (out / ".peft_adapter.xyz.tmp").mkdir()
    assert prepare_output_dir(recipe).name == "checkpoint-10"
    assert not (out / "checkpoint-20").exists()  # its save never completed
    assert not list(out.glob(".*.tmp"))


def test_overwrite_and_resume_together_is_a_config_error(tmp_path):
    from qlrlora.config import ConfigError

    with pytest.raises(ConfigError, match="output.overwrite: cannot be true together with output.resume"):
        tiny_recipe(tmp_path, output={"resume": True, "overwrite": True})
