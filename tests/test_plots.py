"""The figures, checked on the matplotlib objects (layout, styles, ticks, legend, data), not on pixels."""

import math

import pytest
import torch

from d2gp.evaluation import SolverRun
from d2gp.plots import ERROR_SCALE, curve_style, examples_figure, image_grid, psnr_curves


def _style(line):
    return line.get_color(), line.get_linestyle(), line.get_marker()


def _curves(n, length=21):
    return {f"method {i}": [20 + 5 * (1 - math.exp(-k / (2 + i))) for k in range(length)] for i in range(n)}


def test_no_two_of_sixty_curves_look_alike():
    styles = [tuple(map(str, curve_style(i).values())) for i in range(60)]
    assert len(set(styles)) == 60
    assert curve_style(60) == curve_style(0)


def test_psnr_curves_distinct_styles_and_shifted_markers(tmp_path):
    fig = psnr_curves(_curves(16, length=41), tmp_path / "c.png", train_iterations=20)
    assert (tmp_path / "c.png").is_file()
    ax = fig.axes[0]
    curves = [line for line in ax.get_lines() if line.get_label().startswith("method")]
    assert len(curves) == 16 and len({_style(line) for line in curves}) == 16
    every = round(41 / 8)
    assert [line.get_markevery() for line in curves[:7]] == [(i % every, every) for i in range(7)]


def test_psnr_curves_integer_iteration_ticks(tmp_path):
    fig = psnr_curves(_curves(2, length=5), tmp_path / "c.png")  # k = 0 … 4: matplotlib alone would tick 0.5, 1.5, …
    ticks = [t for t in fig.axes[0].get_xticks() if 0 <= t <= 4]
    assert ticks == [0, 1, 2, 3, 4]


def test_the_dotted_line_at_k_is_named_in_the_legend(tmp_path):
    fig = psnr_curves(_curves(3), tmp_path / "c.png", train_iterations=10)
    ax = fig.axes[0]
    k_line = [line for line in ax.get_lines() if line.get_label().startswith("K =")]
    assert len(k_line) == 1 and list(k_line[0].get_xdata()) == [10, 10] and k_line[0].get_linestyle() == ":"
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["method 0", "method 1", "method 2", "K = 10: iterations trained for"]
    assert fig.texts == []  # nothing clipped: no note
    no_k = psnr_curves(_curves(3), tmp_path / "d.png")
    assert [t.get_text() for t in no_k.axes[0].get_legend().get_texts()] == ["method 0", "method 1", "method 2"]


def test_clipping_is_explained_and_the_curves_that_diverge_are_marked(tmp_path):
    curves = {"rises": [5.0, 25.0, 30.0, 30.0], "diverges": [20.0, 25.0, 10.0, -50.0], "nan": [20.0, 24.0, math.nan, math.nan]}
    fig = psnr_curves(curves, tmp_path / "c.png", span=15.0)
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == pytest.approx(15.0)
    # "rises" starts below the axis (its initial estimate) but does not diverge: not marked
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["rises", "diverges ↓", "nan ↓"]
    assert [t.get_text() for t in fig.texts] == [
        "y axis clipped at 15.0 dB (15 dB below the best); ↓: the curve falls below it after its best iterate (diverges)"]
    assert ax.get_ylabel() == "PSNR (dB)"
    start_low = psnr_curves({"rises": [5.0, 25.0, 30.0], "teacher": [20.0, 31.0, 32.0]}, tmp_path / "d.png")
    assert [t.get_text() for t in start_low.axes[0].get_legend().get_texts()] == ["rises", "teacher"]
    assert [t.get_text() for t in start_low.texts] == [
        "y axis clipped at 17.0 dB (15 dB below the best); the first iterates of some curves lie below it"]


def _run(label, examples, k=2, indices=(0, 2)):
    psnr = {k: torch.tensor([20.04, 21.0, 22.26])}
    return SolverRun(label, k, psnr=psnr, examples=examples, examples_at=k, example_indices=list(indices))


def test_examples_figure_methods_as_columns_with_error_maps(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(3, 1, 6, 6)
    first, second = images[[0, 2]] * 0.5, images[[0, 2]].flip(-1)
    fig = examples_figure(images, [_run("student", first), _run("D2GP", second)], 2, tmp_path / "e.png", "spc")
    assert (tmp_path / "e.png").is_file()
    grid = {(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start): ax for ax in fig.axes}
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (4, 3)  # 2 images × (image, error) rows
    assert [grid[0, c].get_title() for c in range(3)] == ["ground truth", "student", "D2GP"]
    assert fig._suptitle.get_text() == "spc"
    for row, image in enumerate((0, 2)):
        torch.testing.assert_close(torch.as_tensor(grid[2 * row, 0].images[0].get_array()), images[image, 0])
        assert grid[2 * row, 1].get_xlabel() == f"{[20.04, 21.0, 22.26][image]:.1f} dB"
        errors = grid[2 * row + 1, 0]
        assert len(errors.images) == 0 and errors.get_ylabel() == f"|x̂ − x|\n0 … {ERROR_SCALE:g}"
        for col, estimate in ((1, first), (2, second)):
            shown = grid[2 * row + 1, col].images[0]
            expected = (estimate[row] - images[image]).abs().mean(0)
            torch.testing.assert_close(torch.as_tensor(shown.get_array()), expected)
            assert shown.get_clim() == (0, ERROR_SCALE)


def test_sixteen_methods_grow_the_grid_sideways(tmp_path):
    images = torch.rand(1, 3, 4, 4)
    columns = {"ground truth": images, **{f"method {i}": images for i in range(16)}}
    fig = image_grid(columns, tmp_path / "g.png", reference="ground truth")
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (2, 17)  # one image: its row, its errors
    width, height = fig.get_size_inches()
    assert width > 5 * height


def test_grid_without_reference_has_no_error_rows(tmp_path):
    images = torch.rand(3, 1, 4, 4)
    fig = image_grid({"a": images, "b": images}, tmp_path / "g.png", captions={"b": ["x", "y", "z"]})
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (3, 2)
    assert all(len(ax.images) == 1 for ax in fig.axes)
    assert [ax.get_xlabel() for ax in fig.axes] == ["", "x", "", "y", "", "z"]
    with pytest.raises(ValueError, match="reference column 'truth' is not one of"):
        image_grid({"a": images}, tmp_path / "i.png", reference="truth")
