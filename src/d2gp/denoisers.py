r"""DnCNN denoisers for the plug-and-play prior: build, train, save, load.

The architecture is deepinv's :class:`deepinv.models.DnCNN` (residual: :math:`D(x) = x + N(x)`),
blind (no noise-level input). deepinv's pretrained weights download from a hub, which fails
offline, so d2gp trains its own with :func:`train_denoiser` (``d2gp train-denoiser``) and ships
one per task in ``d2gp/weights/dncnn_<task>.pt``. The shipped ones are 7 layers of 32 features
(≈ 47 k parameters), about 9× cheaper per call than the paper's 20 × 64 DnCNN
(``benchmarks/denoiser_cost.py``).

The training noise range decides whether PnP-FISTA is *stable* when iterated: a denoiser
trained on σ ∈ [0.01, 0.1] made MRI and SR diverge by K = 100, one trained on [0.01, 0.2]
did not. The shipped weights are checked to K = 100 (``tests/test_denoisers.py``).

A weights file is a dict ``{"format": "d2gp-denoiser", "architecture": {...},
"state_dict": ..., "training": {...}}``; :func:`load_denoiser` also takes a bare DnCNN
``state_dict`` (e.g. deepinv's pretrained ``dncnn_sigma2_*.pth`` files), inferring the
architecture from the tensor shapes. Files are checked before anything is allocated: the
declared architecture must match the tensor shapes and stay under :data:`MAX_PARAMETERS`, and
weights that are not finite (a diverged training) are refused both when saving and loading.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from deepinv.models import DnCNN
from tqdm.auto import tqdm

from d2gp.checkpoints import (
    CheckpointError, atomic_save, load_checkpoint, require_entries, restore_training_state, save_training_state,
    seed_everything,
)

__all__ = [
    "DENOISER_FORMAT", "MAX_PARAMETERS", "DenoiserError", "build_dncnn", "load_denoiser", "save_denoiser",
    "shipped_denoiser_path", "check_training_settings", "train_denoiser", "denoiser_psnr", "ScaledDenoiser",
]

DENOISER_FORMAT = "d2gp-denoiser"
_CHECKPOINT_FORMAT = "d2gp-denoiser-training"
#: DnCNN weights files asking for more parameters than this are refused before anything is allocated
#: (the shipped ones have 47 k, the paper's 20×64 DnCNN 666 k; 10⁸ float32 parameters are 400 MB).
MAX_PARAMETERS = 100_000_000


class DenoiserError(ValueError):
    """A denoiser cannot be trained or saved with these settings (bad values, a NaN loss, NaN weights)."""


def build_dncnn(channels: int = 1, depth: int = 7, features: int = 32) -> DnCNN:
    """A randomly initialised DnCNN (never use one untrained: iterated, it diverges)."""
    if channels < 1 or depth < 2 or features < 1:
        raise ValueError(f"DnCNN needs channels ≥ 1, depth ≥ 2, features ≥ 1; got {channels}, {depth}, {features}")
    return DnCNN(in_channels=channels, out_channels=channels, depth=depth, nf=features, pretrained=None)


class ScaledDenoiser(torch.nn.Module):
    r"""The PnP prior :math:`c\,D(x)` with :math:`0 < c \le 1`.

    Inside PnP-FISTA, the null space of A is governed by the denoiser alone, with momentum: a
    direction where the Jacobian of D has an eigenvalue λ ≥ 1 grows (linearly at λ = 1,
    exponentially above), and a DnCNN trained on Gaussian noise passes image-like directions with
    λ ≈ 1. Scaling by c < 1 makes every such eigenvalue c·λ < 1, so the iteration settles; the
    small shrinkage it adds is undone by the data term wherever A measures.
    ``benchmarks/pnp_stability.py`` measures PSNR to K = 100 for several c on the validation split;
    the task defaults (``denoiser_scale``) come from it.
    """

    def __init__(self, denoiser: torch.nn.Module, scale: float):
        super().__init__()
        if not 0 < scale <= 1:
            raise ValueError(f"the denoiser scale must be in (0, 1], got {scale}")
        self.denoiser, self.scale = denoiser, float(scale)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.scale * self.denoiser(x, *args, **kwargs)


def shipped_denoiser_path(task: str) -> Path:
    """Where the denoiser shipped for ``task`` lies inside the package."""
    return Path(str(resources.files("d2gp") / "weights" / f"dncnn_{task}.pt"))


def _architecture_of(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, int]:
    """Infer (channels, depth, features) of a bare DnCNN state dict."""
    if "in_conv.weight" not in state_dict or "out_conv.weight" not in state_dict:
        sample = ", ".join(map(str, list(state_dict)[:4]))
        raise CheckpointError(f"{path} does not hold DnCNN weights (keys: {sample}, …)")
    weight = state_dict["in_conv.weight"]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise CheckpointError(f"{path} does not hold DnCNN weights (in_conv.weight is not a 4-D tensor)")
    layers = {key.split(".")[1] for key in state_dict if isinstance(key, str) and key.startswith("conv_list.")}
    return {"channels": int(weight.shape[1]), "depth": len(layers) + 2, "features": int(weight.shape[0])}


def _images_of(task: str) -> str:
    """The task whose shipped denoiser ``task`` uses (its own name for most): tasks with the same one
    denoise the same images."""
    from d2gp.tasks import TASKS

    return getattr(TASKS.get(task), "shipped_denoiser", "") or task


def _check_architecture(architecture: dict, state_dict: dict, path: Path) -> dict[str, int]:
    """The architecture of a weights file, checked against its tensors and :data:`MAX_PARAMETERS`
    before a DnCNN of that size is allocated."""
    found = _architecture_of(state_dict, path)
    if any(not isinstance(architecture.get(key), int) or architecture[key] != found[key] for key in found):
        raise CheckpointError(f"denoiser weights file {path} declares the architecture {architecture}, "
                              f"but its weights are those of {found}: it is damaged or was not written by d2gp")
    channels, depth, features = found["channels"], found["depth"], found["features"]
    parameters = 9 * features * (2 * channels + (depth - 2) * features)
    if parameters > MAX_PARAMETERS:
        raise CheckpointError(f"denoiser weights file {path} asks for a DnCNN of {parameters:.2g} parameters "
                              f"({found}), above {MAX_PARAMETERS:.0e}: refused")
    return found


def load_denoiser(source: str | os.PathLike, channels: int | None = None, task: str | None = None) -> DnCNN:
    """Load a DnCNN: a task name (its shipped weights) or a weights file.

    :param source: ``"spc"``, ``"mri"``, ``"sr"`` or a path.
    :param channels: if given, the number of image channels the denoiser must have.
    :param task: if given, the task it is loaded for: a file whose training metadata names a task
        of other images loads with a warning naming that task (tasks that share a shipped denoiser,
        like ``spc`` and ``spc-binary``, share their images).
    :raises CheckpointError: the file is missing, corrupt, not DnCNN weights, has other channels,
        declares another architecture than its tensors, is too large, or holds non-finite weights.
    """
    path = Path(source)
    if not path.suffix and not path.exists():  # a task name
        path = shipped_denoiser_path(str(source))
        if not path.is_file():
            shipped = ", ".join(sorted(p.stem[len("dncnn_"):] for p in path.parent.glob("dncnn_*.pt")))
            raise CheckpointError(
                f"no denoiser is shipped for {source!r} (shipped: {shipped}); give the task a denoiser — a DnCNN "
                f"weights file, or a task whose shipped one fits its images (own_task(..., denoiser='spc'), the "
                f"setting --denoiser, a TaskConfig's shipped_denoiser) — or train one with "
                f"`d2gp [--import MODULE] train-denoiser --task {source} --out FILE`"
            )
    data = load_checkpoint(path, what="denoiser weights file")
    if data.get("format") == DENOISER_FORMAT:
        require_entries(data, {"architecture": dict, "state_dict": dict}, path, "denoiser weights file")
        state_dict = data["state_dict"]
        architecture = _check_architecture(data["architecture"], state_dict, path)
    elif "format" in data:
        raise CheckpointError(f"denoiser weights file {path} is a {data['format']} file, not {DENOISER_FORMAT}")
    else:
        state_dict = data.get("state_dict", data)
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{path} does not hold DnCNN weights (its state_dict is a {type(state_dict).__name__})")
        architecture = _check_architecture(_architecture_of(state_dict, path), state_dict, path)
    if not all(torch.isfinite(v).all() for v in state_dict.values() if isinstance(v, torch.Tensor)):
        raise CheckpointError(f"denoiser weights file {path} holds NaN or infinite weights (a diverged training): "
                              f"train it again with a lower --lr")
    training = data.get("training") if isinstance(data.get("training"), dict) else {}
    trained_for = training.get("task", {}).get("task") if isinstance(training.get("task"), dict) else None
    if task is not None and isinstance(trained_for, str) and _images_of(trained_for) != _images_of(task):
        warnings.warn(f"the denoiser {path} was trained for task {trained_for!r}, not {task!r}", stacklevel=2)
    if channels is not None and architecture["channels"] != channels:
        raise CheckpointError(
            f"denoiser {path} works on {architecture['channels']}-channel images, the task has {channels}"
        )
    model = build_dncnn(architecture["channels"], architecture["depth"], architecture["features"])
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise CheckpointError(f"denoiser weights {path} do not fit a DnCNN {architecture}: {str(error)[:200]}") from None
    return model.eval()


def save_denoiser(model: DnCNN, path: str | os.PathLike, training: dict[str, Any] | None = None) -> None:
    """Save ``model`` as a d2gp denoiser weights file (atomically).

    :param training: metadata kept in the file (``"task"``: the task's configuration dict, whose
        ``"task"`` entry :func:`load_denoiser` compares with the task it is loaded for).
    :raises DenoiserError: the weights are not finite (nothing is written).
    """
    if not all(torch.isfinite(p).all() for p in model.state_dict().values()):
        raise DenoiserError(f"refusing to save {path}: the denoiser's weights are NaN or infinite (training "
                            f"diverged); train again with a lower --lr")
    architecture = {
        "channels": int(model.in_conv.weight.shape[1]),
        "depth": int(model.depth),
        "features": int(model.in_conv.weight.shape[0]),
    }
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    atomic_save({"format": DENOISER_FORMAT, "architecture": architecture, "state_dict": state,
                 "training": training or {}}, path)


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90° rotations (the 8 symmetries of the square), one per batch."""
    k = int(torch.randint(4, (1,), generator=generator))
    batch = torch.rot90(batch, k, dims=(-2, -1))
    if bool(torch.randint(2, (1,), generator=generator)):
        batch = batch.flip(-1)
    return batch


@torch.no_grad()
def denoiser_psnr(model, images: torch.Tensor, sigma: float, seed: int = 0, batch_size: int = 128) -> float:
    """Mean PSNR (peak 1) of ``model`` on ``images`` + N(0, σ²) noise with a fixed seed (on the device of
    ``model``'s weights; ``torch.nn.Identity()`` scores the noisy input itself)."""
    generator = torch.Generator().manual_seed(seed)
    weight = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    device = weight.device if weight is not None else images.device
    total = 0.0
    for start in range(0, len(images), batch_size):
        clean = images[start:start + batch_size]
        noisy = (clean + sigma * torch.randn(clean.shape, generator=generator)).to(device)
        clean = clean.to(device)
        mse = (model(noisy) - clean).flatten(1).pow(2).mean(1).clamp_min(1e-12)
        total += float((-10 * torch.log10(mse)).sum())
    return total / len(images)


def check_training_settings(*, depth: int, features: int, sigma_min: float, sigma_max: float, epochs: int,
                            batch_size: int, lr: float) -> None:
    """Raise :class:`DenoiserError` naming the first setting :func:`train_denoiser` cannot train with."""
    for name, value, low in (("depth", depth, 2), ("features", features, 1), ("epochs", epochs, 1),
                             ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            why = " (an untrained DnCNN is no denoiser)" if name == "epochs" else ""
            raise DenoiserError(f"{name} must be an integer ≥ {low}{why}, got {value!r}")
    if not (0 <= sigma_min <= sigma_max and 0 < sigma_max and math.isfinite(sigma_max)):
        raise DenoiserError(f"need 0 ≤ sigma_min ≤ sigma_max, sigma_max > 0 and finite; got {sigma_min}, {sigma_max}")
    if not (lr > 0 and math.isfinite(lr)):
        raise DenoiserError(f"lr must be a finite number > 0, got {lr}")
    parameters = 9 * features * (2 + (depth - 2) * features)
    if parameters > MAX_PARAMETERS:
        raise DenoiserError(f"a DnCNN of depth {depth} and {features} features has {parameters:.2g} parameters, "
                            f"above {MAX_PARAMETERS:.0e}")


def _fingerprint(images: torch.Tensor) -> str:
    """A short hash of a tensor's shape and values (a resumed run must train on the same images)."""
    digest = hashlib.sha1(str(tuple(images.shape)).encode())
    digest.update(images.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def train_denoiser(
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    *,
    depth: int = 7,
    features: int = 32,
    sigma_min: float = 0.01,
    sigma_max: float = 0.2,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device | None = "cpu",
) -> tuple[DnCNN, dict[str, Any]]:
    r"""Train a blind DnCNN on ``train_images`` + N(0, σ²), σ ~ U[σ_min, σ_max] per image.

    σ_min = 0 includes (nearly) clean inputs, which teaches the denoiser to leave a clean image
    alone: iterated inside PnP-FISTA it then drifts far less in the null space of A.

    L2 loss, Adam with a cosine learning-rate decay, random flips/rotations. With
    ``checkpoint_path`` the state is written atomically after every epoch, and a run started
    again with the same path resumes where it stopped (same result as an uninterrupted run); it
    refuses to resume with other settings or images than those the checkpoint was made with.

    :param device: where to train (``"auto"``: a CUDA GPU when there is one); the noise is drawn
        on the CPU, so a seed gives the same training data on every device.
    :return: the trained model (eval mode, on the CPU) and a history dict (per-epoch loss,
        validation PSNR at σ = 0.05 and the final validation PSNR per σ).
    :raises DenoiserError: bad settings (:func:`check_training_settings`), no images, a loss or
        validation PSNR that became NaN/Inf (training stops; the last epoch's checkpoint stays), or
        a model that ends below its untrained validation PSNR (diverged while finite). A model
        that ends below the noisy input's PSNR (it does not denoise yet) only warns.
    :raises ~d2gp.checkpoints.CheckpointError: the checkpoint was made with other settings or images.
    """
    from d2gp.device import prepare, resolve_device

    check_training_settings(depth=depth, features=features, sigma_min=sigma_min, sigma_max=sigma_max, epochs=epochs,
                            batch_size=batch_size, lr=lr)
    device = resolve_device(device)
    if len(train_images) == 0 or len(val_images) == 0:
        raise DenoiserError("train_denoiser needs non-empty training and validation images")
    settings = dict(depth=depth, features=features, sigma_min=sigma_min, sigma_max=sigma_max, epochs=epochs,
                    batch_size=batch_size, lr=lr, seed=seed, train_images=_fingerprint(train_images),
                    val_images=_fingerprint(val_images))
    seed_everything(seed)
    channels = train_images.shape[1]
    model = prepare(build_dncnn(channels, depth, features), device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train_images) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch, eta_min=lr / 50)
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, Any] = {"epoch": [], "loss": [], "val_psnr_0.05": [], "seconds": [],
                               "val_psnr_0.05_untrained": denoiser_psnr(model.eval(), val_images, 0.05)}
    start_epoch = 0
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        state = restore_training_state(checkpoint_path, _CHECKPOINT_FORMAT, model, optimizer, scheduler, generator,
                                       what="denoiser training checkpoint", settings=settings)
        history, start_epoch = state["history"], state["epoch"]

    for epoch in range(start_epoch, epochs):
        began = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        running = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"denoiser epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for step in bar:
            clean = _augment(train_images[order[step * batch_size:(step + 1) * batch_size]], generator)
            sigma = sigma_min + (sigma_max - sigma_min) * torch.rand((len(clean), 1, 1, 1), generator=generator)
            noisy = (clean + sigma * torch.randn(clean.shape, generator=generator)).to(device)
            clean = clean.to(device)
            loss = (model(noisy) - clean).pow(2).mean()
            if not torch.isfinite(loss):
                raise DenoiserError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; training "
                                    f"stopped and no weights were saved — lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item()
            bar.set_postfix(loss=f"{loss.item():.2e}")
        model.eval()
        history["epoch"].append(epoch + 1)
        history["loss"].append(running / steps_per_epoch)
        history["val_psnr_0.05"].append(denoiser_psnr(model, val_images, 0.05))
        history["seconds"].append(time.perf_counter() - began)
        if not math.isfinite(history["val_psnr_0.05"][-1]):
            raise DenoiserError(f"the validation PSNR became {history['val_psnr_0.05'][-1]} at epoch {epoch + 1}: the "
                                f"weights diverged; training stopped and no weights were saved — lower --lr")
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {history['loss'][-1]:.3e}, "
                       f"val PSNR at σ=0.05 {history['val_psnr_0.05'][-1]:.2f} dB")
        if checkpoint_path is not None:
            save_training_state(checkpoint_path, _CHECKPOINT_FORMAT, model, optimizer, scheduler, generator,
                                history=history, epoch=epoch + 1, settings=settings)
    model.eval()
    history["val_psnr"] = {f"{s:g}": denoiser_psnr(model, val_images, s) for s in (0.01, 0.05, 0.1, 0.2)}
    _check_outcome(history["val_psnr"]["0.05"], history.get("val_psnr_0.05_untrained", -math.inf),
                   denoiser_psnr(torch.nn.Identity(), val_images, 0.05))
    return model.cpu(), history


def _check_outcome(trained: float, untrained: float, noisy: float) -> None:
    """Refuse a denoiser that training made worse than its random start (it diverged, finite or not);
    warn when it is still worse than no denoiser at all (the noisy input), at σ = 0.05."""
    if not trained >= untrained:
        raise DenoiserError(f"training diverged: the validation PSNR at σ = 0.05 went from {untrained:.2f} dB "
                            f"(untrained) to {trained:.2f} dB; no weights were saved — lower --lr")
    if trained < noisy:
        warnings.warn(f"the denoiser does not denoise yet: its validation PSNR at σ = 0.05 is {trained:.2f} dB, "
                      f"below the noisy input's {noisy:.2f} dB; train it longer", stacklevel=3)
