"""The one place that decides where d2gp computes and in which precision.

Every command that computes takes ``--device auto|cpu|cuda`` (``device=`` in the Python API):
``auto`` is the first CUDA GPU when PyTorch sees one, else the CPU. Operators, denoisers,
preconditioners and images are moved to that device; the measurement noise is always drawn
on the CPU from per-image seeds and then moved, so a given seed gives the same noise on every
device. Weights files and checkpoints are always written from CPU tensors and loaded with
``map_location="cpu"``, so whatever a GPU trained loads on a CPU-only machine.

Precision: evaluation, inference and the teacher's targets are float32 everywhere, so that PSNR
tables do not depend on the machine. Training may go faster: on a GPU with TF32 matrix products
(``precision("training", device)``); in bfloat16 autocast (the denoiser and the NPO in bf16, the
operators and the losses in float32; ``TrainConfig.autocast``), which by default
(``autocast=None``, :func:`use_bf16`) is on for CPUs with AMX bf16 tile instructions — there a
D2GP update at batch 32 took 1.32 s instead of 2.49 s, and the NPOs scored 0.03 dB below
float32-trained ones at K (``benchmarks/results/training_speed/xeon-amx/``,
``benchmarks/results/bf16_quality/``) — and off elsewhere: without AMX tiles it is slower than
float32 (1.1× with AVX-512 bf16 instructions, like AMD's Zen 4; 13× with AVX2 only: oneDNN capped
to those instructions on that Xeon, ``benchmarks/results/training_speed/isa/``), and on GPUs it is
not measured.

Memory format: convolutions run in ``torch.channels_last`` (:func:`prepare`): on this project's
CPUs the shipped DnCNN is 2.4× faster in it (one batch of 32 at 32×32: 52 → 22 ms), and the
ConvNeXt NPO about 2× (``benchmarks/results/training_speed/``).
"""

from __future__ import annotations

import functools
import os
import platform

import torch

__all__ = ["DEVICES", "DeviceError", "resolve_device", "describe_device", "prepare", "precision", "use_bf16",
           "cpu_has_amx_bf16", "to_cpu",
           "module_device", "synchronize"]

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``): CUDA when available, else the CPU; ``"cpu"``; ``"cuda"`` / ``"cuda:N"``.

    Under ``torchrun`` with several processes (:mod:`d2gp.distributed`), ``"auto"`` and ``"cuda"``
    are the process's own GPU, ``cuda:LOCAL_RANK``.

    :raises DeviceError: an unknown name, CUDA asked for on a machine without it, or more processes
        on a machine than it has GPUs.
    """
    from d2gp.distributed import local_rank

    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: PyTorch sees no CUDA GPU on this machine "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        if name == "cuda" and local_rank() is not None:
            if local_rank() >= torch.cuda.device_count():
                raise DeviceError(f"process {local_rank()} of this machine has no GPU of its own: the machine has "
                                  f"{torch.cuda.device_count()}; start at most that many (torchrun --nproc_per_node)")
            name = f"cuda:{local_rank()}"
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise DeviceError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")


def describe_device(device: torch.device) -> str:
    """What the device is, in words, for results files: the GPU's name, or the CPU and its threads."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(index)} (cuda:{index})"
    from d2gp.reports import cpu_model

    return f"CPU: {cpu_model()}, {torch.get_num_threads()} threads of {os.cpu_count()} ({platform.machine()})"


def prepare(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` on ``device`` in the channels-last memory format (its convolutions then run in NHWC).

    A single-channel input is both contiguous and channels-last; PyTorch picks the convolution's
    layout from its weights, so the weights must be channels-last for the whole network to be.
    """
    return module.to(device=device, memory_format=torch.channels_last)


def precision(purpose: str, device: torch.device) -> None:
    """Set the float32 matrix-product precision for ``purpose`` (``"training"`` or ``"evaluation"``).

    Training on a GPU may use TF32 tensor cores (≈ 10-bit mantissa products, float32
    accumulation); evaluation always uses full float32. No effect on the CPU.
    """
    if purpose not in ("training", "evaluation"):
        raise ValueError(f"purpose must be 'training' or 'evaluation', got {purpose!r}")
    if device.type != "cuda":
        return
    fast = purpose == "training"
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast
    torch.backends.cudnn.benchmark = True


@functools.cache  # the CPU does not change: asked once, not in every training update
def cpu_has_amx_bf16() -> bool:
    """Whether oneDNN may use AMX bf16 tile instructions (Intel Xeon from Sapphire Rapids on) for
    bfloat16 convolutions: PyTorch's check, else the kernel's CPU flags — and ``False`` when
    ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below AMX (e.g. ``AVX512_CORE_BF16``, ``AVX2``: then bf16
    convolutions run without tiles, slower than float32; ``benchmarks/training_speed.py``)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap and cap not in ("ALL", "DEFAULT") and "AMX" not in cap:
        return False
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: may vanish
    if check is not None:
        return bool(check())
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def use_bf16(autocast: bool | None, device: torch.device) -> bool:
    """Whether training runs in bfloat16 autocast: ``autocast`` when given, else (``None``, the
    default) on for a CPU with AMX bf16 (:func:`cpu_has_amx_bf16`), off on other CPUs and on GPUs."""
    if autocast is not None:
        return bool(autocast)
    return torch.device(device).type == "cpu" and cpu_has_amx_bf16()


def to_cpu(state: dict) -> dict:
    """A state dict with every tensor detached, cloned and on the CPU (what weights files hold)."""
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def module_device(module) -> torch.device:
    """Where a module (an operator, a network) keeps its parameters or buffers; the CPU if it has none."""
    for tensor in (*module.parameters(), *module.buffers()) if isinstance(module, torch.nn.Module) else ():
        return tensor.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously): call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
