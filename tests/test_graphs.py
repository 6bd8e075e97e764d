"""GraphedLoss (``d2gp train --cuda-graph``): the loss with its gradients computed, replayed as a CUDA
graph on a GPU. Its bookkeeping (static inputs, gradients written in place, another batch shape
run eagerly) is the same code with or without the recording, so it is tested here on the CPU;
the recording itself only where a GPU is (the last test)."""

import json

import pytest
import torch

from d2gp import training
from d2gp.graphs import GraphedLoss
from d2gp.preconditioners.files import load_npo
from d2gp.tasks import make_task
from d2gp.training import TrainingError, train

from test_training import _config, _train, tiny  # noqa: F401 - the fixture


def _model_and_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

    def loss_fn(x, target, unused):
        assert unused is None
        error = model(x) - target
        return error.pow(2).mean(), {"abs": error.abs().mean()}

    return model, loss_fn


def _reference_gradients(model, loss_fn, *inputs):
    model.zero_grad(set_to_none=True)
    loss, _ = loss_fn(*inputs)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


def test_graphed_loss_returns_the_loss_with_its_gradients_written_in_place():
    """Each call gives the loss and terms of its own inputs and replaces (never accumulates) the
    gradients, in the same gradient tensors from call to call; a batch of another shape runs
    eagerly into those same tensors."""
    model, loss_fn = _model_and_loss()
    graphed = GraphedLoss(loss_fn, list(model.parameters()), capture=False)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)) for _ in range(3)]
    batches.append((torch.randn(5, 3, generator=g), torch.randn(5, 1, generator=g)))  # the last, smaller one
    grads = None
    for x, target in batches:
        loss, terms = graphed(x, target, None)
        got = [p.grad.clone() for p in model.parameters()]
        if grads is None:
            grads = [p.grad for p in model.parameters()]
        assert all(p.grad is kept for p, kept in zip(model.parameters(), grads))  # the same tensors
        expected_loss, expected = _reference_gradients(model, loss_fn, x, target, None)
        assert float(loss) == expected_loss and terms.keys() == {"abs"} and not loss.requires_grad
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        for p, kept in zip(model.parameters(), grads):  # undo the reference's replacement
            p.grad = kept
    assert graphed.replays == 0  # nothing was recorded on the CPU


def test_training_with_cuda_graph_takes_the_eager_runs_steps_bit_for_bit(tiny, tmp_path):
    """train(cuda_graph=True) — on a CPU the same loop without the recording — ends with the weights
    of the eager run, with an epoch's last batch smaller than the others (run eagerly); config.json
    records the option."""
    config = _config(tiny, epochs=2, train_images=12)
    task = make_task(config.task, **config.task_settings)
    for name, graphed in (("eager", False), ("graphed", True)):  # 12 images: batches of 8 and 4
        train(config, tmp_path / name, task=task, train_images=tiny["train"][:12], val_images=tiny["val"],
              progress=False, cuda_graph=graphed)
    a, _ = load_npo(tmp_path / "eager" / "last.pt", task)
    b, _ = load_npo(tmp_path / "graphed" / "last.pt", task)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert json.loads((tmp_path / "graphed" / "config.json").read_text())["runtime"]["cuda_graph"] is True


@pytest.mark.parametrize("kwargs, overrides, message", [
    ({"compile": True}, {}, "choose one"),
    ({}, {"teacher_gradient": "teacher"}, "cached targets"),
    ({}, {"teacher_cache": False}, "cached targets"),
])
def test_cuda_graph_refuses_what_it_cannot_record(tiny, tmp_path, kwargs, overrides, message):
    with pytest.raises(TrainingError, match=message):
        _train(tiny, _config(tiny, **overrides), tmp_path / "run", cuda_graph=True, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_loss_replays_the_eager_gradients_on_a_gpu(tiny):  # noqa: F811
    """On a GPU: the recorded unrolled loss replays the eager update's loss and gradients."""
    config = _config(tiny)
    task = make_task(config.task, device="cuda", **config.task_settings)
    denoiser = task.denoiser().requires_grad_(False)
    npo = training.build_preconditioner(config, task)
    x = tiny["train"][:8].cuda()
    teacher = training.TeacherTargets(task, denoiser, x, config.iterations)
    unrolled = training.functools.partial(training.unrolled_loss, config, task, npo, denoiser)
    graphed = GraphedLoss(unrolled, list(npo.parameters()))
    grads = None
    for seed in (1, 2):
        y_s = training.measure(task.student, x, seed=seed)
        loss, _ = graphed(x, y_s, *teacher[torch.arange(8, device="cuda")])
        if grads is None:
            grads = [p.grad for p in npo.parameters()]  # the graph's own gradient tensors
        got, value = [p.grad.clone() for p in npo.parameters()], float(loss)
        npo.zero_grad(set_to_none=True)
        reference, _ = unrolled(x, y_s, *teacher[torch.arange(8, device="cuda")])
        reference.backward()
        assert value == pytest.approx(float(reference.detach()), rel=1e-5)
        worst = max(float((a - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30))
                    for a, p in zip(got, npo.parameters()))
        assert worst < 1e-4, f"seed {seed}: gradients differ by {worst:.2e} of their largest entry"
        for p, kept in zip(npo.parameters(), grads):  # give the graph its gradient tensors back
            p.grad = kept
    assert graphed.replays == 2
