"""expert_class_information on tables whose mutual information is known by hand."""

import math

import pytest
import torch

from visionmoe.metrics import expert_class_information


def test_experts_that_each_serve_one_class_carry_the_class_entropy():
    # Two experts, two equally frequent classes, each class to its own expert: knowing the expert gives the
    # class, I = H(class) = 1 bit.
    assert expert_class_information(torch.tensor([[5.0, 0.0], [0.0, 5.0]])) == pytest.approx(1.0)


def test_experts_with_the_same_class_mix_carry_nothing():
    # Rows proportional to each other: the expert is independent of the class, I = 0.
    assert expert_class_information(torch.tensor([[1.0, 3.0], [2.0, 6.0]])) == pytest.approx(0.0, abs=1e-12)


def test_a_partly_specialised_table():
    # joint = [[1/2, 0], [1/4, 1/4]]; expert marginal (1/2, 1/2), class marginal (3/4, 1/4).
    # I = 1/2 log2((1/2)/(3/8)) + 1/4 log2((1/4)/(3/8)) + 1/4 log2((1/4)/(1/8)) = 1/2 log2(4/3) + 1/4 log2(2/3) + 1/4.
    expected = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25
    assert expert_class_information(torch.tensor([[2.0, 0.0], [1.0, 1.0]])) == pytest.approx(expected)


def test_four_classes_over_two_experts_give_at_most_one_bit():
    # Classes {0, 1} to expert 0 and {2, 3} to expert 1, all equally frequent: I = H(expert) = 1 bit < log2(4).
    usage = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    assert expert_class_information(usage) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "usage, message",
    [
        (torch.zeros(2, 2), "all zero"),
        (torch.tensor([[1.0, -1.0]]), "non-negative"),
        (torch.tensor([[1.0, float("nan")]]), "finite"),
        (torch.ones(2, 2, dtype=torch.int64), r"floating-point \[E, L\]"),
        (torch.ones(4), r"floating-point \[E, L\]"),
    ],
)
def test_bad_tables_are_rejected(usage, message):
    with pytest.raises(ValueError, match=message):
        expert_class_information(usage)
