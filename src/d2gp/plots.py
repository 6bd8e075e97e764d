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

__all__ = ["image_grid", "psnr_curves", "examples_figure", "curve_style", "ERROR_SCALE"]

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
