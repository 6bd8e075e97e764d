"""Data-parallel training in several processes (gloo on the CPU): the same weights as one process on the same
global batch, resume across world sizes, rank 0 alone writes, clear errors; and ``torchrun -m d2gp train``."""

import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import d2gp
import d2gp.checkpoints as checkpoints
import d2gp.training as training
from d2gp import distributed
from d2gp.checkpoints import load_checkpoint, lock_path
from d2gp.device import DeviceError, resolve_device
from d2gp.tasks import make_task
from d2gp.training import TrainingError, check_batch_split
from test_training import _config, _train, tiny  # noqa: F401  (tiny: the fixture)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with the gloo backend is not available in this PyTorch build")

#: 16 training images in batches of 7: updates of 7, 7 and 2 images, split 4 + 3, 4 + 3 and 1 + 1 over
#: two processes (unequal shares, an epoch's short last batch); validated (and checkpointed) every 2 updates.
SETTINGS = dict(batch_size=7, updates=6, val_every=2)


@contextlib.contextmanager
def _killed_in_update(n: int | None):
    """Every process of a run raises KeyboardInterrupt in the n-th update of this session (as torchrun stops
    them all); ``None``: not killed."""
    original, calls = training._loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    training._loss = loss
    try:
        yield
    finally:
        training._loss = original


def _worker(rank: int, init: str, tiny, jobs: dict, results: str) -> None:
    """One of two processes: run ``jobs`` (name → config, run directory, resume, update killed in) in turn,
    recording each one's outcome and every file it writes and lock it takes, to ``results/rank{rank}.json``."""
    torch.set_num_threads(1)
    writes, locks, outcomes = [], [], {}
    atomic, lock = checkpoints._atomic, checkpoints.lock_path

    def recorded_atomic(path, write):
        writes.append(Path(path).name)
        return atomic(path, write)

    def recorded_lock(path, what):
        locks.append(str(path))
        return lock(path, what)

    checkpoints._atomic, checkpoints.lock_path = recorded_atomic, recorded_lock
    with distributed.process_group(torch.device("cpu"), rank=rank, world_size=2, init_method=init):
        assert distributed.active() and distributed.world_size() == 2 and distributed.backend() == "gloo"
        outcomes["shared"] = {"rank0": distributed.from_rank0(distributed.rank), "share": distributed.share(7)}
        try:
            distributed.from_rank0(lambda: (lambda: None))  # a result that does not pickle
        except RuntimeError as error:
            outcomes["shared"]["unpicklable"] = str(error)
        for name, (config, run_dir, resume, killed_in) in jobs.items():
            try:
                with _killed_in_update(killed_in):
                    outcomes[name] = {"summary": _train(tiny, config, run_dir, resume=resume)}
            except BaseException as error:  # noqa: BLE001 - recorded for the test
                outcomes[name] = {"error": type(error).__name__, "message": str(error)}
    Path(results, f"rank{rank}.json").write_text(json.dumps({"outcomes": outcomes, "writes": writes, "locks": locks},
                                                            default=str))


def _spawn_two(args: tuple, timeout: float = 240) -> None:
    """Run :func:`_worker` in two processes; stop them (by their PIDs) if they outlive ``timeout`` seconds."""
    context = torch.multiprocessing.spawn(_worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two training processes did not end within {timeout} s")


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """One process straight through; two processes straight through; 1 → 2 → 1 processes, each session killed
    after a checkpoint and resumed; two processes on a batch they cannot split, and on a locked directory."""
    root = tmp_path_factory.mktemp("distributed")
    config = _config(tiny, **SETTINGS)
    refined = _config(tiny, **SETTINGS, preconditioner="pointwise", base="baseline")  # a Refined linear one
    _train(tiny, config, root / "one")
    _train(tiny, refined, root / "refined_one")
    with _killed_in_update(3), pytest.raises(KeyboardInterrupt):  # checkpoint at update 2
        _train(tiny, config, root / "chain")
    jobs = {"two": (config, root / "two", False, None),
            "chain": (config, root / "chain", True, 3),  # resumes at 2, killed in update 5: checkpoint at 4
            "refined": (refined, root / "refined_two", False, None),
            "small_batch": (_config(tiny, batch_size=1, updates=2), root / "small", False, None),
            "locked": (config, root / "locked", False, None)}
    with lock_path(root / "locked" / checkpoints.RUN_LOCK, "test"):
        _spawn_two((f"file://{root / 'store'}", tiny, jobs, str(root)))
    results = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    chain_after_two = {"update": load_checkpoint(root / "chain" / "checkpoint.pt")["update"],
                       "runtime": json.loads((root / "chain" / "config.json").read_text())["runtime"]}
    _train(tiny, config, root / "chain", resume=True)
    return {"root": root, "results": results, "chain_after_two": chain_after_two, "tiny": tiny}


def _weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "last.pt")["state_dict"]


def _log(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv") as handle:
        return list(csv.DictReader(handle))


def test_two_processes_train_the_weights_of_one_process(runs):
    root = runs["root"]
    for rank, result in enumerate(runs["results"]):
        assert "summary" in result["outcomes"]["two"], result["outcomes"]["two"]
    one, two = _weights(root / "one"), _weights(root / "two")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    config = _config(runs["tiny"], **SETTINGS)
    fresh = training.build_preconditioner(config, make_task(config.task, **config.task_settings)).state_dict()
    assert any(not torch.equal(one[key], fresh[key]) for key in one)  # it did train
    for a, b in zip(_log(root / "one"), _log(root / "two"), strict=True):  # the logged losses are the batch's
        assert a["update"] == b["update"]
        for name in ("loss", "gradient", "imitation", "supervised", "grad_norm", "val_psnr"):
            assert float(b[name]) == pytest.approx(float(a[name]), rel=1e-4), name
    saved = json.loads((root / "two" / "config.json").read_text())
    assert saved["runtime"]["world_size"] == 2 and saved["runtime"]["backend"] == "gloo"
    assert json.loads((root / "one" / "config.json").read_text())["runtime"]["world_size"] == 1
    assert runs["results"][1]["outcomes"]["two"]["summary"] == runs["results"][0]["outcomes"]["two"]["summary"]


def test_two_processes_train_a_refined_linear_preconditioner_as_one(runs):
    """The base of a Refined preconditioner is no submodule, and a pointwise one is not an NPO: the same weights."""
    root = runs["root"]
    one, two = _weights(root / "refined_one"), _weights(root / "refined_two")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    assert load_checkpoint(root / "refined_two" / "last.pt")["base"]["method"] == "baseline"


def test_a_run_resumes_across_world_sizes(runs):
    root = runs["root"]
    for result in runs["results"]:
        assert result["outcomes"]["chain"]["error"] == "KeyboardInterrupt"
    assert runs["chain_after_two"]["update"] == 4  # the two processes went on from 2 and checkpointed at 4
    assert runs["chain_after_two"]["runtime"]["world_size"] == 2
    one, chain = _weights(root / "one"), _weights(root / "chain")
    for key in one:
        torch.testing.assert_close(chain[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [row["update"] for row in _log(root / "chain")] == ["2", "4", "6"]
    assert json.loads((root / "chain" / "config.json").read_text())["runtime"]["world_size"] == 1


def test_only_rank_0_writes_and_locks(runs):
    lead, other = runs["results"]
    assert other["writes"] == [] and other["locks"] == []
    assert {"config.json", "checkpoint.pt", "best.pt", "last.pt", "log.csv", "summary.json"} <= set(lead["writes"])
    assert all(Path(lock).name == checkpoints.RUN_LOCK for lock in lead["locks"])
    assert sorted(p.name for p in (runs["root"] / "two").iterdir()) == [
        "best.pt", "checkpoint.pt", "config.json", "last.pt", "log.csv", "summary.json"]


def test_every_process_raises_rank_0s_errors(runs):
    for result in runs["results"]:
        small, locked = result["outcomes"]["small_batch"], result["outcomes"]["locked"]
        assert small["error"] == "TrainingError"
        assert "batch_size 1 cannot be split over 2 processes" in small["message"]
        assert locked["error"] == "LockedError" and f"PID {os.getpid()}" in locked["message"]
    assert not (runs["root"] / "small" / "config.json").exists()


def test_processes_share_rank_0s_results_and_split_a_batch(runs):
    lead, other = (result["outcomes"]["shared"] for result in runs["results"])
    assert lead["rank0"] == other["rank0"] == 0
    assert lead["share"] == [0, 4] and other["share"] == [4, 7]  # unequal shares: the first rank gets one more
    for shared in (lead, other):
        assert "rank 0 got a function, which cannot be sent to the other processes" in shared["unpicklable"]


def test_batches_that_leave_a_process_without_an_image_are_refused():
    check_batch_split(16, 7, 2)  # 7, 7, 2
    check_batch_split(16, 8, 8)
    check_batch_split(3, 8, 1)
    with pytest.raises(TrainingError, match="batch_size 2 cannot be split over 3 processes"):
        check_batch_split(16, 2, 3)
    with pytest.raises(TrainingError, match=r"last batch of each epoch holds 1 images \(16 training images in "
                                            r"batches of 5\), too few for 2 processes"):
        check_batch_split(16, 5, 2)
    with pytest.raises(TrainingError, match="last batch of each epoch holds 3 images"):
        check_batch_split(3, 8, 4)


@pytest.mark.parametrize("overrides", [{}, {"teacher_gradient": "teacher"}, {"method": "supervised"}])
def test_a_share_of_the_batch_gets_its_noise_and_weighted_loss(tiny, overrides):
    """The loss of a batch is the share-weighted sum of its shares' losses when each share is measured at its
    offset in the batch (the teacher too, when it is not cached), and so is its gradient."""
    config = _config(tiny, **overrides)
    task = make_task(config.task, **config.task_settings)
    den, x = task.denoiser().requires_grad_(False), tiny["train"][:7]
    npo = training.build_preconditioner(config, task)
    with torch.no_grad():  # make the head non-zero, so that every parameter gets a gradient
        for parameter in npo.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))

    def loss_and_grads(images, offset, weight):
        npo.zero_grad(set_to_none=True)
        loss, terms = training._loss(config, task, npo, den, images, seed=11, offset=offset)
        (weight * loss).backward()
        return weight * loss.item(), [p.grad.clone() for p in npo.parameters()]

    whole, grads = loss_and_grads(x, 0, 1.0)
    first, grads_first = loss_and_grads(x[:4], 0, 4 / 7)
    second, grads_second = loss_and_grads(x[4:], 4, 3 / 7)
    assert first + second == pytest.approx(whole, rel=1e-5)
    for g, a, b in zip(grads, grads_first, grads_second, strict=True):
        torch.testing.assert_close(a + b, g, rtol=1e-4, atol=1e-7)
    unshifted, _ = loss_and_grads(x[4:], 0, 3 / 7)
    assert unshifted != pytest.approx(second, rel=1e-6)  # without its offset, a share gets other noise


def test_each_process_of_a_machine_gets_its_own_gpu(monkeypatch):
    """Under torchrun, ``auto`` and ``cuda`` are ``cuda:LOCAL_RANK`` (checked without a GPU: CUDA is faked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(DeviceError, match="process 2 of this machine has no GPU of its own: the machine has 2"):
        resolve_device("auto")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_device("cuda") == torch.device("cuda")


def test_a_single_process_needs_no_process_group():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.share(7) == (0, 7) and distributed.backend() is None
    assert distributed.from_rank0(lambda: 42) == 42
    with distributed.process_group(torch.device("cpu")):  # WORLD_SIZE unset: nothing to join
        assert not dist.is_initialized()


def test_torchrun_trains_with_two_processes(tiny_denoiser, tmp_path):
    """``torchrun --standalone --nproc_per_node 2 -m d2gp train …`` on the CPU (gloo)."""
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    src = str(Path(d2gp.__file__).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    command = [*launcher, "--standalone", "--nproc_per_node", "2", "-m", "d2gp", "train", "--task", "spc",
               "--image-size", "16", "--denoiser", str(tiny_denoiser), "--updates", "2", "--width", "8", "--blocks", "1",
               "--train-images", "8", "--val-images", "4", "--iterations", "3", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("best validation PSNR") == 1  # rank 0 alone reports
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt", "checkpoint.pt", "config.json", "last.pt", "log.csv", "summary.json"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["runtime"] == {"device": "cpu", "compile": False, "cuda_graph": False, "world_size": 2, "backend": "gloo"}
    assert saved["data"]["train"] == 8 and json.loads((out / "summary.json").read_text())["updates"] == 2
    assert load_checkpoint(out / "checkpoint.pt")["update"] == 2
