"""The `d2gp` command end to end on tiny runs, and its one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from d2gp.cli import main
from d2gp.device import use_bf16


def test_help_of_every_subcommand(capsys):
    for command in ([], ["tasks"], ["datasets"], ["reconstruct"], ["analyze"], ["train-denoiser"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
    assert "--student-ratio" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "d2gp.cli", "tasks"], capture_output=True, text=True, check=True).stdout
    assert "spc:" in out and "mri:" in out and "sr:" in out


def test_reconstruct_writes_results(tmp_path, capsys):
    out = tmp_path / "rec"
    code = main(["reconstruct", "--task", "spc", "--limit", "4", "-K", "3", "--report", "1,3", "--examples", "2",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| student | 3 |" in printed and "| teacher | 3 |" in printed
    for name in ("table.md", "table.csv", "results.json", "config.json", "examples.png", "psnr_curves.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 4 and len(results["runs"][0]["psnr_per_iteration"]) == 4
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["task"] == "spc" and config["environment"]["command"]


def test_task_flags_override_defaults(tmp_path, capsys):
    code = main(["reconstruct", "--task", "spc", "--student-ratio", "0.05", "--limit", "2", "-K", "1",
                 "--out", str(tmp_path)])
    assert code == 0
    assert "student 51/1024" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["reconstruct", "--task", "mri", "--student-ratio", "0.1"], "task 'mri' has no setting student_ratio"),
    (["reconstruct", "--task", "spc", "--student-ratio", "1.5"], "student_ratio must be in (0, 1)"),
    (["reconstruct", "--task", "spc", "--dataset", "mnist"], "root"),
    (["reconstruct", "--task", "spc", "--dataset", "mnist", "--data-root", "/nonexistent/mnist"], "/nonexistent/mnist"),
    (["reconstruct", "--task", "spc", "--report", "1,50", "-K", "20"], "--report values must lie in [0, 20]"),
])
def test_clear_errors(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_corrupt_denoiser_file(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    assert main(["reconstruct", "--task", "spc", "--denoiser", str(bad), "--limit", "2", "--out", str(tmp_path)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_train_denoiser_tiny_and_refuses_stale_checkpoint(tmp_path, capsys, monkeypatch):
    import d2gp.tasks.base as base

    g = torch.Generator().manual_seed(0)  # smooth seeded images: a denoiser can learn them (random ones can fail)
    small = torch.nn.functional.avg_pool2d(torch.rand((16, 1, 35, 35), generator=g), 4, stride=1)
    monkeypatch.setattr(base.Task, "images", lambda self, split, limit=None: small)
    out = tmp_path / "d.pt"
    assert main(["train-denoiser", "--task", "spc", "--epochs", "1", "--depth", "3", "--features", "4",
                 "--batch-size", "8", "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not (tmp_path / "d.pt.training").exists()
    (tmp_path / "d.pt.training").write_bytes(b"x")
    assert main(["train-denoiser", "--task", "spc", "--epochs", "1", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_train_compile_flag_compiles_the_unrolled_loss(tmp_path, monkeypatch, capsys):
    """``d2gp train --compile`` reaches ``train(compile=True)``: the unrolled loss goes through
    ``torch.compile`` (inductor on a CPU, CUDA graphs on a GPU) and config.json records it. The
    compiler is replaced by a recorder here: inductor's C++ build would take minutes."""
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    tiny = ["--train-images", "8", "--val-images", "4", "--updates", "2", "--iterations", "2", "--batch-size", "4",
            "--width", "4", "--blocks", "1", "--device", "cpu"]
    assert main(["train", "--task", "spc", *tiny, "--out", str(tmp_path / "eager")]) == 0
    eager = json.loads((tmp_path / "eager" / "config.json").read_text())
    assert calls == [] and not eager["runtime"]["compile"]
    # no --autocast: this machine's choice, written down as a decision (bf16 with AMX, else float32)
    assert eager["train"]["autocast"] is use_bf16(None, torch.device("cpu"))
    capsys.readouterr()
    assert main(["train", "--task", "spc", *tiny, "--compile", "--no-autocast", "--out", str(tmp_path / "compiled")]) == 0
    # measured: on a CPU it only costs, so it says so (once, on one line)
    assert capsys.readouterr().err.count("d2gp train: warning: compile on a CPU") == 1
    assert calls == [{"mode": None, "dynamic": False}]  # reduce-overhead (CUDA graphs) only on a GPU
    compiled = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert compiled["runtime"]["compile"] is True and compiled["train"]["autocast"] is False


def test_train_then_evaluate_then_reconstruct_with_the_npo(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["--train-images", "16", "--val-images", "8", "--epochs", "1", "--iterations", "3", "--batch-size", "8",
            "--width", "8", "--blocks", "1"]
    assert main(["train", "--task", "spc", *tiny, "--out", str(run)]) == 0
    assert (run / "best.pt").is_file()
    assert main(["train", "--task", "spc", *tiny, "--out", str(run)]) == 2  # exists: needs --resume
    assert "--resume" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--limit", "8", "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    for label in ("student baseline", "D2GP", "teacher (upper bound)"):
        assert f"| {label} |" in printed
    for name in ("table.md", "table.csv", "results.json", "examples.png", "psnr_curves.png"):
        assert (tmp_path / "eval" / name).is_file()
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["horizons"] == [3, 6, 15] and results["baseline_step_tuning"]["val_psnr_by_step"]
    assert "PSNR 5K=15 (dB)" in (tmp_path / "eval" / "table.md").read_text()
    assert results["environment"]["device"].startswith("CPU")
    assert main(["evaluate", str(run), "--limit", "4", "--safeguard", "2", "--device", "cpu",
                 "--out", str(tmp_path / "eval2")]) == 0
    assert "| D2GP, safeguard ρ=2 |" in capsys.readouterr().out
    guarded = json.loads((tmp_path / "eval2" / "results.json").read_text())["methods"][2]
    assert guarded["safeguard"] == 2 and set(guarded["still_preconditioned"]) == {str(k) for k in range(1, 16)}
    assert main(["reconstruct", "--task", "spc", "--preconditioner", str(run), "--limit", "4", "-K", "3",
                 "--safeguard", "1.5", "--out", str(tmp_path / "rec")]) == 0
    printed = capsys.readouterr().out
    assert "| student + d2gp NPO | 3 |" in printed and "| student + d2gp NPO, safeguard ρ=1.5 | 3 |" in printed
    assert main(["reconstruct", "--task", "mri", "--preconditioner", str(run), "--limit", "2", "-K", "1",
                 "--out", str(tmp_path / "rec2")]) == 2
    assert "trained for task 'spc', not 'mri'" in capsys.readouterr().err
    assert main(["reconstruct", "--task", "spc", "--device", "tpu", "--limit", "2"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


def test_algorithm_flags_parse_and_refuse_clearly(tmp_path, capsys):
    from d2gp.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["evaluate", "runs/a"]).algorithm is None  # the runs' own
    assert parser.parse_args(["evaluate", "runs/a"]).restart is None  # on with fista only
    assert parser.parse_args(["evaluate", "runs/a", "--algorithm", "pgd"]).algorithm == "pgd"
    assert parser.parse_args(["benchmark"]).algorithm == "fista"
    assert parser.parse_args(["benchmark", "--algorithm", "hqs"]).algorithm == "hqs"
    assert parser.parse_args(["reconstruct", "--task", "spc"]).algorithm is None
    assert parser.parse_args(["train", "--task", "spc", "--algorithm", "pgd"]).train_algorithm == "pgd"
    with pytest.raises(SystemExit) as exit_info:
        main(["reconstruct", "--task", "spc", "--algorithm", "admm"])
    assert exit_info.value.code == 2 and "invalid choice: 'admm'" in capsys.readouterr().err
    for argv, message in ((["train", "--task", "spc", "--algorithm", "admm"], "unknown algorithm 'admm'"),
                          (["reconstruct", "--task", "spc", "--algorithm", "pgd", "--restart"], "pgd has no momentum")):
        assert main([*argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_reconstruct_in_another_host(tmp_path, capsys):
    out = tmp_path / "rec"
    assert main(["reconstruct", "--task", "spc", "--algorithm", "hqs", "--limit", "2", "-K", "2", "--examples", "2",
                 "--out", str(out)]) == 0
    assert "PnP-HQS" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["algorithm"] == "hqs"


def test_benchmark_limit_reaches_the_benchmark(tmp_path, monkeypatch, capsys):
    """`d2gp benchmark --limit N` caps the test images (own tasks have no profile entry: else their whole split)."""
    import d2gp.benchmark

    seen = {}

    def fake(tasks, methods, **kwargs):
        seen.update(kwargs)
        return {"table": "", "out": kwargs["out"]}

    monkeypatch.setattr(d2gp.benchmark, "benchmark", fake)
    assert main(["benchmark", "--tasks", "spc", "--limit", "7", "--out", str(tmp_path / "b"),
                 "--runs", str(tmp_path / "r")]) == 0
    assert seen["limit"] == 7
    assert main(["benchmark", "--tasks", "spc", "--out", str(tmp_path / "b"), "--runs", str(tmp_path / "r")]) == 0
    assert seen["limit"] is None
    with pytest.raises(SystemExit):
        main(["benchmark", "--limit", "0"])
    assert "--limit" in capsys.readouterr().err
