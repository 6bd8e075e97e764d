"""Data-parallel training over several processes (``torchrun``): the process group and what ranks share.

``torchrun --nproc_per_node N -m d2gp train …`` starts N processes and describes them in the
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``).
:func:`process_group` joins them — backend ``nccl`` when the device is a CUDA GPU (each process
on ``cuda:LOCAL_RANK``, see :func:`d2gp.device.resolve_device`), ``gloo`` on the CPU — and
leaves the group at the end; it also takes an explicit rank, world size and ``init_method``
(``file://…``, ``tcp://127.0.0.1:PORT``) for processes started from Python
(``torch.multiprocessing.spawn``). Without a process group everything here is the
single-process identity, so code written with it runs unchanged in one process.

What ranks share (:func:`d2gp.training.train` uses these):

* :func:`from_rank0`: rank 0 computes something (reads or writes the run directory, measures the
  validation PSNR) and every rank gets its result, or the exception it raised, so that all ranks
  take the same decisions and fail together instead of waiting for each other forever;
* :func:`share`: the contiguous part of a batch that a rank computes;
* :func:`sum_gradients`, :func:`sum_values`: sums over ranks (of the gradients each rank's
  share-weighted loss gave, of the loss terms for the log).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

__all__ = ["process_group", "active", "rank", "world_size", "backend", "local_rank", "from_rank0",
           "rank0_context", "share", "sum_gradients", "sum_values"]

T = TypeVar("T")


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many processes train together (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def backend() -> str | None:
    """The process group's backend (``"gloo"``, ``"nccl"``), ``None`` without one."""
    return str(dist.get_backend()) if active() else None


def local_rank() -> int | None:
    """This process's index on its machine as torchrun gives it (``LOCAL_RANK``), ``None`` outside torchrun
    (or with a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ["LOCAL_RANK"])


@contextlib.contextmanager
def process_group(device: torch.device, *, rank: int | None = None, world_size: int | None = None,
                  init_method: str | None = None) -> Iterator[None]:
    """Join the process group for the block: ``nccl`` on a CUDA device, ``gloo`` on the CPU.

    Without arguments the group is the one torchrun describes in the environment; nothing happens
    when it has a single process, or when a group is initialised already (then its owner leaves it).

    :param device: this process's device (:func:`d2gp.device.resolve_device`, ``cuda:LOCAL_RANK`` under torchrun).
    :param rank, world_size, init_method: an explicit group (processes started from Python), e.g.
        ``init_method="file:///tmp/x"`` or ``"tcp://127.0.0.1:29500"``.
    :raises RuntimeError: the backend is not available in this PyTorch build.
    """
    size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    name = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or not getattr(dist, f"is_{name}_available")():
        raise RuntimeError(f"training in {size} processes needs the {name} backend of torch.distributed, which this "
                           f"PyTorch build ({torch.__version__}) lacks")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    explicit = {"rank": rank, "world_size": size, "init_method": init_method} if rank is not None else {}
    dist.init_process_group(name, **explicit)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _broadcast(outcome: tuple[bool, object] | None) -> tuple[bool, object]:
    """Rank 0's ``outcome`` — ``(True, result)`` or ``(False, exception)`` — on every rank; one that does not
    pickle arrives as ``(False, RuntimeError)`` naming it."""
    if rank() == 0:
        try:
            pickle.dumps(outcome)
        except Exception as error:  # a result or an exception that cannot travel: send what it was
            ok, value = outcome
            what = f"a {type(value).__name__}" if ok else f"the error {value!r}"
            outcome = (False, RuntimeError(f"rank 0 got {what}, which cannot be sent to the other processes ({error})"))
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_rank0(compute: Callable[[], T]) -> T:
    """``compute()``, run on rank 0 only; every rank returns its result or raises the exception it raised.

    Rank 0 alone reads and writes the run directory (which need not be shared between machines),
    and every rank takes the decisions it makes. Exceptions are caught whatever their kind
    (``KeyboardInterrupt`` included), so that the others never wait forever for rank 0.

    :param compute: a function of no arguments; its result must pickle (it is broadcast).
    """
    if not active():
        return compute()
    outcome = None
    if rank() == 0:
        try:
            outcome = (True, compute())
        except BaseException as error:
            outcome = (False, error)
    ok, value = _broadcast(outcome)
    if ok:
        return value
    if rank() == 0 and not outcome[0]:
        raise outcome[1]  # the original, with its traceback
    raise value


@contextlib.contextmanager
def rank0_context(enter: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Hold the context manager ``enter()`` on rank 0 for the block (the run directory's lock);
    if rank 0 cannot enter it, every rank raises its exception."""
    with contextlib.ExitStack() as stack:
        def hold() -> None:
            stack.enter_context(enter())

        from_rank0(hold)
        yield


def share(count: int) -> tuple[int, int]:
    """The contiguous part ``[start, stop)`` of ``count`` items (a batch) that this rank computes: the
    first ``count % world_size`` ranks get one more than the others. A rank may get none."""
    size, me = world_size(), rank()
    small, extra = divmod(count, size)
    start = me * small + min(me, extra)
    return start, start + small + (me < extra)


def sum_gradients(parameters) -> None:
    """Sum the gradients of ``parameters`` over all ranks, in place (one flat all-reduce).

    Parameters without a gradient are left out: which ones have none depends on the settings
    (a truncated unroll, an unused term), never on the data, so it is the same on every rank.
    """
    if not active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    start = 0
    for g in grads:
        g.copy_(flat[start:start + g.numel()].view(g.shape))
        start += g.numel()


def sum_values(values: list[float], device: torch.device) -> list[float]:
    """The sums over all ranks of a list of numbers (in float64), one all-reduce."""
    if not active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
