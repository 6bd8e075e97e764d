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
