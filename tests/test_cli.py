"""The `d2gp` command end to end on tiny runs, and its one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from d2gp.checkpoints import CheckpointError
from d2gp.cli import main
from d2gp.training import TrainingError


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

    small = torch.rand(16, 1, 32, 32)
    monkeypatch.setattr(base.Task, "images", lambda self, split, limit=None: small)
    out = tmp_path / "d.pt"
    assert main(["train-denoiser", "--task", "spc", "--epochs", "1", "--depth", "3", "--features", "4",
                 "--batch-size", "8", "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not (tmp_path / "d.pt.training").exists()
    (tmp_path / "d.pt.training").write_bytes(b"x")
    assert main(["train-denoiser", "--task", "spc", "--epochs", "1", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


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
    assert results["horizon"] == 6 and results["baseline_step_tuning"]["val_psnr_by_step"]
    assert main(["reconstruct", "--task", "spc", "--preconditioner", str(run), "--limit", "4", "-K", "3",
                 "--out", str(tmp_path / "rec")]) == 0
    assert "| student + d2gp NPO | 3 |" in capsys.readouterr().out
    assert main(["reconstruct", "--task", "mri", "--preconditioner", str(run), "--limit", "2", "-K", "1",
                 "--out", str(tmp_path / "rec2")]) == 2
    assert "trained for task 'spc', not 'mri'" in capsys.readouterr().err


def test_demo_runs_end_to_end_tiny(tmp_path):
    from d2gp.apps import demo

    overrides = dict(train_images=16, val_images=8, epochs=1, iterations=2, batch_size=8,
                     npo={"width": 8, "blocks": 1})
    result = demo(tmp_path / "demo", limit=8, progress=False, **overrides)
    assert "| D2GP |" in result["table"] and "| Supervised |" in result["table"]
    mtime = (tmp_path / "demo" / "d2gp" / "best.pt").stat().st_mtime
    saved = json.loads((tmp_path / "demo" / "d2gp" / "config.json").read_text())
    del saved["train"]["linear"]  # a run made before this field existed
    (tmp_path / "demo" / "d2gp" / "config.json").write_text(json.dumps(saved))
    demo(tmp_path / "demo", limit=8, progress=False, **overrides)  # finished runs are reused
    assert (tmp_path / "demo" / "d2gp" / "best.pt").stat().st_mtime == mtime
    with pytest.raises(TrainingError, match="configuration differs in lr"):  # never overwrites another run
        demo(tmp_path / "demo", limit=8, progress=False, **{**overrides, "lr": 5e-4})


def test_profiles_are_per_task():
    from d2gp.apps import PROFILES, profile_settings

    assert profile_settings("quick", "spc") == PROFILES["quick"]
    mri = profile_settings("quick", "mri")
    assert mri["batch_size"] < 32 and mri["train_images"] < PROFILES["quick"]["train_images"]
    assert profile_settings("full", "sr") == PROFILES["full"]
    with pytest.raises(CheckpointError, match="unknown profile 'huge'"):
        profile_settings("huge", "spc")
