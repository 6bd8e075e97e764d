"""Atomic writes (a failure leaves the old file), safe loading with format tags, seeding, exact resume state."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from d2gp.checkpoints import (
    CheckpointError, atomic_save, atomic_write_text, load_checkpoint, restore_training_state, rng_state,
    save_training_state, seed_everything, set_rng_state, write_json,
)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_text_writes_and_replaces_exactly(tmp_path):
    path = tmp_path / "sub" / "table.md"  # missing folders are created
    atomic_write_text("γ = 1.46 ± 0.01\n", path)
    assert path.read_bytes() == "γ = 1.46 ± 0.01\n".encode("utf-8")
    atomic_write_text("new\r\n", path)
    assert path.read_bytes() == b"new\r\n"
    assert _files(path.parent) == ["table.md"]  # no temporary file left behind


def test_write_json_is_indented_and_stringifies_paths(tmp_path):
    write_json({"a": 1, "run": Path("runs/demo")}, tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text() == '{\n  "a": 1,\n  "run": "runs/demo"\n}\n'


def test_a_failed_save_leaves_the_old_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"format": "x", "epoch": 1}, path)
    old = path.read_bytes()
    with pytest.raises(Exception):
        atomic_save({"format": "x", "epoch": 2, "model": lambda: 0}, path)  # fails half-way: a lambda does not pickle
    assert path.read_bytes() == old and _files(tmp_path) == ["checkpoint.pt"]
    assert load_checkpoint(path, "x")["epoch"] == 1


def test_an_interrupt_during_the_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "table.csv"
    atomic_write_text("old\n", path)

    def killed(obj, handle):
        handle.write(b"half a fi")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"new": 1}, path)
    assert path.read_text() == "old\n" and _files(tmp_path) == ["table.csv"]


@pytest.mark.parametrize("content,message", [
    (None, "checkpoint {path} does not exist"),
    (b"\x00garbage", "checkpoint {path} is corrupt or not a PyTorch weights file"),
    ([1, 2], "checkpoint {path} holds a list, not a dict of weights"),
    ({"format": "other"}, "checkpoint {path} is not a d2gp-npo file (found: other)"),
    ({"weights": 1}, "checkpoint {path} is not a d2gp-npo file (found: no format tag)"),
])
def test_load_checkpoint_refusals(tmp_path, content, message):
    path = tmp_path / "c.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, "d2gp-npo")
    assert str(error.value).startswith(message.format(path=path))


def test_load_checkpoint_reads_back_and_names_the_file(tmp_path):
    atomic_save({"format": "d2gp-npo", "w": torch.arange(3.0)}, tmp_path / "a.pt")
    data = load_checkpoint(tmp_path / "a.pt", "d2gp-npo")
    assert data["format"] == "d2gp-npo" and torch.equal(data["w"], torch.arange(3.0))
    assert load_checkpoint(tmp_path / "a.pt")["format"] == "d2gp-npo"  # no format asked: any dict
    with pytest.raises(CheckpointError, match="^NPO weights file .* does not exist"):
        load_checkpoint(tmp_path / "missing.pt", what="NPO weights file")


def test_seed_everything_seeds_python_numpy_and_torch():
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(3)
    first = draws()
    seed_everything(3)
    assert draws() == first
    seed_everything(4)
    assert draws() != first


def test_rng_state_round_trip():
    state = rng_state()
    expected = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


def test_training_state_resumes_exactly(tmp_path):
    def setup(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
        return model, optimizer, scheduler, torch.Generator().manual_seed(5)

    def step(model, optimizer, scheduler, generator):
        x = torch.randn(4, 3, generator=generator)
        loss = model(x).pow(2).sum() + torch.rand(1).sum()  # the global stream is part of the state too
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step(float(loss.detach()))

    straight = setup(0)
    step(*straight)
    save_training_state(tmp_path / "s.pt", "fmt", *straight, epoch=1)
    step(*straight)

    resumed = setup(1)  # as in a fresh process: other weights, other random streams
    state = restore_training_state(tmp_path / "s.pt", "fmt", *resumed)
    assert state["epoch"] == 1 and state["format"] == "fmt"
    step(*resumed)
    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    assert json.dumps(straight[2].state_dict()) == json.dumps(resumed[2].state_dict())
    with pytest.raises(CheckpointError, match="is not a other file"):
        restore_training_state(tmp_path / "s.pt", "other", *setup(0))
