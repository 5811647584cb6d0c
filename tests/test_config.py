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
        ({"adapter": {"overrides": [{"pattern": "mlp", "r_max": -1}]}}, r"adapter.overrides\[0\].r_max: expected an integer >= 1"),
        ({"adapter": {"r_max": "big"}}, r"adapter.r_max: expected an integer, got 'big' \(str\)"),
        ({"rank": {"mode": "budget"}}, "budget mode needs exactly one of budget_avg_rank and budget_params"),
        ({"rank": {"mode": "penalty", "tau_start": 0.1, "tau_end": 0.5}}, "rank.tau_end: expected 0 < tau_end <= tau_start"),
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
