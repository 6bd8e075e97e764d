"""`d2gp.analysis`: exact Jacobians, spectra against dense linear algebra, convergence against the benchmark."""

import json
import math
import shutil

import pytest
import torch
from deepinv.physics import LinearPhysics

from d2gp.analysis import (
    analyze, convergence, finite_difference, finite_difference_agreement, homogeneity_error, jacobian,
    jacobian_properties, lanczos, linearization_error, preconditioned_spectrum, range_basis, vjp_rows,
)
from d2gp.benchmark import benchmark
from d2gp.cli import main
from d2gp.preconditioners import NPO
from d2gp.preconditioners.classical import Newton, Polynomial
from d2gp.preconditioners.learned_linear import LINEAR_PRECONDITIONERS, build_linear
from d2gp.tasks import make_task

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed_npo(seed=0, **kwargs):
    """A small NPO whose head is no longer zero (as after training)."""
    torch.manual_seed(seed)
    P = NPO(**{"width": 8, "blocks": 1, **kwargs})
    with torch.no_grad():
        P.head.weight.normal_(0, 0.05)
        P.head.bias.normal_(0, 0.05)
    return P.eval()


def _matrix(P, shape, k=0):
    """The n×n matrix of a linear P, column j = P(e_j)."""
    n = math.prod(shape)
    with torch.no_grad():
        return P(torch.eye(n).reshape(n, *shape), k).reshape(n, n).T


class DenseOperator(LinearPhysics):
    """A plain matrix A (m×n) on images of shape ``shape``: the spectra can be checked by dense algebra."""

    def __init__(self, matrix, shape):
        super().__init__()
        self.matrix, self.shape = matrix, shape

    def A(self, x, **kwargs):
        return x.flatten(1) @ self.matrix.T.to(x.dtype)

    def A_adjoint(self, y, **kwargs):
        return (y @ self.matrix.to(y.dtype)).reshape(-1, *self.shape)


def _spd(n, seed=1):
    torch.manual_seed(seed)
    B = torch.randn(n, n) / math.sqrt(n)
    return B @ B.T + 0.5 * torch.eye(n)


# --- exact Jacobians -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(LINEAR_PRECONDITIONERS))
def test_jacobian_of_a_learned_linear_preconditioner_is_its_matrix(kind):
    torch.manual_seed(0)
    P = build_linear(kind, channels=2, image_size=(4, 3), iterations=3)
    with torch.no_grad():
        for p in P.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.randn(2, 4, 3)
    for k in (0, 2, 7):
        J = jacobian(P, g, k)
        assert torch.allclose(J, P.as_matrix(k, dtype=torch.float32), atol=1e-6), (kind, k)
        rows = vjp_rows(P, g, k, torch.eye(24).reshape(24, 2, 4, 3)).reshape(24, 24)
        assert torch.allclose(rows, J, atol=1e-6)  # row i of J is Jᵀe_i


@pytest.mark.parametrize("build", [
    lambda A: Newton(A, 0.1, (1, 8, 8)),                 # closed form (projector)
    lambda A: Newton(A, 0.1, (1, 8, 8), method="cg"),    # CG: data-dependent stop, no vmap
    lambda A: Polynomial.from_choice(A, (1, 8, 8), "chebyshev", lower=0.1),
], ids=["newton-projector", "newton-cg", "polynomial"])
def test_jacobian_of_a_classical_preconditioner_is_its_matrix(build):
    task = make_task("spc", image_size=8, patterns="binary")
    P = build(task.student)
    J = jacobian(P, torch.randn(1, 8, 8), 0)
    M = _matrix(P, (1, 8, 8))
    assert torch.allclose(J, M, atol=1e-4 * float(M.abs().max()))


def test_autograd_and_finite_differences_agree_on_a_tiny_npo():
    P = _perturbed_npo()
    g = torch.randn(1, 8, 8)
    J = jacobian(P, g, 3)
    columns = finite_difference(P, g, 3, torch.eye(64).reshape(64, 1, 8, 8)).reshape(64, 64).T
    assert float((columns - J).norm() / J.norm()) < 1e-3
    assert (J - torch.eye(64)).abs().max() > 1e-2  # a real, non-identity Jacobian
    agreement = finite_difference_agreement(P, g, 3, probes=4)
    assert agreement["max"] < 1e-3
    # Euler's identity for a positively homogeneous P: J g = P(g).
    assert torch.allclose(J @ g.flatten(), P(g[None], 3).flatten(), atol=1e-5)
    # Forward and reverse mode give the same matrix.
    assert torch.allclose(vjp_rows(P, g, 3, torch.eye(64).reshape(64, 1, 8, 8)).reshape(64, 64), J, atol=1e-6)


def test_npo_jacobian_with_the_iterate_holds_it_fixed():
    P = _perturbed_npo(use_iterate=True)
    g, z = torch.randn(1, 8, 8), torch.rand(1, 8, 8)
    J = jacobian(P, g, 1, iterate=z)
    columns = finite_difference(P, g, 1, torch.eye(64).reshape(64, 1, 8, 8), iterate=z).reshape(64, 64).T
    assert float((columns - J).norm() / J.norm()) < 1e-3


def test_identity_npo_has_identity_jacobian_and_the_students_spectrum():
    task = make_task("sr", image_size=16)
    P = NPO(channels=3, width=8, blocks=1)
    g = torch.randn(3, 16, 16)
    J = jacobian(P, g, 5)
    assert torch.equal(J, torch.eye(768))
    properties = jacobian_properties(P, g, 5, dense=True)
    assert properties["condition"] == pytest.approx(1.0) and properties["distance_to_identity"] == 0
    assert properties["asymmetry"] == 0 and properties["diagonal_energy"] == 1 and properties["dominant_rows"] == 1
    assert properties["best_scale"] == pytest.approx(1.0) and properties["stencil"][7][7] == pytest.approx(1.0)
    basis = range_basis(task.student, task.image_shape)
    own, preconditioned = preconditioned_spectrum(basis), preconditioned_spectrum(basis, P, g, 5)
    assert basis.rank == 48 and own["condition"] > 10  # blur + decimation: not a projector
    assert torch.allclose(torch.tensor(preconditioned["singular_values"], dtype=torch.float64),
                          basis.eigenvalues, rtol=1e-5)
    assert preconditioned["condition"] == pytest.approx(own["condition"], rel=1e-5)


def test_sampled_properties_are_the_dense_ones_when_every_row_is_sampled():
    P = _perturbed_npo(seed=3)
    g = torch.randn(1, 6, 6)
    dense = jacobian_properties(P, g, 2, dense=True)
    sampled = jacobian_properties(P, g, 2, dense=False, sample=36, lanczos_steps=36)
    for key in ("distance_to_identity", "best_scale", "distance_to_scaled_identity", "asymmetry", "diagonal_energy",
                "dominant_rows", "diagonal_ratio", "sigma_max", "sigma_min", "symmetric_min", "condition"):
        assert sampled[key] == pytest.approx(dense[key], rel=1e-4, abs=1e-7), key
    J = jacobian(P, g, 2).double()
    singular = torch.linalg.svdvals(J)
    assert dense["condition"] == pytest.approx(float(singular[0] / singular[-1]), rel=1e-9)
    assert dense["asymmetry"] == pytest.approx(float((J - J.T).norm() / (2 * J.norm())), rel=1e-9)


# --- spectra ------------------------------------------------------------------------------------
def test_lanczos_matches_eigvalsh():
    M = _spd(30).double()
    exact = torch.linalg.eigvalsh(M)
    assert torch.allclose(lanczos(lambda v: M @ v, 30, 30), exact, atol=1e-10)
    few = lanczos(lambda v: M @ v, 30, 8)
    assert exact[0] - 1e-12 <= few[0] and few[-1] <= exact[-1] + 1e-12  # Ritz values lie inside


def test_spectrum_matches_eigvalsh_on_a_small_dense_case():
    shape, n, m = (1, 4, 4), 16, 6
    torch.manual_seed(0)
    A = torch.randn(m, n, dtype=torch.float64)
    A[5] = A[0] + A[1]  # rank 5: one measurement is redundant
    physics = DenseOperator(A, shape)
    basis = range_basis(physics, shape)
    G = A.T @ A
    eigenvalues, vectors = torch.linalg.eigh(G)
    assert basis.rank == 5 and basis.measurements == 6
    assert torch.allclose(basis.eigenvalues, eigenvalues.flip(0)[:5], rtol=1e-5)

    M = _spd(n)  # a symmetric positive definite linear preconditioner
    P = build_linear("full", channels=1, image_size=4, iterations=1)
    with torch.no_grad():
        P.matrix.copy_(M)
    root = vectors @ torch.diag(eigenvalues.clamp_min(0).sqrt()) @ vectors.T  # G^{1/2}
    expected = torch.linalg.eigvalsh(root @ M.double() @ root).flip(0)[:5]
    dense = preconditioned_spectrum(basis, P)
    assert torch.allclose(torch.tensor(dense["singular_values"], dtype=torch.float64), expected, rtol=1e-5)
    assert dense["condition"] == pytest.approx(float(expected[0] / expected[-1]), rel=1e-5)
    # Its eigenvalues are those of M·G (non-zero ones), here real and positive.
    nonzero = torch.linalg.eigvals(M.double() @ G).abs().sort(descending=True).values[:5]
    assert dense["eigen_condition"] == pytest.approx(float(nonzero[0] / nonzero[-1]), rel=1e-5)
    assert dense["max_imag"] < 1e-6 and dense["min_real"] > 0
    krylov = preconditioned_spectrum(basis, P, method="krylov", steps=5)
    assert krylov["condition"] == pytest.approx(dense["condition"], rel=1e-6)


def test_teachers_spectrum_without_vectors():
    task = make_task("mri", image_size=16)
    basis = range_basis(task.teacher, task.image_shape, vectors=False)
    assert basis.vectors is None
    # A real image's k-space is Hermitian: A_tᵀA_t has eigenvalues 1 (column and mirror kept) or ½.
    assert set(round(float(v), 6) for v in basis.eigenvalues) <= {1.0, 0.5}


# --- nonlinearity -------------------------------------------------------------------------------
def test_linear_preconditioner_has_no_linearisation_error_and_npo_is_homogeneous():
    torch.manual_seed(0)
    linear = build_linear("convolutional", channels=1, image_size=8, iterations=2)
    with torch.no_grad():
        linear.weight.add_(0.2 * torch.randn_like(linear.weight))
    g = torch.randn(1, 8, 8)
    assert max(e["error"] for e in linearization_error(linear, g, 1, epsilons=(0.1, 1.0))) < 1e-5
    P = _perturbed_npo()
    errors = linearization_error(P, g, 1)
    assert errors[-1]["error"] > 10 * errors[0]["error"]  # nonlinear: grows with ε
    homogeneity = homogeneity_error(P, g, 1)
    assert max(homogeneity[a] for a in ("0.1", "2", "10")) < 1e-5 and homogeneity["-1"] > 1e-3


# --- convergence and the command ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory, tiny_denoiser):
    folder = tmp_path_factory.mktemp("bench")
    settings = {"image_size": 16, "denoiser": str(tiny_denoiser)}
    benchmark(["spc"], ["baseline", "newton", "poly-chebyshev", "d2gp", "teacher"], out=folder / "out",
              runs=folder / "runs", iterations=2, examples=2, progress=False, task_settings=settings, limit=6,
              tune_images=4, train_images=8, val_images=4, epochs=1, batch_size=8, npo={"width": 8, "blocks": 1})
    return {"folder": folder, "settings": settings}


def test_convergence_reruns_reproduce_the_benchmark_record(tiny_benchmark, tmp_path):
    folder = tiny_benchmark["folder"]
    task = make_task("spc", **tiny_benchmark["settings"])
    result = convergence(folder / "out", task, tmp_path, horizon=3, limit=None)
    assert result["skipped"] == [] and result["images"] == 6
    stored = json.loads((tmp_path / "convergence.json").read_text())
    assert stored["horizon"] == 6 and len(stored["curves"]) == 5
    for label, curve in stored["curves"].items():
        assert len(curve["psnr"]) == 7 and len(curve["fidelity"]) == 7 and len(curve["step_norm"]) == 6
        assert curve["max_difference_to_record"] < 1e-3, label  # the benchmark's PSNR to 2K, recomputed
    for name in ("convergence.png", "convergence.md", "convergence.csv"):
        assert (tmp_path / name).is_file()
    # Without its run directory a learned method is skipped (and said so), not retrained.
    shutil.move(str(folder / "runs"), str(folder / "moved"))
    try:
        result = convergence(folder / "out", task, tmp_path / "again", horizon=1, limit=2)
        assert [s["method"] for s in result["skipped"]] == ["d2gp"] and "not retrained" in result["skipped"][0]["reason"]
        result = convergence(folder / "out", task, tmp_path / "moved", horizon=1, limit=2, runs=folder / "moved")
        assert result["skipped"] == []
    finally:
        shutil.move(str(folder / "moved"), str(folder / "runs"))


def test_analyze_writes_tables_and_figures(tiny_benchmark, tmp_path, capsys):
    folder, settings = tiny_benchmark["folder"], tiny_benchmark["settings"]
    run = folder / "runs" / "spc" / "d2gp-seed0"
    code = main(["analyze", str(run), "--task", "spc", "--image-size", "16", "--denoiser", settings["denoiser"],
                 "--at", "0,1", "--benchmark", str(folder / "out"), "--convergence-images", "2", "--horizon", "2",
                 "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| k | student A_sᵀA_s (r = 26)" in printed and "D2GP [d2gp-seed0]" in printed
    for name in ("table.md", "table.csv", "results.json", "spectra.png", "convergence.png", "convergence.md",
                 "d2gp-seed0/summary.md", "d2gp-seed0/summary.json", "d2gp-seed0/jacobian.png",
                 "d2gp-seed0/nonlinearity.png"):
        assert (tmp_path / name).is_file(), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["jacobian_method"] == "dense" and results["spectrum_method"] == "dense"
    assert results["linear"]["method"] in ("newton", "poly-chebyshev")
    assert results["sources"]["d2gp-seed0"]["summary"] == "d2gp-seed0/summary.json"
    summary = json.loads((tmp_path / "d2gp-seed0" / "summary.json").read_text())
    assert set(summary["per_k"]) == {"0", "1"} and summary["per_k"]["1"]["fd"]["median"] < 1e-2
    assert len(summary["alignment"]) == 2 and summary["label"] == "D2GP [d2gp-seed0]"


def test_analyze_api_sampled_and_krylov(tiny_benchmark, tmp_path):
    task = make_task("spc", **tiny_benchmark["settings"])
    run = tiny_benchmark["folder"] / "runs" / "spc" / "d2gp-seed0"
    results = analyze([str(run)], task, tmp_path, at=[0], jacobian_mode="sampled", spectrum_mode="krylov", sample=16,
                      lanczos_steps=10, krylov_steps=25, linear="newton", progress=False)
    assert results["jacobian_method"] == "sampled" and results["spectrum_method"] == "krylov"
    assert results["krylov_check"]["relative_error"] < 1e-9  # ±1 SPC: κ = 1, found at once
    spectrum = results["sources"]["d2gp-seed0"]["per_k"][0]["spectrum"]
    assert spectrum["singular_values"] is None and spectrum["condition"] >= 1


@pytest.mark.parametrize("argv,message", [
    (["analyze", "--task", "spc"], "nothing to analyse"),
    (["analyze", "d2gp", "--task", "spc", "--at", "1,x"], "--at must be a comma-separated list"),
    (["analyze", "d2gp", "--task", "spc", "--at", "-1"], "--at values must be integers ≥ 0"),
    (["analyze", "/nonexistent/run.pt", "--task", "spc"], "/nonexistent/run.pt does not exist"),
    (["analyze", "--task", "spc", "--benchmark", "/nonexistent/bench"], "--benchmark takes the --out folder"),
    (["analyze", "d2gp", "--task", "spc", "--images", "0"], "--images must be ≥ 1"),
])
def test_analyze_errors_are_one_line(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
