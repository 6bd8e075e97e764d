"""Every figure d2gp writes (PNG, matplotlib's Agg backend: no screen needed)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["image_grid", "psnr_curves", "examples_figure"]


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
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def psnr_curves(curves: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str | None = None,
                train_iterations: int | None = None) -> None:
    """PSNR against iteration k (k = 0 is the initial estimate), one line per method."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, values in curves.items():
        ax.plot(range(len(values)), values, label=label, lw=1.5)
    if train_iterations is not None:
        ax.axvline(train_iterations, color="grey", ls=":", lw=1)
    ax.set_xlabel("iteration k")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def examples_figure(images: torch.Tensor, runs: Sequence, k: int, path: str | os.PathLike, title: str) -> None:
    """Ground truth and each run's reconstructions (``SolverRun.examples``), captioned with PSNR at ``k``."""
    indices = runs[0].example_indices
    grid = {"ground truth": images[indices], **{run.label: run.examples for run in runs}}
    captions = {run.label: [f"{float(run.psnr[k][i]):.1f} dB" for i in indices] for run in runs}
    image_grid(grid, path, captions, title=title)
