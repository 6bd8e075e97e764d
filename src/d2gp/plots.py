"""Every figure d2gp writes (PNG, matplotlib's Agg backend: no screen needed).

Each function saves its figure and returns the :class:`matplotlib.figure.Figure`, closed (it
holds no pyplot state) but still whole: its axes, lines, texts and images can be inspected,
which is how the tests check the layout.
"""

from __future__ import annotations

import math
import os
import textwrap
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["image_grid", "psnr_curves", "examples_figure", "curve_style", "ERROR_SCALE", "spectra_figure",
           "stencil_figure", "nonlinearity_figure", "convergence_figure"]

_COLORS = matplotlib.colormaps["tab10"].colors
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")

#: Upper end of the colour scale of the error maps |x̂ − x| (images in [0, 1]); larger errors saturate.
ERROR_SCALE = 0.25


def curve_style(index: int) -> dict:
    """Colour, dash pattern and marker of the ``index``-th curve of a figure.

    The three cycle with periods 10, 4 and 12, so no two of the first 60 curves look alike.
    """
    return {"color": _COLORS[index % len(_COLORS)], "linestyle": _LINESTYLES[index % len(_LINESTYLES)],
            "marker": _MARKERS[index % len(_MARKERS)]}


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


def _bare(ax) -> None:
    """No frame (the axes have no ticks; their labels stay visible)."""
    for spine in ax.spines.values():
        spine.set_visible(False)


def image_grid(columns: Mapping[str, torch.Tensor], path: str | os.PathLike,
               captions: Mapping[str, Sequence[str]] | None = None, title: str | None = None,
               reference: str | None = None, error_scale: float = ERROR_SCALE):
    """Images side by side: one column per entry of ``columns`` (label → ``(N, C, H, W)``), one row
    per image (N rows), saved as PNG.

    With ``reference`` (the label of the ground-truth column, drawn first), every row of images is
    followed by a row of error maps |x̂ − x| (mean over channels) of the other columns, on one colour
    scale from 0 (black) to ``error_scale`` (white; larger errors saturate), so that methods whose
    images look alike can still be told apart.

    :param captions: per-image captions (e.g. PSNR) under the images of some columns.
    :return: the figure (closed).
    """
    labels = list(columns)
    if reference is not None:
        if reference not in columns:
            raise ValueError(f"reference column {reference!r} is not one of {labels}")
        labels = [reference] + [label for label in labels if label != reference]
    count = min(len(v) for v in columns.values())
    per_image = 2 if reference is not None else 1  # an image row, and its error row
    rows = count * per_image
    # fixed margins in inches (tight_layout costs seconds on a grid of a hundred axes)
    cell, gap_w, gap_h, left, right, bottom = 1.1, 0.08, 0.22, 0.45, 0.08, 0.22
    top = 0.5 + (0.3 if title else 0)  # column titles of up to three lines, and the figure title
    width = left + len(labels) * cell + (len(labels) - 1) * gap_w + right
    height = top + rows * cell + (rows - 1) * gap_h + bottom
    fig, axes = plt.subplots(rows, len(labels), figsize=(width, height), squeeze=False,
                             subplot_kw={"xticks": [], "yticks": []})
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=gap_w / cell, hspace=gap_h / cell)
    for c, label in enumerate(labels):
        axes[0][c].set_title(textwrap.fill(label, 16), fontsize=7)
        for i in range(count):
            ax = axes[i * per_image][c]
            data, cmap = _to_display(columns[label][i])
            ax.imshow(data, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            _bare(ax)
            if captions and label in captions:
                ax.set_xlabel(captions[label][i], fontsize=7, labelpad=2)
            if c == 0:
                ax.set_ylabel(f"image {i + 1}", fontsize=7)
            if reference is None:
                continue
            ax = axes[i * per_image + 1][c]
            _bare(ax)
            if label == reference:
                ax.set_ylabel(f"|x̂ − x|\n0 … {error_scale:g}", fontsize=7)
                continue
            error = (columns[label][i].detach().float().cpu() - columns[reference][i].detach().float().cpu()).abs().mean(0)
            ax.imshow(error.numpy(), cmap="magma", vmin=0, vmax=error_scale, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.1 / height, va="top")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def psnr_curves(curves: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str | None = None,
                train_iterations: int | None = None, span: float = 15.0):
    """PSNR against iteration k (k = 0 is the initial estimate), one line per method, saved as PNG.

    Every method has its own colour, dash pattern and marker (:func:`curve_style`), and the markers
    of successive methods sit on different iterations, so a curve lying on another stays visible.
    The iteration axis has integer ticks. ``train_iterations`` (K) is drawn as a dotted vertical
    line, named in the legend. The y axis shows at most ``span`` dB below the highest value (a
    diverging method would otherwise flatten every other curve); when it clips, a note under the
    axes says so, and the curves that fall below it after their best iterate (that diverge) are
    marked ↓.

    :return: the figure (closed).
    """
    many = len(curves) > 6
    longest = max((len(values) for values in curves.values()), default=1)
    every = max(1, round(longest / 8))  # a marker every few iterations, shifted from one method to the next
    finite = [v for values in curves.values() for v in values if math.isfinite(v)]
    clipped = bool(finite) and max(finite) - min(finite) > span
    low = max(finite) - span if clipped else -math.inf

    fig, ax = plt.subplots(figsize=(8.5 if many else 5.5, 4.4 if many else 3.8))
    falls = set()
    for i, (label, values) in enumerate(curves.items()):
        best = max(range(len(values)), key=lambda k: values[k] if math.isfinite(values[k]) else -math.inf, default=0)
        if clipped and any(not (math.isfinite(v) and v >= low) for v in values[best:]):
            falls.add(label)
        ax.plot(range(len(values)), values, label=f"{label} ↓" if label in falls else label, lw=1.4, ms=4,
                markevery=(i % every, every), **curve_style(i))
    if train_iterations is not None:
        ax.axvline(train_iterations, color="grey", ls=":", lw=1, label=f"K = {train_iterations}: iterations trained for")
    if clipped:
        ax.set_ylim(low, max(finite) + 0.05 * span)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration k")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    bottom = 0.0
    if clipped:
        why = "↓: the curve falls below it after its best iterate (diverges)" if falls else \
            "the first iterates of some curves lie below it"
        fig.text(0.01, 0.01, f"y axis clipped at {low:.1f} dB ({span:g} dB below the best); {why}", fontsize=7,
                 va="bottom")
        bottom = 0.3 / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def examples_figure(images: torch.Tensor, runs: Sequence, k: int, path: str | os.PathLike, title: str):
    """Ground truth, then each run's reconstructions (``SolverRun.examples``, kept at iteration ``k``)
    as columns captioned with their PSNR, each row of images followed by its error maps
    (:func:`image_grid`).

    :return: the figure (closed).
    """
    indices = runs[0].example_indices
    for run in runs:
        if run.examples_at != k:
            raise ValueError(f"{run.label}: its examples were kept at iteration {run.examples_at}, not {k}")
    grid = {"ground truth": images[indices], **{run.label: run.examples for run in runs}}
    captions = {run.label: [f"{float(run.psnr[k][i]):.1f} dB" for i in indices] for run in runs}
    return image_grid(grid, path, captions, title=title, reference="ground truth")


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
