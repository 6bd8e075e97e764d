"""The hostile-input audit (issue 12) as a table: every bad input, file or fault → one line, and nothing lost.

What this module covers, row by row:
* ``FLAG_CASES``: bad flag values of every command (negative or zero counts, K, batch sizes,
  threads, NPO and DnCNN architectures, λ weights, learning rates and their schedule, σ ranges,
  task settings, devices, the safeguard's ρ, benchmark tasks/methods/seeds, analyze's counts). Each must exit 2 with one line on stderr naming the problem,
  before any data is loaded (``Task.images`` and ``Task.denoiser`` fail the test if called), and
  create nothing.
* ``PATH_CASES``: impossible output paths (a file where a folder goes, a path under a file, an
  unwritable folder, a denoiser ``--out`` that is a folder or has the suffix of its own metadata
  or checkpoint), refused the same way before any compute, for every command that writes.
* ``FILE_CASES``: hostile files: a decompression-bomb PNG, a truncated ``.gz`` MNIST, IDX files
  with 0 or 1 images, crafted denoiser and NPO weights (right ``format``, missing or mistyped
  entries, shapes asking for 10¹¹ parameters, NaN weights), corrupt, foreign or missing
  ``config.json`` in run directories (``evaluate`` and ``train --resume``). One line, exit 2,
  and every file of the case byte for byte as it was.
* Then the faults where something used to be lost or wrong with exit code 0: a denoiser ``--out``
  that would overwrite weights or another model's metadata, ``train-denoiser --resume`` with other
  settings, NaN and finitely diverged denoisers and NPOs, two processes on one run directory
  (a held lock refuses, a dead holder's lock is taken over), 16-bit grey PNGs, a limit applied
  before resizing, file permissions of atomic writes, a denoiser of another task, the NaN
  message of epoch 1.
No row may print a traceback. Heavy work is avoided: the training rows run on 16×16 images with
tiny networks and images given through a patched ``Task.images``.
"""

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import d2gp.denoisers as denoisers
from d2gp.checkpoints import LockedError, atomic_save, lock_path, write_json
from d2gp.cli import main
from d2gp.denoisers import build_dncnn, save_denoiser, shipped_denoiser_path
from d2gp.tasks.base import Task


# --- helpers ------------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (but the cache) with a hash of its bytes: equal snapshots = nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if "cache" not in p.parts}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``d2gp ARGV`` in this process: exit code, stdout, stderr (argparse exits with SystemExit)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    """The one error line (progress bars, which also go to stderr, aside)."""
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def _assert_one_line(code: int, err: str, message: str, phases: int = 0) -> None:
    """Exit code 2 and one error line naming the problem; before it only ``phases`` lines saying what
    is starting (``d2gp train`` announces its run, and that it loads the data, before it opens the run)."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 + phases and ": error: " in lines[-1], err
    assert message in lines[-1], lines[-1]


def _fill(argv, tmp_path: Path, **paths) -> list[str]:
    return [str(a).format(tmp=tmp_path, **paths) for a in argv]


@pytest.fixture
def no_compute(monkeypatch):
    """Loading data or a denoiser fails the test: the error must come before any work."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("data or a denoiser was loaded before the error")

    monkeypatch.setattr(Task, "images", refuse)
    monkeypatch.setattr(Task, "denoiser", refuse)


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").write_bytes(b"")
        (folder / ".probe").unlink()
        return True
    except OSError:
        return False


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder this process cannot write into (root ignores permissions: then /sys, read-only for all)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    chosen = next((candidate for candidate in (folder, Path("/sys")) if not _writable(candidate)), None)
    if chosen is None:
        pytest.skip("no unwritable folder on this machine")
    yield chosen
    folder.chmod(0o755)


# --- 1. bad flag values -------------------------------------------------------------------------
RECON = ["reconstruct", "--task", "spc", "--out", "{tmp}/out"]
EVAL = ["evaluate", "{tmp}/run", "--out", "{tmp}/out"]
TRAIN = ["train", "--task", "spc", "--out", "{tmp}/out"]
DEN = ["train-denoiser", "--task", "spc", "--out", "{tmp}/out/d.pt"]
BENCH = ["benchmark", "--out", "{tmp}/out", "--runs", "{tmp}/runs"]
DEMO = ["demo", "--out", "{tmp}/out"]
ANALYZE = ["analyze", "--task", "spc", "d2gp", "--out", "{tmp}/out"]

FLAG_CASES = [
    (RECON + ["-K", "-5"], "argument --iterations/-K: must be an integer ≥ 1, got -5"),
    (RECON + ["-K", "0"], "argument --iterations/-K: must be an integer ≥ 1, got 0"),
    (RECON + ["-K", "ten"], "argument --iterations/-K: expected an integer, got 'ten'"),
    (RECON + ["--limit", "0"], "argument --limit: must be an integer ≥ 1, got 0"),
    (RECON + ["--limit", "-1"], "argument --limit: must be an integer ≥ 1, got -1"),
    (RECON + ["--batch-size", "0"], "argument --batch-size: must be an integer ≥ 1, got 0"),
    (RECON + ["--batch-size", "-3"], "argument --batch-size: must be an integer ≥ 1, got -3"),
    (RECON + ["--examples", "0"], "argument --examples: must be an integer ≥ 1, got 0"),
    (RECON + ["--examples", "-2"], "argument --examples: must be an integer ≥ 1, got -2"),
    (RECON + ["--report", "1,50"], "--report values must lie in [0, 20]"),
    (RECON + ["--split", "all"], "argument --split: invalid choice: 'all'"),
    (RECON + ["--image-size", "4"], "image_size must be an integer ≥ 8, got 4"),
    (RECON + ["--noise-sigma", "-1"], "noise_sigma must be a finite number ≥ 0"),
    (RECON + ["--student-ratio", "1.5"], "student_ratio must be in (0, 1)"),
    (RECON + ["--denoiser-scale", "2"], "denoiser_scale must be in (0, 1]"),
    (RECON + ["--image-size", "24"], "spc needs an image_size that is a power of two, got 24"),
    (RECON + ["--student-step-size", "-1"], "student_step_size must be a finite number > 0, got -1.0"),
    (RECON + ["--data-seed", "-1"], "data_seed must be an integer ≥ 0, got -1"),
    (["reconstruct", "--task", "mri", "--mask-seed", "-1", "--out", "{tmp}/out"], "mask_seed must be an integer ≥ 0"),
    (RECON + ["--dataset", "nope"], "unknown dataset 'nope'; known datasets: mnist-embedded"),
    (RECON + ["--report", "a,b"], "--report must be a comma-separated list of integers, got 'a,b'"),
    (RECON + ["--preconditioner", "{tmp}/missing.pt"], "NPO weights file {tmp}/missing.pt does not exist"),
    (["reconstruct", "--task", "ct", "--out", "{tmp}/out"], "argument --task: invalid choice: 'ct'"),
    (EVAL + ["-K", "0"], "argument --iterations/-K: must be an integer ≥ 1, got 0"),
    (EVAL + ["--limit", "0"], "argument --limit: must be an integer ≥ 1, got 0"),
    (EVAL + ["--batch-size", "0"], "argument --batch-size: must be an integer ≥ 1, got 0"),
    (EVAL, "is not a training run directory (no config.json)"),
    (["--threads", "-1", "tasks"], "argument --threads: must be an integer ≥ 1, got -1"),
    (["--threads", "0", "tasks"], "argument --threads: must be an integer ≥ 1, got 0"),
    (TRAIN + ["--width", "0"], "width must be an int ≥ 1, got 0"),
    (TRAIN + ["--blocks", "0"], "blocks must be an int ≥ 1, got 0"),
    (TRAIN + ["--expansion", "-1"], "expansion must be an int ≥ 1, got -1"),
    (TRAIN + ["--kernel-size", "4"], "kernel_size must be odd"),
    (TRAIN + ["--activation", "foo"], "activation must be 'relu' or 'gelu', got 'foo'"),
    (TRAIN + ["--width", "100000"], "parameters, above 2e+08"),
    (TRAIN + ["--lambda-gradient", "-1"], "loss weight λ_gradient must be ≥ 0, got -1.0"),
    (TRAIN + ["--lambda-supervised", "nan"], "loss weight λ_supervised must be ≥ 0, got nan"),
    (TRAIN + ["--weight-decay", "-5"], "weight_decay must be a finite number ≥ 0, got -5.0"),
    (TRAIN + ["--train-images", "-3"], "train_images must be ≥ 1, or None for all (--train-images 0), got -3"),
    (TRAIN + ["--val-images", "0"], "val_images must be ≥ 1, got 0"),
    (TRAIN + ["--epochs", "0"], "epochs must be ≥ 1, got 0"),
    (TRAIN + ["--batch-size", "0"], "batch_size must be ≥ 1, got 0"),
    (TRAIN + ["--iterations", "0"], "iterations must be ≥ 1, got 0"),
    (TRAIN + ["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
    (TRAIN + ["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (TRAIN + ["--lr", "inf"], "lr must be a finite number > 0, got inf"),
    (TRAIN + ["--method", "magic"], "unknown method 'magic'"),
    (TRAIN + ["--preconditioner", "cubic"], "unknown preconditioner 'cubic'"),
    (TRAIN + ["--unroll", "truncated", "--truncate", "0"], "truncate must be in [1, iterations], got 0"),
    (TRAIN + ["--optimizer", "sgd"], "optimizer must be 'adam' or 'adamw', got 'sgd'"),
    (TRAIN + ["--profile", "huge"], "argument --profile: invalid choice: 'huge'"),
    (TRAIN + ["--updates", "0"], "updates must be ≥ 1 (or unset), got 0"),
    (TRAIN + ["--val-every", "-1"], "val_every must be ≥ 1 (or unset), got -1"),
    (TRAIN + ["--schedule", "wild"], "unknown schedule 'wild'"),
    (TRAIN + ["--warmup", "-1"], "warmup must be ≥ 0 updates, got -1"),
    (TRAIN + ["--final-lr-ratio", "2"], "final_lr_ratio must be in [0, 1], got 2.0"),
    (TRAIN + ["--grad-clip", "0"], "grad_clip must be > 0 (or unset), got 0.0"),
    (TRAIN + ["--tail", "0"], "tail must be in [1, iterations = 20], got 0"),
    (TRAIN + ["--tail", "99"], "tail must be in [1, iterations = 20], got 99"),
    (TRAIN + ["--step-size", "0"], "step_size must be a finite number > 0 (or unset: the task's 1/L), got 0.0"),
    (TRAIN + ["--step-size", "nan"], "step_size must be a finite number > 0"),
    (TRAIN + ["--step-size", "1", "--tune-step"], "give step_size (1.0) or tune_step, not both"),
    (["--import", "no_such_module_anywhere"] + TRAIN, "--import no_such_module_anywhere: ModuleNotFoundError"),
    (TRAIN + ["--device", "tpu"], "unknown device 'tpu'"),
    (RECON + ["--device", "tpu"], "unknown device 'tpu'"),
    (EVAL + ["--device", "tpu"], "unknown device 'tpu'"),
    (DEN + ["--device", "tpu"], "unknown device 'tpu'"),
    (BENCH + ["--device", "tpu"], "unknown device 'tpu'"),
    (DEMO + ["--device", "tpu"], "unknown device 'tpu'"),
    pytest.param(TRAIN + ["--device", "cuda"], "PyTorch sees no CUDA GPU on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (RECON + ["--safeguard", "0"], "argument --safeguard: must be a finite number ≥ 1, got 0"),
    (RECON + ["--safeguard", "nan"], "argument --safeguard: must be a finite number ≥ 1, got nan"),
    (EVAL + ["--safeguard", "0.5"], "argument --safeguard: must be a finite number ≥ 1, got 0.5"),
    (DEN + ["--sigma-min", "-1"], "need 0 ≤ sigma_min ≤ sigma_max"),
    (DEN + ["--sigma-max", "0"], "need 0 ≤ sigma_min ≤ sigma_max, sigma_max > 0"),
    (DEN + ["--sigma-min", "0.5"], "got 0.5, 0.2"),
    (DEN + ["--sigma-max", "inf"], "sigma_max > 0 and finite"),
    (DEN + ["--depth", "1"], "depth must be an integer ≥ 2, got 1"),
    (DEN + ["--features", "0"], "features must be an integer ≥ 1, got 0"),
    (DEN + ["--features", "100000"], "parameters, above 1e+08"),
    (DEN + ["--batch-size", "0"], "batch_size must be an integer ≥ 1, got 0"),
    (DEN + ["--batch-size", "-3"], "batch_size must be an integer ≥ 1, got -3"),
    (DEN + ["--epochs", "0"], "epochs must be an integer ≥ 1 (an untrained DnCNN is no denoiser), got 0"),
    (DEN + ["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
    (DEN + ["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (BENCH + ["--tasks", "ct"], "argument --tasks: invalid choice: 'ct'"),
    (BENCH + ["--methods", "magic"], "argument --methods: invalid choice: 'magic'"),
    (BENCH + ["--tasks", "spc", "spc"], "task(s) spc given more than once"),
    (BENCH + ["--methods", "d2gp", "baseline", "d2gp"], "method(s) d2gp given more than once"),
    (BENCH + ["--seeds", "-1"], "argument --seeds: must be an integer ≥ 0, got -1"),
    (BENCH + ["--seeds", "0", "0"], "seeds must be distinct integers ≥ 0, got [0, 0]"),
    (BENCH + ["--iterations", "0"], "argument --iterations/-K: must be an integer ≥ 1, got 0"),
    (BENCH + ["--profile", "huge"], "argument --profile: invalid choice: 'huge'"),
    (DEMO + ["--seed", "-1"], "argument --seed: must be an integer ≥ 0, got -1"),
    (ANALYZE + ["--images", "0"], "--images must be ≥ 1, got 0"),  # checked by analyze() itself
    (ANALYZE + ["--sample", "0"], "argument --sample: must be an integer ≥ 1, got 0"),
    (ANALYZE + ["--lanczos-steps", "0"], "argument --lanczos-steps: must be an integer ≥ 1, got 0"),
    (ANALYZE + ["--krylov-steps", "-2"], "argument --krylov-steps: must be an integer ≥ 1, got -2"),
    (ANALYZE + ["--fd-probes", "0"], "argument --fd-probes: must be an integer ≥ 1, got 0"),
    (ANALYZE + ["--max-dense", "-1"], "argument --max-dense: must be an integer ≥ 0, got -1"),
    (ANALYZE + ["--convergence-images", "-1"], "argument --convergence-images: must be an integer ≥ 0, got -1"),
    (ANALYZE + ["--horizon", "0"], "--horizon must be ≥ 1, got 0"),
    (ANALYZE + ["--at", "x"], "--at must be a comma-separated list of iterations, got 'x'"),
    (["analyze", "--task", "spc", "{tmp}/missing.pt", "--out", "{tmp}/out"], "NPO weights file {tmp}/missing.pt does not exist"),
    (DEMO + ["--task", "ct"], "argument --task: invalid choice: 'ct'"),
]


def _case_id(argv: list[str]) -> str:
    return " ".join(a for a in argv if "{" not in a and a not in ("--out", "--runs", "--task", "spc"))


@pytest.mark.parametrize("argv,message", FLAG_CASES,
                         ids=[_case_id(case.values[0] if hasattr(case, "values") else case[0]) for case in FLAG_CASES])
def test_bad_flag_values(argv, message, tmp_path, capsys, no_compute):
    before = _snapshot(tmp_path)
    code, _, err = _run(_fill(argv, tmp_path), capsys)
    _assert_one_line(code, err, message.format(tmp=tmp_path))
    assert _snapshot(tmp_path) == before  # nothing created


# --- 2. impossible output paths -----------------------------------------------------------------
PATH_CASES = [
    (["reconstruct", "--task", "spc", "--out", "{file}"], "--out {file} is a file, not a folder"),
    (["reconstruct", "--task", "spc", "--out", "{file}/sub"], "cannot be created: {file} is a file"),
    (["reconstruct", "--task", "spc", "--out", "{ro}/sub"], "cannot be written: no write access to {ro}"),
    (["train", "--task", "spc", "--out", "{file}"], "--out {file} is a file, not a folder"),
    (["train", "--task", "spc", "--out", "{file}/run"], "cannot be created: {file} is a file"),
    (["train", "--task", "spc", "--out", "{ro}/run"], "cannot be written"),
    (["evaluate", "{tmp}/run", "--out", "{file}"], "--out {file} is a file, not a folder"),
    (["evaluate", "{tmp}/run", "--out", "{ro}/eval"], "cannot be written"),
    (["demo", "--out", "{file}/demo"], "cannot be created: {file} is a file"),
    (["benchmark", "--out", "{file}", "--runs", "{tmp}/runs"], "--out {file} is a file, not a folder"),
    (["benchmark", "--out", "{tmp}/out", "--runs", "{file}/runs"], "--runs {file}/runs cannot be created"),
    (["benchmark", "--out", "{tmp}/out", "--runs", "{ro}/runs"], "--runs {ro}/runs cannot be written"),
    (["analyze", "--task", "spc", "d2gp", "--out", "{file}"], "--out {file} is a file, not a folder"),
    (["analyze", "--task", "spc", "d2gp", "--out", "{ro}/analysis"], "cannot be written"),
    (["train-denoiser", "--task", "spc", "--out", "{tmp}"], "--out {tmp} is a folder; give the path of a file"),
    (["train-denoiser", "--task", "spc", "--out", "{file}/d.pt"], "cannot be created: {file} is a file"),
    (["train-denoiser", "--task", "spc", "--out", "{ro}/d.pt"], "cannot be written"),
    (["train-denoiser", "--task", "spc", "--out", "{tmp}/den/weights.json"],
     "a weights file cannot end in .json, the suffix of the metadata file written beside it"),
    (["train-denoiser", "--task", "spc", "--out", "{tmp}/den/d.pt.training"], "cannot end in .training"),
]


@pytest.mark.parametrize("argv,message", PATH_CASES, ids=[f"{a[0]} {a[-1]}" for a, _ in PATH_CASES])
def test_impossible_output_paths(argv, message, tmp_path, unwritable, capsys, no_compute):
    (tmp_path / "file").write_text("a user's file\n")
    paths = dict(file=tmp_path / "file", ro=unwritable)
    before, ro_before = _snapshot(tmp_path), sorted(os.listdir(unwritable))
    code, _, err = _run(_fill(argv, tmp_path, **paths), capsys)
    _assert_one_line(code, err, message.format(tmp=tmp_path, **paths))
    assert _snapshot(tmp_path) == before and sorted(os.listdir(unwritable)) == ro_before


# --- 3. hostile files ---------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width × height grey pixels (its data is one empty chunk: never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _folder(files: dict[str, bytes], dataset: str = "folder", task: str = "spc"):
    """A reconstruct on a folder holding ``files`` (name → bytes) as ``--dataset``."""
    def setup(case: Path) -> list:
        (case / "data").mkdir()
        for name, data in files.items():
            (case / "data" / name).write_bytes(data)
        return ["reconstruct", "--task", task, "--dataset", dataset, "--data-root", case / "data", "--limit", "1"]
    return setup


def _png(value: int = 128) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _idx(images: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, 3]) + b"".join(struct.pack(">I", n) for n in images.shape) + images.tobytes()


def _bomb_folder(case: Path) -> list:
    for i in range(3):
        (case / "photos" / f"{i}.png").parent.mkdir(exist_ok=True)
        (case / "photos" / f"{i}.png").write_bytes(_png_header(20000, 20000))
    return ["reconstruct", "--task", "spc", "--dataset", "folder", "--data-root", case / "photos", "--limit", "1"]


def _truncated_gz(case: Path) -> list:
    data = gzip.compress(_idx(np.zeros((10, 28, 28), np.uint8)))
    (case / "mnist").mkdir()
    (case / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    return ["reconstruct", "--task", "spc", "--dataset", "mnist", "--data-root", case / "mnist"]


def _idx_with(count: int, stem: str, split: str):
    def setup(case: Path) -> list:
        (case / "mnist").mkdir()
        (case / "mnist" / f"{stem}-images-idx3-ubyte").write_bytes(_idx(np.zeros((count, 28, 28), np.uint8)))
        return ["reconstruct", "--task", "spc", "--dataset", "mnist", "--data-root", case / "mnist", "--split", split]
    return setup


def _denoiser_file(make_data):
    """A reconstruct whose --denoiser is a crafted file: ``make_data`` edits a real weights file's dict."""
    def setup(case: Path) -> list:
        data = {"format": "d2gp-denoiser", "architecture": {"channels": 1, "depth": 3, "features": 4},
                "state_dict": build_dncnn(1, 3, 4).state_dict(), "training": {}}
        atomic_save(make_data(data), case / "crafted.pt")
        return ["reconstruct", "--task", "spc", "--denoiser", case / "crafted.pt"]
    return setup


def _huge_state_dict(data: dict) -> dict:
    """Shapes of a DnCNN with 10⁵ features (3.6·10¹¹ bytes) in a file of a few bytes: expanded views."""
    features = 100_000
    zero = torch.zeros(1)
    data["state_dict"] = {"in_conv.weight": zero.expand(features, 1, 3, 3), "in_conv.bias": zero.expand(features),
                          "conv_list.0.weight": zero.expand(features, features, 3, 3),
                          "conv_list.0.bias": zero.expand(features),
                          "out_conv.weight": zero.expand(1, features, 3, 3), "out_conv.bias": zero.expand(1)}
    data["architecture"] = {"channels": 1, "depth": 3, "features": features}
    return data


def _nan_weights(data: dict) -> dict:
    data["state_dict"]["in_conv.weight"] = torch.full_like(data["state_dict"]["in_conv.weight"], float("nan"))
    return data


def _npo_file(edit):
    def setup(case: Path) -> list:
        from d2gp.preconditioners import NPO

        npo = NPO(channels=1, width=4, blocks=1)
        data = {"format": "d2gp-npo", "task": "spc", "task_config": {}, "kind": "npo", "npo": npo.config,
                "state_dict": npo.state_dict(), "method": "d2gp", "iterations": 3}
        atomic_save(edit(data), case / "npo.pt")
        return ["reconstruct", "--task", "spc", "--preconditioner", case / "npo.pt"]
    return setup


def _without(key):
    def edit(data: dict) -> dict:
        del data[key]
        return data
    return edit


def _run_dir(config_text: str | None, command: str):
    """A run directory with a training checkpoint and the given config.json (None: none)."""
    def setup(case: Path) -> list:
        run = case / "run"
        run.mkdir()
        (run / "checkpoint.pt").write_bytes(b"a user's training state")
        if config_text is not None:
            (run / "config.json").write_text(config_text)
        if command == "evaluate":
            return ["evaluate", run, "--out", case / "eval"]
        if command == "reconstruct":  # its results (and config.json) into the run: refused
            return ["reconstruct", "--task", "spc", "--out", run]
        return ["train", "--task", "spc", "--resume", "--out", run]
    return setup


def _missing(flag: str):
    return lambda case: ["reconstruct", "--task", "spc", flag, case / "missing.pt"]


FILE_CASES = [
    ("bomb-png", _bomb_folder, "exceeds limit of"),
    ("corrupt-png", _folder({f"{i}.png": b"not a PNG" for i in range(3)}), "cannot read image"),
    ("two-images", _folder({f"{i}.png": _png() for i in range(2)}), "need at least 3 images for a train/val/test"),
    ("empty-folder", _folder({}), "no image files (.png, .jpg, .jpeg) found under"),
    ("data-root-is-a-file", lambda case: ["reconstruct", "--task", "spc", "--dataset", "folder", "--data-root",
                                          Path(__file__)], "does not exist (or is not a folder)"),
    ("corrupt-fastmri", _folder({f"{i}.h5": b"not HDF5" for i in range(3)}, "fastmri", "mri"),
     "cannot read fastMRI file"),
    ("truncated-gz", _truncated_gz, "cannot read IDX file"),
    ("idx-0-images", _idx_with(0, "t10k", "test"), "holds 0 image(s); the test split needs at least 1"),
    ("idx-1-image", _idx_with(1, "train", "train"), "holds 1 image(s); the train split needs at least 2"),
    ("denoiser-missing", _missing("--denoiser"), "missing.pt does not exist"),
    ("npo-missing", _missing("--preconditioner"), "missing.pt does not exist"),
    ("denoiser-no-architecture", _denoiser_file(_without("architecture")), "lacks its 'architecture' entry"),
    ("denoiser-no-state-dict", _denoiser_file(_without("state_dict")), "lacks its 'state_dict' entry"),
    ("denoiser-list-state-dict", _denoiser_file(lambda d: {**d, "state_dict": [1, 2]}),
     "has a list as 'state_dict', not a dict"),
    ("denoiser-lies-about-size", _denoiser_file(lambda d: {**d, "architecture": {"channels": 1, "depth": 3,
                                                                                 "features": 100_000}}),
     "declares the architecture"),
    ("denoiser-129-GB", _denoiser_file(_huge_state_dict), "asks for a DnCNN of 9e+10 parameters"),
    ("denoiser-nan", _denoiser_file(_nan_weights), "holds NaN or infinite weights"),
    ("npo-no-task", _npo_file(_without("task")), "lacks its 'task' entry"),
    ("npo-no-state-dict", _npo_file(_without("state_dict")), "lacks its 'state_dict' entry"),
    ("npo-huge-width", _npo_file(lambda d: {**d, "npo": {**d["npo"], "width": 100_000}}), "above 2e+08"),
    ("evaluate-corrupt-config", _run_dir("{not json", "evaluate"), "config.json is corrupt or not JSON"),
    ("evaluate-list-config", _run_dir("[1, 2]", "evaluate"), "holds a JSON list, not an object"),
    ("evaluate-config-without-train", _run_dir('{"task": {}}', "evaluate"), "lacks its 'train' entry"),
    ("resume-corrupt-config", _run_dir("{not json", "train"), "config.json is corrupt or not JSON"),
    ("resume-deleted-config", _run_dir(None, "train"), "its config.json is missing"),
    ("reconstruct-into-a-run", _run_dir("{}", "reconstruct"),
     "is a training run directory; write the reconstructions elsewhere"),
]


@pytest.mark.parametrize("setup,message", [(s, m) for _, s, m in FILE_CASES], ids=[i for i, _, _ in FILE_CASES])
def test_hostile_files(setup, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("D2GP_CACHE", str(tmp_path / "cache"))
    case = tmp_path / "case"
    case.mkdir()
    argv = setup(case)
    if argv[0] == "reconstruct" and "--out" not in argv:
        argv += ["--out", case / "out"]  # never created: the error comes first
    before = _snapshot(case)
    code, _, err = _run(argv, capsys)
    _assert_one_line(code, err, message, phases=2 if argv[0] == "train" else 0)
    assert _snapshot(case) == before  # nothing written, nothing overwritten


# --- 4. faults that lost or hid work ------------------------------------------------------------
@pytest.fixture
def small_images(monkeypatch):
    """Seeded smooth 16×16 images for every split (train 16, val 8), instead of a dataset."""
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.avg_pool2d(torch.rand((24, 1, 19, 19), generator=g), 4, stride=1)

    def split_images(self, split, limit=None):
        chosen = images[:16] if split == "train" else images[16:]
        return chosen[:limit]

    monkeypatch.setattr(Task, "images", split_images)
    return images


DENOISER = ["train-denoiser", "--task", "spc", "--depth", "3", "--features", "4", "--epochs", "2", "--batch-size", "8"]


def test_denoiser_weights_and_metadata_are_never_overwritten(tmp_path, capsys, small_images):
    out = tmp_path / "den" / "d.pt"
    code, printed, _ = _run([*DENOISER, "--out", out], capsys)
    assert code == 0 and f"wrote {out} and {out.with_suffix('.json')}" in printed
    assert denoisers.load_denoiser(out).depth == 3
    assert json.loads(out.with_suffix(".json").read_text())["cli"]["depth"] == 3
    before = _snapshot(tmp_path)
    code, _, err = _run([*DENOISER, "--out", out], capsys)  # the same --out again
    assert code == 2 and f"{out} exists (a trained denoiser)" in _error_line(err)
    code, _, err = _run([*DENOISER, "--out", out.with_suffix(".pth")], capsys)  # would write d.json too
    assert code == 2 and "d.json exists (the metadata of another weights file)" in _error_line(err)
    assert _snapshot(tmp_path) == before


def _interrupted_denoiser_run(out: Path, capsys, monkeypatch) -> None:
    """Train a denoiser into ``out`` and kill it in its second epoch (16 images, batch 8: two steps an epoch)."""
    calls = {"n": 0}
    original = denoisers._augment

    def augment(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(denoisers, "_augment", augment)
    code, _, err = _run([*DENOISER, "--out", out], capsys)
    assert code == 130 and "interrupted" in err and out.with_name(out.name + ".training").is_file()
    monkeypatch.setattr(denoisers, "_augment", original)


@pytest.mark.parametrize("changed,message", [
    (["--lr", "0.01"], "lr (0.002 → 0.01)"), (["--depth", "4"], "depth (3 → 4)"),
    (["--sigma-max", "0.3"], "sigma_max (0.2 → 0.3)"), (["--epochs", "3"], "epochs (2 → 3)"),
    (["--seed", "1"], "seed (0 → 1)"), (["--batch-size", "4"], "batch_size (8 → 4)"),
])
def test_denoiser_resume_refuses_other_settings(changed, message, tmp_path, capsys, small_images, monkeypatch):
    out = tmp_path / "d.pt"
    _interrupted_denoiser_run(out, capsys, monkeypatch)
    before = _snapshot(tmp_path)
    code, _, err = _run([*DENOISER, *changed, "--resume", "--out", out], capsys)
    assert code == 2 and message in _error_line(err) and "other settings" in _error_line(err)
    assert _snapshot(tmp_path) == before and not out.exists()
    code, _, _ = _run([*DENOISER, "--resume", "--out", out], capsys)  # the same settings: it finishes
    assert code == 0 and out.is_file() and not out.with_name("d.pt.training").exists()


def test_denoiser_resume_refuses_other_images(tmp_path, capsys, small_images, monkeypatch):
    out = tmp_path / "d.pt"
    _interrupted_denoiser_run(out, capsys, monkeypatch)
    monkeypatch.setattr(Task, "images", lambda self, split, limit=None: 1 - small_images[:16] if split == "train"
                        else small_images[16:])
    code, _, err = _run([*DENOISER, "--resume", "--out", out], capsys)
    assert code == 2 and "train_images (" in _error_line(err)


def test_diverged_denoiser_is_not_saved(tmp_path, capsys, small_images):
    out = tmp_path / "d.pt"
    code, _, err = _run([*DENOISER, "--epochs", "1", "--lr", "1e6", "--out", out], capsys)
    line = _error_line(err)
    assert code == 2 and ("diverged" in line or "the loss became" in line) and "lower --lr" in line
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_nan_weights_are_never_saved(tmp_path):
    model = build_dncnn(1, 3, 4)
    with torch.no_grad():
        model.in_conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(denoisers.DenoiserError, match="NaN or infinite"):
        save_denoiser(model, tmp_path / "d.pt")
    assert not (tmp_path / "d.pt").exists()


TRAIN_TINY = ["train", "--task", "spc", "--image-size", "16", "--train-images", "16", "--val-images", "8",
              "--epochs", "2", "--iterations", "3", "--batch-size", "8", "--width", "8", "--blocks", "1"]


def test_finitely_diverged_npo_training_fails(tmp_path, capsys, small_images, tiny_denoiser):
    run = tmp_path / "run"
    # lr 1 without the default gradient clipping (which alone keeps this tiny run from diverging)
    code, _, err = _run([*TRAIN_TINY, "--denoiser", tiny_denoiser, "--lr", "1", "--grad-clip", "1e12", "--out", run],
                        capsys)
    line = _error_line(err)
    assert code == 2 and "training diverged: the best validation PSNR" in line and "lower --lr" in line
    assert not (run / "summary.json").exists()  # not a finished run: demo/benchmark never reuse it


@pytest.mark.parametrize("best,identity,diverged", [
    (float("nan"), 20.0, True), (-float("inf"), 20.0, True), (-184.0, 20.0, True), (16.99, 20.0, True),
    (17.0, 20.0, False), (19.5, 20.0, False), (25.0, 20.0, False),
])
def test_divergence_rule(best, identity, diverged):
    from d2gp.training import TrainingError, check_not_diverged

    if diverged:
        with pytest.raises(TrainingError, match="training diverged"):
            check_not_diverged(best, identity)
    else:
        check_not_diverged(best, identity)


def test_nan_in_epoch_one_names_no_checkpoint(tmp_path, small_images, tiny_denoiser, monkeypatch):
    import d2gp.training as training
    from d2gp.tasks import make_task

    original = training._loss

    def nan_loss(*args, **kwargs):
        loss, terms = original(*args, **kwargs)
        return loss * float("nan"), terms

    monkeypatch.setattr(training, "_loss", nan_loss)
    config = training.TrainConfig(task="spc", task_settings={"image_size": 16, "denoiser": str(tiny_denoiser)},
                                  iterations=2, epochs=1, batch_size=8, train_images=16, val_images=8,
                                  npo={"width": 8, "blocks": 1})
    with pytest.raises(training.TrainingError) as error:
        training.train(config, tmp_path / "run", progress=False, task=make_task("spc", **config.task_settings))
    assert "no checkpoint had been written yet" in str(error.value) and "last good checkpoint" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / ".lock").exists()


_HOLDER = """
import sys, time
from d2gp.checkpoints import lock_path
with lock_path(sys.argv[1], "test"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_run_directory_in_use_is_refused_and_a_dead_holder_is_taken_over(tmp_path, capsys, no_compute):
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(denoisers.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run / ".lock")], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(tmp_path)
        code, _, err = _run(["train", "--task", "spc", "--out", run], capsys)
        _assert_one_line(code, err, f"run directory {run} is in use by another d2gp process (PID {holder.pid})",
                         phases=2)
        assert _snapshot(tmp_path) == before  # no config.json of a second run
    finally:
        holder.kill()  # dies without releasing: its lock file stays behind
        holder.wait()
    assert (run / ".lock").read_text().strip() == str(holder.pid)
    with lock_path(run / ".lock", "run") as lock:  # the kernel released the dead holder's lock
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(LockedError, match=f"PID {os.getpid()}"):  # and it now holds for everyone else
            with lock_path(run / ".lock", "run"):
                pass
    assert not (run / ".lock").exists()


def test_a_stale_lock_file_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text("999999\n")
    with lock_path(tmp_path / ".lock", "run") as lock:
        assert lock.read_text() == f"{os.getpid()}\n"


def test_sixteen_bit_grey_pngs_are_scaled_by_their_depth(tmp_path, monkeypatch):
    from PIL import Image

    from d2gp.data import load_images

    monkeypatch.setenv("D2GP_CACHE", str(tmp_path / "cache"))
    grey = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 … 65535
    for i in range(3):
        Image.fromarray(grey).save(tmp_path / f"{i}.png")
    assert Image.open(tmp_path / "0.png").mode == "I;16"
    images = load_images("folder", "test", root=tmp_path, image_size=16)
    expected = torch.from_numpy((grey / 65535.0).astype(np.float32))
    assert images.shape == (1, 3, 16, 16)
    for channel in range(3):
        assert torch.equal(images[0, channel], expected)
    assert images.max() == 1.0 and (images == 1.0).sum() == 3  # only the one white pixel, not 99.8 %


@pytest.mark.parametrize("name,split", [("mnist-embedded", "test"), ("mni152", "val"), ("lfw", "test"),
                                        ("skimage", "val")])
def test_a_limit_is_applied_before_resizing(name, split, monkeypatch):
    import d2gp.data.embedded as embedded
    from d2gp.data import load_images

    resized, original = [], embedded.resize
    monkeypatch.setattr(embedded, "resize", lambda images, *a, **k: resized.append(len(images)) or original(images, *a, **k))
    first = load_images(name, split, max_images=2, cache=False)
    assert len(first) == 2 and sum(resized) <= 2  # never the whole split
    torch.testing.assert_close(first, load_images(name, split, cache=False)[:2], rtol=0, atol=0)


def test_task_images_pass_the_limit_down(monkeypatch):
    import d2gp.data as data
    from d2gp.tasks import TaskError, make_task

    seen = {}
    monkeypatch.setattr(data, "load_images", lambda *a, **k: seen.update(k) or torch.zeros(2, 1, 32, 32))
    assert make_task("spc").images("test", limit=2).shape == (2, 1, 32, 32) and seen["max_images"] == 2
    for bad in (0, -1, 2.5):
        with pytest.raises(TaskError, match="image limit must be an integer ≥ 1"):
            make_task("spc").images("test", limit=bad)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(umask, mode, tmp_path):
    previous = os.umask(umask)
    try:
        write_json({"a": 1}, tmp_path / "results.json")
        atomic_save({"a": torch.zeros(1)}, tmp_path / "weights.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "weights.pt").stat().st_mode & 0o777 == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "weights.pt"]  # no temporary left


def test_a_denoiser_of_another_task_warns_in_one_line(tmp_path, capsys):
    code, _, err = _run(["reconstruct", "--task", "spc", "--denoiser", shipped_denoiser_path("mri"), "--limit", "1",
                         "-K", "1", "--examples", "1", "--out", tmp_path / "out"], capsys)
    assert code == 0 and (f"d2gp reconstruct: warning: the denoiser {shipped_denoiser_path('mri')} was trained for "
                          f"task 'mri', not 'spc'") in err.splitlines()


def test_evaluate_runs_refuses_zero_iterations(tmp_path):
    from d2gp.apps import evaluate_runs
    from d2gp.checkpoints import CheckpointError

    (tmp_path / "config.json").write_text(json.dumps({"train": {"task": "spc"}, "task": {}}))
    with pytest.raises(CheckpointError, match="iterations must be ≥ 1, got 0"):
        evaluate_runs([tmp_path], iterations=0)


def test_tasks_that_share_their_images_share_denoisers_without_a_warning(tmp_path):
    import warnings

    save_denoiser(build_dncnn(1, 3, 4), tmp_path / "d.pt", {"task": {"task": "spc-binary"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # spc-binary uses spc's denoiser: the same digits
        denoisers.load_denoiser(tmp_path / "d.pt", task="spc")
    with pytest.warns(UserWarning, match="trained for task 'spc-binary', not 'mri'"):
        denoisers.load_denoiser(tmp_path / "d.pt", task="mri")
