"""The operators of every task: adjointness, exact forms, norms, and clear errors on bad settings."""

import math

import pytest
import torch

from d2gp.tasks import TASKS, HadamardSPC, TaskError, make_task, task_config
from d2gp.tasks.mri import CartesianMRI, gaussian_column_order
from d2gp.tasks.spc import ORDERINGS, hadamard_rows

# Small sizes keep these exact checks fast; defaults are checked too.
VARIANTS = {
    "spc": dict(),
    "spc-binary": dict(patterns="binary"),
    "spc-radial-16": dict(image_size=16, ordering="radial"),
    "mri": dict(),
    "mri-128": dict(image_size=128),
    "sr": dict(),
    "sr-32-x8": dict(image_size=32, student_factor=8, teacher_factor=4),
}


def _task(variant):
    return make_task(variant.split("-")[0], **VARIANTS[variant])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_adjointness(variant, role):
    """⟨A x, y⟩ = ⟨x, Aᵀ y⟩ for every operator, in float64-checked float32 arithmetic."""
    task = _task(variant)
    physics = getattr(task, role)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((3, *task.image_shape), generator=g)
    y = torch.randn(physics.A(x).shape, generator=g)
    lhs = (physics.A(x).double() * y.double()).sum()
    rhs = (x.double() * physics.A_adjoint(y).double()).sum()
    assert abs(float(lhs - rhs)) <= 1e-5 * float(lhs.abs() + rhs.abs())


def test_spc_fast_equals_dense_matrix():
    """The fast operator equals an independently built dense matrix of ±1 / {0,1} Hadamard rows."""
    from scipy.linalg import hadamard

    size = 8
    n = size * size
    rows = hadamard_rows(size, 20, "zig_zag")
    h1 = torch.tensor(hadamard(size), dtype=torch.float64)
    dense = torch.kron(h1, h1)  # natural-order 2D Hadamard on row-major flattening, entries ±1
    x = torch.rand(2, 1, size, size, dtype=torch.float64)
    pm1 = HadamardSPC(size, rows, patterns="pm1")
    binary = HadamardSPC(size, rows, patterns="binary")
    expected_pm1 = x.reshape(2, n) @ (dense[rows] / math.sqrt(n)).T
    expected_binary = x.reshape(2, n) @ ((1 + dense[rows]) / 2).T
    torch.testing.assert_close(pm1.A(x.float()).double().reshape(2, -1), expected_pm1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(binary.A(x.float()).double().reshape(2, -1), expected_binary, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(pm1.matrix(), dense[rows] / math.sqrt(n), atol=1e-6, rtol=0)
    assert set(binary.matrix().round(decimals=6).unique().tolist()) == {0.0, 1.0}


def test_spc_forms_conditioning():
    """±1: AAᵀ = I and AᵀA a projector; {0,1}: not a projector, condition number ≈ (m+4)²/4."""
    size, m = 16, 40
    rows = hadamard_rows(size, m, "zig_zag")
    a_pm1 = HadamardSPC(size, rows, patterns="pm1").matrix()
    a_bin = HadamardSPC(size, rows, patterns="binary").matrix()
    torch.testing.assert_close(a_pm1 @ a_pm1.T, torch.eye(m, dtype=torch.float64), atol=1e-6, rtol=0)
    gram = a_pm1.T @ a_pm1
    torch.testing.assert_close(gram @ gram, gram, atol=1e-6, rtol=0)
    gram_bin = a_bin.T @ a_bin
    assert not torch.allclose(gram_bin @ gram_bin, gram_bin, atol=1e-3)
    eig = torch.linalg.eigvalsh(gram_bin)
    eig = eig[eig > 1e-9 * eig.max()]
    assert len(eig) == m
    assert float(eig.max() / eig.min()) == pytest.approx((m + 4) ** 2 / 4, rel=0.02)


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_hadamard_rows_count_and_dc(ordering):
    rows = hadamard_rows(32, 102, ordering)
    assert rows.numel() == 102 and rows.unique().numel() == 102
    assert 0 in rows.tolist()  # the DC pattern (row 0) is always measured


def test_2d_orderings_sample_both_directions():
    """deepinv's 1D 'sequency' order at 10 % of 32×32 is lopsided; the 2D orders are not."""
    def sequency_extent(ordering):
        from deepinv.physics.singlepixel import hadamard_2d_shift

        mask = torch.zeros(1, 1, 32 * 32)
        mask[..., hadamard_rows(32, 102, ordering)] = 1
        seq = hadamard_2d_shift(mask.reshape(1, 1, 32, 32))[0, 0]  # sequency domain
        rows_used, cols_used = seq.sum(1).nonzero().numel(), seq.sum(0).nonzero().numel()
        return rows_used, cols_used

    r, c = sequency_extent("sequency")
    assert max(r, c) >= 4 * min(r, c)
    for ordering in ("zig_zag", "radial"):
        r, c = sequency_extent(ordering)
        assert abs(r - c) <= 1


def test_mri_masks_nested_and_centred():
    task = make_task("mri")
    student, teacher = set(task.student.columns.tolist()), set(task.teacher.columns.tolist())
    assert student < teacher
    assert len(student) == 8 and len(teacher) == 16
    assert 0 in student  # the DC column (unshifted index 0)
    order = gaussian_column_order(64, 0.08, 0.1, seed=0)
    assert sorted(order.tolist()) == list(range(64))
    assert set(order[:5].tolist()) == {30, 31, 32, 33, 34}


def test_mri_full_sampling_is_identity():
    """With every column AᵀA = I: the real-image adjoint is the exact inverse."""
    physics = CartesianMRI(16, range(16))
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(physics.A_adjoint(physics.A(x)), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,student,teacher", [("spc", 1.0, 1.0), ("mri", 1.0, 1.0), ("sr", 1 / 16, 1 / 4)])
def test_power_method_norms(name, student, teacher):
    task = make_task(name)
    assert task.student_norm == pytest.approx(student, rel=1e-4)
    assert task.teacher_norm == pytest.approx(teacher, rel=1e-4)
    assert task.student_step_size == pytest.approx(1 / student, rel=1e-4)


def test_step_size_override():
    task = make_task("spc", student_step_size=0.5)
    assert task.student_step_size == 0.5


def test_measurement_noise_reproducible_and_batch_independent():
    task = make_task("spc")
    x = torch.rand(4, 1, 32, 32)
    y1, _ = task.measure(x, seed=3)
    y2, _ = task.measure(x[2:], seed=5)  # image 2 of the first batch used seed 3 + 2
    torch.testing.assert_close(y1[2:3], y2[:1])
    noise = y1 - task.student.A(x)
    assert 0.005 < float(noise.std()) < 0.02


@pytest.mark.parametrize(
    "name,overrides,message",
    [
        ("ct", {}, "unknown task"),
        ("spc", {"student_ratio": 0.0}, "student_ratio must be in (0, 1)"),
        ("spc", {"student_ratio": 1.0}, "student_ratio must be in (0, 1)"),
        ("spc", {"student_ratio": -0.1}, "student_ratio must be in (0, 1)"),
        ("spc", {"teacher_ratio": 1.5}, "teacher_ratio must be in (0, 1]"),
        ("spc", {"teacher_ratio": 0.05}, "teacher must measure more rows"),
        ("spc", {"image_size": 48}, "power of two"),
        ("spc", {"ordering": "random"}, "unknown SPC ordering"),
        ("spc", {"patterns": "gray"}, "unknown SPC patterns"),
        ("spc", {"acceleration": 4}, "has no setting acceleration"),
        ("mri", {"teacher_acceleration": 8}, "teacher must be less accelerated"),
        ("mri", {"student_acceleration": 1.0}, "student_acceleration must be > 1"),
        ("sr", {"teacher_factor": 4}, "teacher must downsample less"),
        ("sr", {"student_factor": 3}, "does not divide image_size"),
        ("sr", {"noise_sigma": -1.0}, "noise_sigma"),
        ("sr", {"image_size": 4}, "image_size"),
        ("mri", {"denoiser_scale": 0.0}, "denoiser_scale must be in (0, 1]"),
        ("spc", {"denoiser_scale": 1.2}, "denoiser_scale must be in (0, 1]"),
    ],
)
def test_bad_settings_raise_clear_errors(name, overrides, message):
    with pytest.raises(TaskError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        make_task(name, **overrides)


def test_wrong_image_shape_is_refused():
    task = make_task("sr")
    with pytest.raises(TaskError, match=r"expects images of shape \(N, 3, 64, 64\)"):
        task.measure(torch.rand(2, 1, 64, 64))


def test_registry_and_config_roundtrip():
    assert set(TASKS) == {"spc", "mri", "sr", "spc-binary"}
    config = task_config("mri", image_size=128)
    assert config.to_dict()["image_size"] == 128 and config.to_dict()["task"] == "mri"


def test_spc_binary_is_spc_with_dmd_patterns_and_spcs_denoiser():
    binary, spc = make_task("spc-binary"), make_task("spc", patterns="binary")
    assert binary.student.patterns == "binary" and binary.teacher.patterns == "pm1"
    assert torch.equal(binary.student.rows, spc.student.rows)
    assert binary.student_norm == pytest.approx(spc.student_norm)
    den, ref = binary.denoiser(), spc.denoiser()
    assert all(torch.equal(a, b) for a, b in zip(den.state_dict().values(), ref.state_dict().values()))
