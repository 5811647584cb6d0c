import pytest

from qlrlora.config import ConfigError, recipe_from_dict

BASE = {"model": {"init_config": {"model_type": "llama"}}, "data": {"dataset": "rows.jsonl"}}


def recipe(**sections):
    raw = {k: dict(v) for k, v in BASE.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return recipe_from_dict(raw, "r.yaml")


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"adapter": {"r_max": 0}}, "r.yaml: adapter.r_max: expected an integer >= 1, got 0"),
        ({"adapter": {"r_max": 8, "init_rank": 9}}, r"r.yaml: adapter.init_rank: expected a number in \[0, r_max=8\], got 9"),
        ({"model": {"quantize": "int3"}}, "r.yaml: model.quantize: expected one of 'nf4', 'none', got 'int3'"),
        ({"adapter": {"targets": "everything"}}, "adapter.targets: expected 'all-linear' or a list of module names"),
        ({"adapter": {"targets": []}}, r"adapter.targets: expected 'all-linear' or a list of module names, got \[\]"),
        ({"adapter": {"overrides": [{"pattern": "mlp", "r_max": -1}]}}, r"adapter.overrides\[0\].r_max: expected an integer >= 1"),
        ({"adapter": {"r_max": "big"}}, r"adapter.r_max: expected an integer, got 'big' \(str\)"),
        ({"rank": {"mode": "budget"}}, "budget mode needs exactly one of budget_avg_rank and budget_params"),
        ({"rank": {"mode": "penalty", "temperature": 0}}, "rank.temperature: expected a number > 0, got 0"),
        ({"rank": {"mode": "penalty", "warmup_fraction": 1.0}}, r"rank.warmup_fraction: expected a number in \[0, 1\)"),
        ({"rank": {"mode": "penalty", "warmup_fraction": 0.5, "freeze_fraction": 0.4}},
         r"rank.freeze_fraction: expected a number in \[warmup_fraction=0.5, 1\], got 0.4"),
        ({"rank": {"mode": "fixed", "budget_avg_rank": 4}}, "budget_avg_rank / budget_params need mode: budget"),
    ],
)
def test_bad_values_name_the_field(sections, message):
    sections.setdefault("rank", {"mode": "penalty"})
    with pytest.raises(ConfigError, match=message):
        recipe(**sections)


def test_defaults_and_int_to_float():
    r = recipe(rank={"mode": "budget", "budget_avg_rank": 16}, adapter={"init_rank": 4})
    assert r.adapter.init_rank == 4.0 and isinstance(r.adapter.init_rank, float)
    assert r.adapter.targets == "all-linear" and r.model.quantize == "nf4"
    unset = recipe(rank={"mode": "fixed"})
    assert unset.adapter.init_rank is None and unset.adapter.start_rank(unset.adapter.r_max) == unset.adapter.r_max


def test_every_shipped_recipe_validates():
    from pathlib import Path

    from qlrlora.config import load_recipe

    recipes = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.output.dir.startswith("runs/")
    big = load_recipe(recipes[0].parent / "llama3_8b_commonsense.yaml")
    assert big.model.name_or_path == "meta-llama/Meta-Llama-3-8B" and big.adapter.r_max == 64
    assert big.rank.budget_avg_rank == 16 and big.train["max_length"] == 256
    small = load_recipe(recipes[0].parent / "llama3_8b_commonsense_24gb.yaml")
    assert small.train["optim"] == "paged_adamw_8bit" and small.train["packing"] and small.train["gradient_checkpointing"]


def test_yaml_reads_no_as_a_string_and_2e_4_as_a_number():
    from qlrlora.typed_yaml import parse_yaml

    assert parse_yaml("a: no\nb: 2e-4\nc: true\nd: 3") == {"a": "no", "b": 2e-4, "c": True, "d": 3}
