"""The unrolled loss and its gradients replayed as one CUDA graph (``d2gp train --cuda-graph``).

An eager D2GP update on a GPU is launch-bound: K iterations × (denoiser + NPO + operator), forward
and backward, are thousands of small kernels, and the GPU waits for the CPU to launch each one
(``benchmarks/gpu_step.py``). :class:`GraphedLoss` records them once with :class:`torch.cuda.CUDAGraph`
and then replays the whole forward and backward pass with one launch: the same kernels on the
same data, so the same numbers as the eager update, with no compilation (``torch.compile``'s
CUDA graphs first spend minutes compiling the unrolled graph).

The recording needs fixed shapes and addresses: each call copies its inputs into static tensors,
and the parameters' gradients are the graph's own tensors from then on (each replay overwrites
them). A batch of another shape (an epoch's last, smaller one) runs eagerly into those same
gradient tensors. The optimizer step stays outside the graph (a dozen kernels), so the learning
rate schedule, gradient clipping and checkpoints are those of the eager loop. Nothing in the
unrolled loss may synchronise with the host (:func:`d2gp.training.unrolled_loss` does not: its
loss terms stay tensors).

With ``capture=False`` (a CPU) every call runs eagerly into the same gradient tensors: what the
training loop sees is the same, which is how it is tested on a machine without a GPU.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["GraphedLoss"]


class GraphedLoss:
    """``loss, terms = graphed(*inputs)``: the value of ``loss_fn(*inputs)`` with the gradients of
    ``parameters`` already computed (written into their ``.grad``, replacing what was there).

    :param loss_fn: ``(*inputs) -> (loss, {name: tensor})``, tensors or ``None`` as inputs, no host
        synchronisation inside.
    :param parameters: the trained parameters (their ``.grad`` becomes the graph's).
    :param capture: record a CUDA graph on the first call (inputs on a CUDA device); ``False``: run
        eagerly.
    :param warmup: eager forward and backward passes (gradients discarded) on a side stream before
        the recording, as CUDA graph capture requires (lazy initialisation, cuDNN's algorithm search).
    """

    def __init__(self, loss_fn: Callable, parameters: Sequence[torch.nn.Parameter], capture: bool = True,
                 warmup: int = 3):
        self.loss_fn = loss_fn
        self.parameters = [p for p in parameters if p.requires_grad]
        self.capture = capture
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[torch.Tensor | None] | None = None
        self.static_outputs: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self.replays = 0  #: calls answered by the graph (the others ran eagerly)

    def _matches(self, inputs: Sequence[torch.Tensor | None]) -> bool:
        return all((a is None and b is None) or (a is not None and b is not None and a.shape == b.shape
                                                 and a.dtype == b.dtype and a.device == b.device)
                   for a, b in zip(inputs, self.static_inputs, strict=True))

    def _eager(self, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for p in self.parameters:  # write into the gradient tensors the graph uses (never replace them)
            if p.grad is not None:
                p.grad.zero_()
        loss, terms = self.loss_fn(*inputs)
        loss.backward()
        return loss.detach(), {k: v.detach() for k, v in terms.items()}

    def _record(self, inputs) -> None:
        self.static_inputs = [None if t is None else t.detach().clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                loss, terms = self.loss_fn(*self.static_inputs)
                loss.backward()
                del loss, terms  # free its autograd graph: the recording must not reuse its gradient accumulators
                for p in self.parameters:
                    p.grad = None
        torch.cuda.current_stream().wait_stream(side)
        for p in self.parameters:
            p.grad = None  # the backward inside the graph allocates them in its memory pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss, terms = self.loss_fn(*self.static_inputs)
            loss.backward()
        self.static_outputs = (loss.detach(), {k: v.detach() for k, v in terms.items()})

    def __call__(self, *inputs: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.capture:
            return self._eager(inputs)
        if self.graph is None:
            self._record(inputs)
        elif not self._matches(inputs):
            return self._eager(inputs)
        else:
            for static, given in zip(self.static_inputs, inputs):
                if static is not None:
                    static.copy_(given)
        self.graph.replay()
        self.replays += 1
        return self.static_outputs
