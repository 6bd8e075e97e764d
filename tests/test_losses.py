"""The three D2GP losses and their weights, checked against values computed by hand."""

import math

import pytest
import torch

from d2gp.losses import LossWeights, cosine_distance, gradient_loss, imitation_loss, supervised_loss


def test_cosine_distance_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [-3.0, 0.0]])
    # orthogonal: 1; 45°: 1 − 1/√2; a zero vector has no direction: 1; opposite: 2
    expected = torch.tensor([1.0, 1 - 1 / math.sqrt(2), 1.0, 2.0])
    torch.testing.assert_close(cosine_distance(a, b), expected)
    images = a.view(4, 1, 1, 2)  # every non-batch dimension is flattened
    torch.testing.assert_close(cosine_distance(images, b.view(4, 1, 2, 1)), expected)


def test_gradient_loss_is_the_mean_over_iterations_and_images():
    p0, t0 = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    p1, t1 = torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([[5.0, 0.0], [0.0, 0.1]])  # aligned: 0
    # iteration 0: images at 1 and 1 − 1/√2; iteration 1: 0 and 0
    assert float(gradient_loss([p0, p1], [t0, t1])) == pytest.approx((2 - 1 / math.sqrt(2)) / 4, abs=1e-7)
    assert float(gradient_loss([p0], [t0])) == pytest.approx((2 - 1 / math.sqrt(2)) / 2, abs=1e-7)


def test_losses_zero_when_equal_positive_otherwise():
    a = torch.randn(3, 1, 8, 8)
    b = torch.randn(3, 1, 8, 8)
    assert float(gradient_loss([a, a], [a, 5 * a])) == pytest.approx(0, abs=1e-6)  # scale-free
    assert float(gradient_loss([a], [b])) > 0.5
    assert float(gradient_loss([a], [-a])) == pytest.approx(2.0, abs=1e-6)
    assert float(imitation_loss(a, a)) == 0 and float(imitation_loss(a, b)) > 0
    assert float(supervised_loss(a, a)) == 0 and float(supervised_loss(a, b)) > 0
    torch.testing.assert_close(cosine_distance(a, b), cosine_distance(3 * a, 0.1 * b))


def test_gradient_loss_needs_one_teacher_gradient_per_iteration():
    g = torch.ones(1, 2)
    with pytest.raises(ValueError, match="one teacher gradient per iteration, got 2 and 1"):
        gradient_loss([g, g], [g])
    with pytest.raises(ValueError, match="got 0 and 0"):
        gradient_loss([], [])


def test_imitation_and_supervised_losses_are_per_pixel_mse_by_hand():
    student = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    assert float(imitation_loss(student, torch.zeros_like(student))) == 3.5  # (0 + 1 + 4 + 9) / 4
    assert float(supervised_loss(student, torch.ones_like(student))) == 1.5  # (1 + 0 + 1 + 4) / 4
    assert imitation_loss(student.double(), student.half()).dtype == torch.float32


def test_loss_weights_validation():
    assert LossWeights() == LossWeights(1.0, 300.0, 300.0)
    assert LossWeights(0, 0, 1).needs_teacher is False
    assert LossWeights(0, 1, 0).needs_teacher is True and LossWeights(1, 0, 0).needs_teacher is True
    with pytest.raises(ValueError, match="all loss weights are zero"):
        LossWeights(0, 0, 0)
    with pytest.raises(ValueError, match="λ_gradient must be ≥ 0, got -1"):
        LossWeights(-1, 0, 1)
    with pytest.raises(ValueError, match="λ_imitation must be ≥ 0, got nan"):
        LossWeights(1, float("nan"), 1)
