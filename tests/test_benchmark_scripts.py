"""The command-line parsing of the benchmark scripts (their results are committed next to them;
these check only what a user types)."""

import importlib.util
from pathlib import Path

import pytest

from d2gp.apps import HORIZONS, horizon_label

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_horizon_labels_name_k_itself_and_its_multiples():
    assert [horizon_label(h) for h in HORIZONS] == ["K", "2K", "5K"]


def test_learning_curves_takes_one_value_for_all_tasks_or_one_per_task():
    per_task = _script("learning_curves").per_task
    assert per_task(["4096"], ["spc", "mri"], "--updates") == {"spc": 4096, "mri": 4096}
    assert per_task(["spc=4096", "mri=2048"], ["spc", "mri"], "--updates") == {"spc": 4096, "mri": 2048}
    assert per_task(["mri=48"], ["spc", "mri"], "--val-images") == {"spc": None, "mri": 48}
    assert per_task([], ["spc"], "--val-images") == {"spc": None}


@pytest.mark.parametrize("values, message", [(["sr=10"], "not TASK=N for one of the tasks spc, mri"),
                                             (["spc:10"], "not a positive whole number"), (["0"], "not a positive whole number"),
                                             (["spc=-3"], "not a positive whole number")])
def test_learning_curves_rejects_unknown_tasks_and_bad_counts_by_name(values, message):
    per_task = _script("learning_curves").per_task
    with pytest.raises(SystemExit, match=message):
        per_task(values, ["spc", "mri"], "--updates")


def test_every_training_variant_is_a_valid_configuration():
    from dataclasses import replace

    from d2gp.training import TrainConfig

    variants = _script("d2gp_variants").VARIANTS
    base = TrainConfig(task="spc")
    for changes in variants.values():
        replace(base, **changes).validate()  # raises TrainingError on a bad field or value
    truncated = replace(base, **variants["truncated-5"])
    assert (truncated.unroll, truncated.truncate) == ("truncated", 5)


def test_cpu_profile_script_trains_both_methods_on_every_task_then_evaluates_each_pair(tmp_path):
    """benchmarks/cpu_profile.sh with a stand-in ``d2gp`` that records its arguments: six 1-thread
    trainings with the cpu profile (a queue served by two workers), then one 2-thread evaluation
    per task; each training's start and end in jobs.txt."""
    import subprocess

    calls = tmp_path / "calls.txt"
    stub = tmp_path / "d2gp"
    stub.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n")
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "D2GP": str(stub), "PYTHON": str(stub), "RUNS": str(tmp_path / "runs"),
           "OUT": str(out)}
    subprocess.run(["bash", str(ROOT / "benchmarks" / "cpu_profile.sh")], env=env, check=True)
    lines = calls.read_text().splitlines()
    trainings = sorted(line for line in lines if " train " in line)
    runs = tmp_path / "runs"
    assert trainings == sorted(f"--threads 1 train --task {task} --profile cpu --method {method} --seed 0 --device cpu "
                               f"--out {runs}/{task}/{method}" for task in ("spc", "mri", "sr")
                               for method in ("d2gp", "supervised"))
    evaluations = [line for line in lines if " evaluate " in line]
    assert evaluations == [f"--threads 2 evaluate {runs}/{task}/d2gp {runs}/{task}/supervised --split test{limit} "
                           f"--device cpu --out {out}/{task}"
                           for task, limit in (("spc", " --limit 200"), ("mri", ""), ("sr", ""))]
    assert lines.index(evaluations[0]) == 6  # after every training
    assert lines[-1] == f"benchmarks/summarize_gains.py {out}/spc {out}/mri {out}/sr --out {out}/gains.md"
    assert (out / "training_wall.txt").read_text().startswith("training phase: ")
    jobs = [line.split() for line in (out / "jobs.txt").read_text().splitlines()]
    assert sorted(job[:2] for job in jobs) == sorted([task, method] for task in ("spc", "mri", "sr")
                                                     for method in ("d2gp", "supervised"))
    assert all(int(began) <= int(ended) for *_, began, ended in jobs)
    assert (runs / "sr" / "d2gp.log").is_file()
    # another seed on a subset of the tasks
    calls.unlink()
    subprocess.run(["bash", str(ROOT / "benchmarks" / "cpu_profile.sh")], env={**env, "SEED": "1", "TASKS": "mri"},
                   check=True)
    lines = calls.read_text().splitlines()
    assert sorted(lines[:2]) == [f"--threads 1 train --task mri --profile cpu --method {method} --seed 1 --device cpu "
                                 f"--out {runs}/mri/{method}" for method in ("d2gp", "supervised")]
    assert lines[2:] == [f"--threads 2 evaluate {runs}/mri/d2gp {runs}/mri/supervised --split test --device cpu "
                         f"--out {out}/mri", f"benchmarks/summarize_gains.py {out}/mri --out {out}/gains.md"]


def test_bf16_quality_script_trains_each_seed_in_both_precisions_then_scores_them_together(tmp_path):
    """benchmarks/bf16_quality.sh with a stand-in ``d2gp``: per seed a float32 (--no-autocast) and
    a bfloat16 (--autocast) training of the cpu profile, then one evaluation of all of a task's runs."""
    import subprocess

    calls = tmp_path / "calls.txt"
    stub = tmp_path / "d2gp"
    stub.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n")
    stub.chmod(0o755)
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {"PATH": "/usr/bin:/bin", "D2GP": str(stub), "PYTHON": str(stub), "RUNS": str(runs), "OUT": str(out),
           "TASKS": "spc mri", "SEEDS": "0 1", "METHOD": "supervised"}
    subprocess.run(["bash", str(ROOT / "benchmarks" / "bf16_quality.sh")], env=env, check=True)
    lines = calls.read_text().splitlines()
    flags = {"fp32": "--no-autocast", "bf16": "--autocast"}
    assert sorted(lines[:8]) == sorted(
        f"--threads 1 train --task {task} --profile cpu --method supervised --seed {seed} {flags[p]} --device cpu "
        f"--out {runs}/{task}/{p}-s{seed}" for task in ("spc", "mri") for seed in (0, 1) for p in flags)
    scored = {task: " ".join(f"{runs}/{task}/{p}-s{seed}" for seed in (0, 1) for p in flags) for task in ("spc", "mri")}
    assert lines[8:] == [f"--threads 2 evaluate {scored['spc']} --split test --limit 200 --device cpu --out {out}/spc",
                         f"--threads 2 evaluate {scored['mri']} --split test --device cpu --out {out}/mri",
                         f"benchmarks/summarize_gains.py {out}/spc {out}/mri --out {out}/gains.md"]
    assert len((out / "jobs.txt").read_text().splitlines()) == 8 and (out / "machine.txt").is_file()


def test_cpu_isa_script_times_each_instruction_cap_with_its_own_reference(tmp_path):
    """benchmarks/cpu_isa_speed.sh with a stand-in ``python``: this CPU, then oneDNN capped below
    AMX, then AVX2 for oneDNN and ATen, each table with ``before`` timed in the same run."""
    import subprocess

    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f"#!/usr/bin/env bash\necho \"${{ONEDNN_MAX_CPU_ISA:-}}/${{ATEN_CPU_CAPABILITY:-}}: $*\" >> {calls}\n")
    stub.chmod(0o755)
    out = tmp_path / "out"
    subprocess.run(["bash", str(ROOT / "benchmarks" / "cpu_isa_speed.sh"), str(out), "3"],
                   env={"PATH": "/usr/bin:/bin", "PYTHON": str(stub)}, check=True)
    run = "benchmarks/training_speed.py --threads 2 --steps"
    assert calls.read_text().splitlines() == [
        f"/: {run} 3 --out {out}/native --configs before default, float32 default default + truncated (last 5)",
        f"AVX512_CORE_BF16/: {run} 3 --out {out}/avx512_bf16 --configs before default default + bf16 autocast "
        f"default + truncated (last 5)",
        f"AVX2/avx2: {run} 3 --out {out}/avx2 --configs before default default + truncated (last 5)",
        f"AVX2/avx2: {run} 2 --out {out}/avx2_bf16 --configs default + bf16 autocast"]


def test_cpu_profile_script_stops_when_a_training_fails_and_names_its_log(tmp_path):
    """A training that fails (here SR's Supervised run) ends the script with an error that names
    its log, before any evaluation; the other trainings still finish."""
    import subprocess

    calls = tmp_path / "calls.txt"
    stub = tmp_path / "d2gp"
    stub.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n"
                    "[[ \"$*\" == *'--task sr --profile cpu --method supervised'* ]] && exit 3\nexit 0\n")
    stub.chmod(0o755)
    runs, out = tmp_path / "runs", tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "D2GP": str(stub), "PYTHON": str(stub), "RUNS": str(runs), "OUT": str(out)}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "cpu_profile.sh")], env=env, capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert f"training sr supervised failed: see {runs}/sr/supervised.log" in result.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == 6 and not any(" evaluate " in line for line in lines)
    assert not (out / "training_wall.txt").exists()


def test_cpu_profile_script_keeps_each_log_without_the_progress_bars_redraws(tmp_path):
    """Each training's log goes to OUT/logs/<task>-<method>.txt with its messages and every progress
    bar's last state only (tqdm redraws a bar after a carriage return), and the run's config,
    summary and validation log (those it wrote) to OUT/runs/<task>/<method>/."""
    import subprocess

    stub = tmp_path / "d2gp"
    stub.write_text("#!/usr/bin/env bash\n[[ \"$*\" == *' train '* ]] || exit 0\n"
                    "mkdir -p \"${@: -1}\" && echo '{\"updates\": 9}' > \"${@: -1}/summary.json\"\n"
                    "printf 'starting\\nteacher targets:  50%%|#  | 1/2\\rteacher targets: 100%%|## | 2/2\\n"
                    "   \\r  d2gp spc:  10%%|  | 1/9\\r  d2gp spc: 100%%|##| 9/9  \\n\\ndone\\n'\n")
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "D2GP": str(stub), "PYTHON": str(stub), "RUNS": str(tmp_path / "runs"),
           "OUT": str(out), "TASKS": "spc"}
    subprocess.run(["bash", str(ROOT / "benchmarks" / "cpu_profile.sh")], env=env, check=True)
    assert (out / "logs" / "spc-d2gp.txt").read_text().splitlines() == [
        "starting", "teacher targets: 100%|## | 2/2", "d2gp spc: 100%|##| 9/9", "done"]
    assert (tmp_path / "runs" / "spc" / "d2gp.log").read_bytes().count(b"\r") == 3  # the raw log is kept
    assert (out / "runs" / "spc" / "d2gp" / "summary.json").read_text() == '{"updates": 9}\n'  # copied beside
    assert not (out / "runs" / "spc" / "d2gp" / "log.csv").exists()  # what the run did not write


def test_paper_profile_script_trains_six_at_once_on_the_gpu_with_cuda_graphs(tmp_path):
    """benchmarks/paper_profile.sh: the paper profile's six trainings at once on cuda, 2 threads each,
    replaying their updates as CUDA graphs; PHASES=train stops before evaluating."""
    import subprocess

    calls = tmp_path / "calls.txt"
    stub = tmp_path / "d2gp"
    stub.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n")
    stub.chmod(0o755)
    runs, out = tmp_path / "runs", tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "D2GP": str(stub), "PYTHON": "/bin/false", "RUNS": str(runs), "OUT": str(out),
           "PHASES": "train"}
    subprocess.run(["bash", str(ROOT / "benchmarks" / "paper_profile.sh")], env=env, check=True)
    assert sorted(calls.read_text().splitlines()) == sorted(
        f"--threads 2 train --task {task} --profile paper --method {method} --seed 0 --device cuda --cuda-graph "
        f"--out {runs}/{task}/{method}" for task in ("spc", "mri", "sr") for method in ("d2gp", "supervised"))
    assert "6 workers of 2 threads on cuda" in (out / "training_wall.txt").read_text()
    assert not (out / "gains.md").exists()


def test_profile_script_retries_a_failed_captured_training_eagerly_and_marks_runs_stopped_by_the_deadline(tmp_path):
    """A training that fails with --cuda-graph (or --compile) runs again without it (the failed log
    kept); one still running at DEADLINE is stopped and marked "stopped" in jobs.txt, and the script
    goes on."""
    import subprocess
    import time

    calls = tmp_path / "calls.txt"
    stub = tmp_path / "d2gp"
    stub.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n"
                    "[[ \"$*\" == *'--task spc'*'--cuda-graph'* ]] && { echo 'capture broke'; exit 1; }\n"
                    "[[ \"$*\" == *'--task sr --profile paper --method d2gp'* ]] && exec sleep 30\nexit 0\n")
    stub.chmod(0o755)
    runs, out = tmp_path / "runs", tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "D2GP": str(stub), "PYTHON": "/bin/false", "RUNS": str(runs), "OUT": str(out),
           "PHASES": "train", "TASKS": "spc sr", "DEADLINE": str(int(time.time()) + 3),
           "TRAIN_ARGS_sr": "--compile"}
    began = time.monotonic()
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "paper_profile.sh")], env=env, capture_output=True,
                            text=True, check=True)
    assert time.monotonic() - began < 20  # the sleeping training was stopped at the deadline
    lines = calls.read_text().splitlines()
    for method in ("d2gp", "supervised"):
        assert f"training spc {method} failed with --cuda-graph: again eagerly" in result.stderr
        assert f"--threads 2 train --task spc --profile paper --method {method} --seed 0 --device cuda " \
               f"--out {runs}/spc/{method}" in lines
        assert (runs / "spc" / f"{method}.capture-failed.log").read_text() == "capture broke\n"
    jobs = {tuple(line.split()[:2]): line.split()[4:] for line in (out / "jobs.txt").read_text().splitlines()}
    assert jobs == {("sr", "d2gp"): ["stopped"], ("sr", "supervised"): [], ("spc", "d2gp"): [],
                    ("spc", "supervised"): []}


def test_gpu_session_stops_at_once_when_the_set_up_check_fails(tmp_path):
    """benchmarks/gpu_session.sh, run on a lent GPU machine, spends nothing past a failed set-up
    check (no GPU, or d2gp, deepinv or the cached data missing): exit 3, named in session.log."""
    import subprocess

    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), str(tmp_path / "res"), "60"],
                            env={"PATH": "/usr/bin:/bin", "PYTHON": "/bin/false"}, capture_output=True, text=True)
    assert result.returncode == 3
    assert (tmp_path / "res" / "session.log").read_text().splitlines()[-1].endswith("set-up check failed")
    assert not (tmp_path / "res" / "gpu_step_eager.log").exists()


def test_summarize_gains_names_a_corrupt_evaluation(tmp_path):
    (tmp_path / "spc").mkdir()
    (tmp_path / "spc" / "results.json").write_text("{not json")
    with pytest.raises(SystemExit, match="evaluation results .*spc/results.json is corrupt or not JSON"):
        _script("summarize_gains").gains_table([tmp_path / "spc"])


def _evaluation(task: str, psnr_by_method: dict, keys=int) -> dict:
    return {"task": task, "algorithm": "fista", "restart": True, "images": 3, "split": "test", "horizons": [2, 4, 10],
            "methods": [{"label": label, "psnr": {keys(k): [v, 0.5] for k, v in zip((2, 4, 10), values)}}
                        for label, values in psnr_by_method.items()]}


def test_gain_rows_subtract_the_first_method_at_every_horizon_whether_read_from_json_or_not():
    from d2gp.reports import gain_rows

    results = _evaluation("spc", {"student baseline": [20.0, 21.0, 19.5], "D2GP": [21.25, 20.5, 19.5]})
    expected = [["spc", "student baseline", "20.00", "21.00", "19.50", "—", "—", "—"],
                ["spc", "D2GP", "21.25", "20.50", "19.50", "+1.25", "-0.50", "+0.00"]]
    assert gain_rows(results, "spc") == expected
    assert gain_rows(_evaluation("spc", {"student baseline": [20.0, 21.0, 19.5], "D2GP": [21.25, 20.5, 19.5]},
                                 keys=str), "spc") == expected


def test_summarize_gains_puts_several_evaluations_in_one_table_and_names_a_missing_one(tmp_path):
    import json

    gains_table = _script("summarize_gains").gains_table
    for task in ("spc", "mri"):
        (tmp_path / task).mkdir()
        (tmp_path / task / "results.json").write_text(json.dumps(
            _evaluation(task, {"student baseline": [20.0, 21.0, 19.5], "Supervised": [20.5, 21.0, 20.0]}, keys=str)))
    lines = gains_table([tmp_path / "spc", tmp_path / "mri"]).splitlines()
    assert lines[0] == ("| task | host, images | method | PSNR K (dB) | PSNR 2K (dB) | PSNR 5K (dB) | gain K (dB) | "
                        "gain 2K (dB) | gain 5K (dB) |")
    assert lines[3] == "| spc | fista, restart, 3 test images | Supervised | 20.50 | 21.00 | 20.00 | +0.50 | +0.00 | +0.50 |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| spc", "| spc", "| mri", "| mri"]
    with pytest.raises(SystemExit, match="sr/results.json: not found"):
        gains_table([tmp_path / "spc", tmp_path / "sr"])
