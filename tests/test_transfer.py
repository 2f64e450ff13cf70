"""transfer_rates: adversarial examples of a source model, measured on other models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import advfeat as af


def test_a_model_is_fooled_by_its_own_examples_and_rates_are_fractions():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    other = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    data = TensorDataset(torch.rand(64, 1, 4, 4), torch.randint(0, 3, (64,)))
    rates = af.transfer_rates(src, {"self": src, "other": other}, data, af.L2PGD(2.0, steps=10))
    assert rates["self"] == 1.0  # counted only where the source was fooled: so was "self"
    assert 0.0 <= rates["other"] <= 1.0


def test_bad_arguments():
    src = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    data = TensorDataset(torch.rand(4, 1, 2, 2), torch.randint(0, 2, (4,)))
    with pytest.raises(ValueError, match="targets"):
        af.transfer_rates(src, {}, data, af.L2PGD(1.0))
    with pytest.raises(TypeError, match="attack"):
        af.transfer_rates(src, {"a": src}, data, "pgd")  # type: ignore[arg-type]
