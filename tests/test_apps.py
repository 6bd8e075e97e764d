"""The applications: the demo end to end (tiny), profiles, where evaluations go, what is said on the way."""

import json
from pathlib import Path

import pytest
import torch

from d2gp.apps import PROFILES, announce, demo, evaluate_runs, evaluation_dir, profile_settings
from d2gp.checkpoints import CheckpointError
from d2gp.cli import main
from d2gp.device import use_bf16
from d2gp.training import TrainConfig, TrainingError

TINY = dict(train_images=16, val_images=8, epochs=1, iterations=2, batch_size=8, npo={"width": 8, "blocks": 1})
FILES = ["examples.png", "psnr_curves.png", "results.json", "table.csv", "table.md"]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("apps") / "demo"
    return out, demo(out, limit=8, progress=False, **TINY)


def test_demo_trains_both_and_writes_the_evaluation_beside_them(tiny_demo):
    out, result = tiny_demo
    assert "| D2GP |" in result["table"] and "| Supervised |" in result["table"]
    assert Path(result["out"]) == out / "evaluation" == evaluation_dir([out / "d2gp", out / "supervised"])
    assert sorted(p.name for p in (out / "evaluation").iterdir()) == FILES
    assert json.loads((out / "evaluation" / "results.json").read_text())["runs"] == [str(out / "d2gp"),
                                                                                     str(out / "supervised")]


def test_demo_reuses_finished_runs_and_never_overwrites_another(tiny_demo):
    out, _ = tiny_demo
    written = {name: (out / "d2gp" / name).stat().st_mtime for name in ("best.pt", "last.pt", "summary.json")}
    saved = json.loads((out / "d2gp" / "config.json").read_text())
    del saved["train"]["linear"]  # a run made before this field existed
    # ... on a machine that chose the other precision (autocast unset): the run keeps its own
    saved["train"]["autocast"] = not use_bf16(None, torch.device("cpu"))
    (out / "d2gp" / "config.json").write_text(json.dumps(saved))
    demo(out, limit=8, progress=False, **TINY)  # finished runs are reused, not even resumed
    assert {name: (out / "d2gp" / name).stat().st_mtime for name in written} == written
    with pytest.raises(TrainingError, match="configuration differs in lr"):
        demo(out, limit=8, progress=False, **{**TINY, "lr": 5e-4})


def test_demo_trains_and_evaluates_in_the_chosen_host(tmp_path):
    result = demo(tmp_path / "demo", limit=4, progress=False, algorithm="pgd", **TINY)
    assert result["results"]["algorithm"] == "pgd" and result["results"]["restart"] is False  # pgd has no momentum
    for method in ("d2gp", "supervised"):
        assert json.loads((tmp_path / "demo" / method / "config.json").read_text())["train"]["algorithm"] == "pgd"


def test_demo_command_passes_the_host_and_restart(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr("d2gp.apps.demo", lambda out, **kw: calls.append(kw) or {"table": "t", "out": str(out)})
    assert main(["demo", "--out", str(tmp_path / "a"), "--algorithm", "hqs"]) == 0
    assert main(["demo", "--out", str(tmp_path / "b"), "--no-restart"]) == 0
    assert [(c["algorithm"], c["restart"]) for c in calls] == [("hqs", None), ("fista", False)]


def test_evaluate_command_writes_where_the_demo_does(tiny_demo, capsys):
    out, _ = tiny_demo
    assert main(["evaluate", str(out / "d2gp"), str(out / "supervised"), "--limit", "4"]) == 0
    results = json.loads((out / "evaluation" / "results.json").read_text())
    assert results["images"] == 4 and results["restart"] is True  # evaluate restarts by default
    assert f"wrote {out / 'evaluation'}/" in capsys.readouterr().out


def test_evaluate_without_restart_is_the_plain_solver(tiny_demo, tmp_path):
    out, _ = tiny_demo
    plain = evaluate_runs([out / "d2gp"], limit=4, out=tmp_path / "plain", progress=False, restart=False)
    assert main(["evaluate", str(out / "d2gp"), "--limit", "4", "--no-restart", "--out", str(tmp_path / "cli")]) == 0
    again = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert plain["results"]["restart"] is False and again["restart"] is False
    assert [m["psnr_per_iteration"] for m in again["methods"]] == \
        [m["psnr_per_iteration"] for m in json.loads((tmp_path / "plain" / "results.json").read_text())["methods"]]


def test_evaluating_one_run_writes_into_it_and_says_each_phase(tiny_demo, capsys):
    out, _ = tiny_demo
    result = evaluate_runs([out / "d2gp"], limit=4)
    assert Path(result["out"]) == out / "d2gp" / "evaluation"
    assert sorted(p.name for p in (out / "d2gp" / "evaluation").iterdir()) == FILES
    captured = capsys.readouterr()
    assert captured.out == ""  # the messages go to stderr: stdout stays for results
    for said in ("evaluating on spc: loading the test and validation images",
                 "tuning the student baseline's step size γ on 8 validation images at K = 2",
                 "baseline step γ = ", "running 3 methods to 5K = 10 iterations on 4 test images",
                 f"writing the table and figures to {out / 'd2gp' / 'evaluation'}"):
        assert said in captured.err


def test_progress_false_says_nothing(tiny_demo, tmp_path, capsys):
    out, _ = tiny_demo
    evaluate_runs([out / "d2gp"], limit=2, out=tmp_path / "quiet", progress=False)
    assert capsys.readouterr() == ("", "")
    announce("a phase", progress=False)
    assert capsys.readouterr() == ("", "")
    announce("a phase")
    assert capsys.readouterr() == ("", "a phase\n")


@pytest.mark.parametrize("runs,expected", [
    (["runs/spc-d2gp"], "runs/spc-d2gp/evaluation"),
    (["runs/demo/d2gp", "runs/demo/supervised/"], "runs/demo/evaluation"),
    (["runs/spc-d2gp", "runs/spc-sup"], "runs/evaluation"),
    (["runs/a/x", "runs/b"], "runs/evaluation"),
    (["a", "b"], "evaluation"),
    (["/data/runs/a", "/data/runs/b"], "/data/runs/evaluation"),
])
def test_evaluation_dir_is_beside_the_runs(runs, expected):
    assert evaluation_dir(runs) == Path(expected)


def test_evaluation_dir_of_absolute_and_relative_runs():
    assert evaluation_dir([Path.cwd() / "runs" / "a", "runs/b"]) == Path.cwd() / "runs" / "evaluation"


def test_evaluation_dir_refusals():
    with pytest.raises(CheckpointError, match="share no folder to hold their evaluation: choose one with --out"):
        evaluation_dir(["/data/a", "/scratch/b"])
    with pytest.raises(CheckpointError, match="no run directories"):
        evaluation_dir([])


def test_evaluation_dir_is_said_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "RUN/evaluation for one run" in " ".join(capsys.readouterr().out.split())


def test_profiles_are_per_task():
    assert profile_settings("quick", "spc") == PROFILES["quick"]
    mri = profile_settings("quick", "mri")
    assert mri["batch_size"] < PROFILES["quick"]["batch_size"] and mri["updates"] < PROFILES["quick"]["updates"]
    assert profile_settings("paper", "sr") == PROFILES["paper"] and PROFILES["paper"]["epochs"] >= 30
    for name in PROFILES:  # every profile trains the way that stays stable past K
        for task in ("spc", "mri", "sr"):
            config = TrainConfig(task=task, **profile_settings(name, task))
            config.validate()
            # the last 10 iterates, or as many as a truncated unroll backpropagates through (cpu: 3)
            assert config.loss_tail == (config.truncate if config.unroll == "truncated" else 10)
            assert config.schedule == "cosine" and config.grad_clip
    # the cpu profile's budgets (issue #9): at least 1 500 updates on SPC and 500 on MRI and SR
    assert [profile_settings("cpu", task)["updates"] for task in ("spc", "mri", "sr")] == [1500, 500, 500]
    # backpropagated through the last 3 iterations, SR the last 5 (the last 3 cost it PSNR: README)
    assert [profile_settings("cpu", task)["truncate"] for task in ("spc", "mri", "sr")] == [3, 3, 5]
    with pytest.raises(CheckpointError, match="unknown profile 'huge'"):
        profile_settings("huge", "spc")



def test_budget_arguments_default_to_the_quick_profile():
    import argparse

    from d2gp.apps import PROFILES, add_budget_arguments

    parser = argparse.ArgumentParser()
    add_budget_arguments(parser)
    args = parser.parse_args([])
    quick = PROFILES["quick"]
    assert (args.updates, args.batch_size, args.train_images, args.val_images, args.val_every, args.warmup) == \
        (quick["updates"], quick["batch_size"], quick["train_images"], quick["val_images"], quick["val_every"], quick["warmup"])
    assert args.seeds == [0] and args.iterations == 20 and args.npo == {} and args.task_settings == {}
    args = parser.parse_args(["--updates", "7", "--npo", '{"width": 8}', "--seeds", "0", "1"])
    assert args.updates == 7 and args.npo == {"width": 8} and args.seeds == [0, 1]
