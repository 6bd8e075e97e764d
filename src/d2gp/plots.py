"""Every figure d2gp writes (PNG, matplotlib's Agg backend: no screen needed)."""

from __future__ import annotations

import math
import os
import textwrap
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["image_grid", "psnr_curves", "examples_figure", "spectra_figure", "stencil_figure",
           "nonlinearity_figure", "convergence_figure"]


def _save(fig, path: str | os.PathLike, title: str | None = None, fontsize: int = 9) -> None:
    """Title (if any), tight layout, PNG at 110 dpi, and the figure closed."""
    if title:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _to_display(image: torch.Tensor):
    image = image.detach().float().clamp(0, 1).cpu()
    if image.shape[0] == 1:
        return image[0].numpy(), "gray"
    return image.permute(1, 2, 0).numpy(), None


def image_grid(rows: Mapping[str, torch.Tensor], path: str | os.PathLike, captions: Mapping[str, Sequence[str]] | None = None,
               title: str | None = None) -> None:
    """One row per entry of ``rows`` (label → ``(N, C, H, W)`` images), N columns, saved as PNG.

    :param captions: optional per-image captions (e.g. PSNR) for some rows.
    """
    labels = list(rows)
    columns = min(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(labels), columns, figsize=(1.6 * columns + 1.2, 1.7 * len(labels)), squeeze=False)
    for r, label in enumerate(labels):
        for c in range(columns):
            ax = axes[r][c]
            data, cmap = _to_display(rows[label][c])
            ax.imshow(data, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if captions and label in captions:
                ax.set_title(captions[label][c], fontsize=7)
            if c == 0:
                ax.set_ylabel(textwrap.fill(label, 20), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()) if title else None)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def psnr_curves(curves: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str | None = None,
                train_iterations: int | None = None, span: float = 15.0) -> None:
    """PSNR against iteration k (k = 0 is the initial estimate), one line per method.

    The y axis shows at most ``span`` dB below the highest value (a diverging method would
    otherwise flatten every other curve); the axis label says when it is clipped.
    """
    many = len(curves) > 6
    fig, ax = plt.subplots(figsize=(8.5 if many else 5, 4.2 if many else 3.4))
    for i, (label, values) in enumerate(curves.items()):
        ax.plot(range(len(values)), values, label=label, lw=1.5, ls="-" if i < 10 else "--")
    if train_iterations is not None:
        ax.axvline(train_iterations, color="grey", ls=":", lw=1)
    finite = [v for values in curves.values() for v in values if math.isfinite(v)]
    clipped = bool(finite) and max(finite) - min(finite) > span
    if clipped:
        ax.set_ylim(max(finite) - span, max(finite) + 0.05 * span)
    ax.set_xlabel("iteration k")
    ax.set_ylabel(f"PSNR (dB){', clipped' if clipped else ''}")
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, path)


def examples_figure(images: torch.Tensor, runs: Sequence, k: int, path: str | os.PathLike, title: str) -> None:
    """Ground truth and each run's reconstructions (``SolverRun.examples``, kept at iteration ``k``),
    captioned with their PSNR."""
    indices = runs[0].example_indices
    for run in runs:
        if run.examples_at != k:
            raise ValueError(f"{run.label}: its examples were kept at iteration {run.examples_at}, not {k}")
    grid = {"ground truth": images[indices], **{run.label: run.examples for run in runs}}
    captions = {run.label: [f"{float(run.psnr[k][i]):.1f} dB" for i in indices] for run in runs}
    image_grid(grid, path, captions, title=title)


#: Styles of the fixed operators of a spectra figure (student, teacher, a linear preconditioner), drawn so
#: that they stay visible where they coincide (e.g. a projector's flat spectrum), then of the learned ones.
_FIXED_STYLES = [dict(color="black", lw=3.0, alpha=0.35), dict(color="tab:orange", lw=1.6, ls="--"),
                 dict(color="tab:green", lw=1.6, ls=":")]
_LEARNED_COLOURS = ["tab:red", "tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:olive"]


def _spectrum_style(i: int, fixed: int) -> dict:
    if i < fixed:
        return _FIXED_STYLES[i % len(_FIXED_STYLES)]
    return dict(color=_LEARNED_COLOURS[(i - fixed) % len(_LEARNED_COLOURS)], lw=1.3)


def spectra_figure(spectra: Mapping[str, Sequence[float]], conditions: Mapping[str, Mapping[int, float]],
                   path: str | os.PathLike, title: str | None = None, fixed: int = 3) -> None:
    """Left: each spectrum's values sorted, divided by its largest, against their rank i/r (log scale).
    Right: condition number against the iteration k, one line per method (flat for fixed operators).
    The first ``fixed`` entries of each mapping are fixed operators (student, teacher, linear)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, values) in enumerate(spectra.items()):
        values = sorted((float(v) for v in values), reverse=True)
        top = values[0] if values and values[0] > 0 else 1.0
        fractions = [(j + 0.5) / len(values) for j in range(len(values))]
        left.plot(fractions, [v / top for v in values], label=f"{label} (r = {len(values)})",
                  **_spectrum_style(i, fixed))
    left.set_yscale("log")
    left.set_xlabel("i / r (sorted)")
    left.set_ylabel("σ_i / σ_max")
    left.grid(alpha=0.3)
    left.legend(fontsize=6)
    for i, (label, by_k) in enumerate(conditions.items()):
        ks = sorted(by_k)
        right.plot(ks, [by_k[k] for k in ks], marker="o", ms=3, label=label, **_spectrum_style(i, fixed))
    right.set_yscale("log")
    right.set_xlabel("iteration k")
    right.set_ylabel("κ on range(A_sᵀ) (teacher: its own)")
    right.grid(alpha=0.3)
    right.legend(fontsize=6)
    _save(fig, path, title)


def stencil_figure(stencils: Mapping[str, Sequence[Sequence[float]]], path: str | os.PathLike,
                   title: str | None = None) -> None:
    """One heat map per entry: a (2ρ+1)×(2ρ+1) window of a Jacobian's rows around their own pixel,
    with a symmetric colour scale clipped to the largest off-centre value (the centre, ≈ 1, would
    hide everything else) and the centre value in the caption."""
    import numpy as np

    labels = list(stencils)
    fig, axes = plt.subplots(1, len(labels), figsize=(2.6 * len(labels) + 0.6, 2.9), squeeze=False)
    for ax, label in zip(axes[0], labels):
        data = np.asarray(stencils[label], dtype=float)
        centre = data[data.shape[0] // 2, data.shape[1] // 2]
        off = data.copy()
        off[data.shape[0] // 2, data.shape[1] // 2] = 0.0
        limit = float(np.abs(off).max()) or 1.0
        image = ax.imshow(data, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"{label}\ncentre {centre:.3f}, colour ±{limit:.2g}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    _save(fig, path, title, fontsize=8)


def nonlinearity_figure(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | os.PathLike,
                        title: str | None = None) -> None:
    """‖P(g + εh) − P(g) − εJh‖/(ε‖h‖) against ε (``[{"eps", "error"}, …]`` per entry), log–log."""
    fig, ax = plt.subplots(figsize=(4.6, 3.3))
    for label, points in curves.items():
        ax.plot([p["eps"] for p in points], [max(p["error"], 1e-16) for p in points], marker="o", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ε (‖εh‖ / ‖g‖)")
    ax.set_ylabel("‖P(g+εh) − P(g) − εJh‖ / ε‖h‖")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    _save(fig, path)


def convergence_figure(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike,
                       title: str | None = None, train_iterations: int | None = None, span: float = 15.0) -> None:
    """The paper's Fig. 3: PSNR to the ground truth, data fidelity f(x_k) and ‖x_{k+1} − x_k‖ against
    k, one line per method (``{"psnr", "fidelity", "step_norm"}`` each). The PSNR axis shows at most
    ``span`` dB below the best value, as :func:`psnr_curves`."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("psnr", "PSNR (dB)", False), ("fidelity", "f(x_k) = ½‖A x_k − y‖²", True),
              ("step_norm", "‖x_{k+1} − x_k‖", True))
    for ax, (key, ylabel, log) in zip(axes, panels):
        for i, (label, curve) in enumerate(curves.items()):
            values = curve[key]
            ax.plot(range(len(values)), values, label=label, lw=1.3, ls="-" if i < 10 else "--")
        if train_iterations is not None:
            ax.axvline(train_iterations, color="grey", ls=":", lw=1)
        if log:
            ax.set_yscale("log")
            later = [v for curve in curves.values() for v in curve[key][1:] if math.isfinite(v) and v > 0]
            if later:  # f(x_0) of γAᵀy can be ~0 (AAᵀ = I): keep the scale of the iterations themselves
                ax.set_ylim(bottom=0.5 * min(later))
        ax.set_xlabel("iteration k")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    finite = [v for curve in curves.values() for v in curve["psnr"] if math.isfinite(v)]
    if finite and max(finite) - min(finite) > span:
        axes[0].set_ylim(max(finite) - span, max(finite) + 0.05 * span)
        axes[0].set_ylabel("PSNR (dB), clipped")
    axes[2].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path, title)
