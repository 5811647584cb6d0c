"""Fuzzing the inputs a user writes: any recipe value and any data row ends in a run or in one line, exit 2."""

import contextlib
import io
import json

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qlrlora.sft import main
from tests.test_trainer import TINY

pytestmark = pytest.mark.slow

FIELDS = [
    ("model", "quantize"), ("model", "dtype"), ("model", "gguf_file"), ("model", "double_quant"), ("model", "revision"),
    ("adapter", "targets"), ("adapter", "r_max"), ("adapter", "init_rank"), ("adapter", "alpha"), ("adapter", "dropout"),
    ("adapter", "dtype"), ("adapter", "overrides"), ("adapter", "ranks_file"),
    ("rank", "mode"), ("rank", "penalty"), ("rank", "budget_avg_rank"), ("rank", "budget_params"), ("rank", "rank_lr"),
    ("rank", "temperature"), ("rank", "warmup_fraction"), ("rank", "freeze_fraction"),
    ("data", "format"), ("data", "max_samples"), ("data", "split"),
    ("train", "learning_rate"), ("train", "per_device_train_batch_size"), ("train", "gradient_accumulation_steps"),
    ("train", "max_length"), ("train", "lr_scheduler_type"), ("train", "warmup_steps"), ("train", "optim"),
    ("output", "resume"), ("output", "overwrite"),
    ("model", "no_such_key"), ("train", "no_such_key"), ("nonsense", "key"),
]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["", "nf4", "none", "float32", "all-linear", "budget", "penalty", "fixed", "re:(", "q_proj",
                     "cosine", "adamw_torch", "prompt_completion", "messages"]),
    st.text(max_size=8), st.lists(st.one_of(st.integers(-2, 5), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.sampled_from(["pattern", "r_max", "init_rank", "x"]), st.one_of(st.integers(-2, 9), st.text(max_size=4)),
                    max_size=3),
)
# Values that fit, so that a good share of the examples get past validation and train.
PLAUSIBLE = {
    ("model", "quantize"): ["nf4", "none"], ("model", "dtype"): ["float32", "bfloat16"],
    ("adapter", "r_max"): [2, 4, 8], ("adapter", "init_rank"): [0, 1.5, 4], ("adapter", "alpha"): [1, 16.0],
    ("adapter", "dropout"): [0.0, 0.1], ("adapter", "targets"): [["q_proj"], ["re:.*mlp.*"], "all-linear"],
    ("rank", "mode"): ["penalty", "fixed"], ("rank", "rank_lr"): [0.0, 0.5], ("rank", "temperature"): [0.1, 2.0],
    ("rank", "warmup_fraction"): [0.0, 0.5], ("rank", "freeze_fraction"): [0.9, 1.0],
    ("train", "learning_rate"): [1e-4, 0.1], ("train", "per_device_train_batch_size"): [1, 3],
    ("train", "gradient_accumulation_steps"): [1, 2], ("train", "max_length"): [8, 32],
    ("train", "lr_scheduler_type"): ["cosine", "linear"], ("train", "warmup_steps"): [0, 0.5],
}
CHANGES = st.sampled_from(FIELDS).flatmap(
    lambda field: st.tuples(st.just(field), st.one_of(st.sampled_from(PLAUSIBLE[field]), VALUES)
                            if field in PLAUSIBLE else VALUES))
ROW_VALUES = st.one_of(st.text(max_size=10), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2),
                       st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                       "content": st.text(max_size=5)}), max_size=2))
GOOD_ROW = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=12), "completion": st.text(min_size=1, max_size=6)})
ANY_ROW = st.dictionaries(st.sampled_from(["prompt", "completion", "messages", "instruction", "output", "input"]),
                          ROW_VALUES, max_size=3)
ROWS = st.lists(st.one_of(GOOD_ROW, GOOD_ROW, ANY_ROW), min_size=1, max_size=5)


def run_quietly(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def base_recipe(tmp_path, dataset):
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["dataset"] = str(dataset)
    raw["train"].update({"max_steps": 1, "save_strategy": "no", "report_to": "none", "logging_steps": 1})
    raw["output"]["dir"] = str(tmp_path / "out")
    raw["output"]["overwrite"] = True
    return raw


def check(code, err):
    event(f"exit {code}")  # pytest --hypothesis-show-statistics shows how many runs went through
    assert code in (0, 2), (code, err[-2000:])
    if code == 2:
        assert "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("error: "), err[-2000:]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(CHANGES, min_size=1, max_size=3))
def test_any_recipe_value_runs_or_fails_in_one_line(tmp_path, changes):
    raw = base_recipe(tmp_path, TINY.parent / "data" / "tiny_arithmetic.jsonl")
    for (section, key), value in changes:
        raw.setdefault(section, {})
        if isinstance(raw[section], dict):
            raw[section][key] = value
    recipe = tmp_path / "fuzz.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    check(*run_quietly([str(recipe)]))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.sampled_from(sorted(PLAUSIBLE)).flatmap(
    lambda field: st.tuples(st.just(field), st.sampled_from(PLAUSIBLE[field]))), min_size=1, max_size=4))
def test_plausible_recipes_train_or_say_why(tmp_path, changes):
    """Only values that fit their field one by one, so that most examples train a step; combinations still can fail."""
    test_any_recipe_value_runs_or_fails_in_one_line.hypothesis.inner_test(tmp_path, changes)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ROWS)
def test_any_data_row_runs_or_fails_in_one_line(tmp_path, rows):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = tmp_path / "fuzz.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(tmp_path, data)))
    check(*run_quietly([str(recipe)]))
