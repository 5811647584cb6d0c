import math

import pytest
import torch

from qlrlora.fidelity import Row, compare, perplexity, predictions, table


def test_predictions_take_the_likeliest_choice_token_at_the_last_position():
    logits = [torch.tensor([[9.0, 0, 0, 0], [0.0, 1, 3, 2]]), torch.tensor([[0.0, 5, 1, 0]])]
    assert predictions(logits, [[1, 2], [2, 3]]) == [1, 0]


def test_identical_logits_are_zero_kl_and_shifted_ones_are_not_penalised_by_kl():
    a = [torch.randn(3, 7)]
    kl, diff = compare(a, a)
    assert kl == pytest.approx(0.0, abs=1e-7) and diff == 0
    kl, diff = compare([a[0] + 2.0], a)  # a constant shift does not change the distribution
    assert kl == pytest.approx(0.0, abs=1e-6) and diff == pytest.approx(2.0)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    assert perplexity([torch.zeros(5, 11)], [[1, 2, 3, 4, 5]]) == pytest.approx(11.0)
    assert math.isclose(perplexity([torch.zeros(1, 3)], [[0]]), 1.0)  # no next token: nothing to score


def test_the_table_has_one_row_per_variant():
    text = table([Row("trained", 0.5, 0.0, 0.0, 0.0, 10.0, "trained")], 400)
    assert "| trained | 0.500 | 0.000 | 0.00e+00 | 0.000 | 10.000 | trained |" in text
