"""Denoisers: file formats, clear refusals, resumable training, and the shipped weights."""

import pytest
import torch

from d2gp.checkpoints import CheckpointError, atomic_save
from d2gp.denoisers import build_dncnn, load_denoiser, save_denoiser, shipped_denoiser_path, train_denoiser


def _images(n, channels=1, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Smooth random images: blurred noise, a learnable denoising target.
    x = torch.nn.functional.avg_pool2d(torch.rand((n, channels, size + 3, size + 3), generator=g), 4, stride=1)
    return x


def test_save_load_roundtrip(tmp_path):
    model = build_dncnn(3, depth=4, features=8)
    path = tmp_path / "d.pt"
    save_denoiser(model, path, {"note": "x"})
    loaded = load_denoiser(path, channels=3)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_bare_state_dict_like_deepinv_pretrained(tmp_path):
    model = build_dncnn(1, depth=5, features=16)
    torch.save(model.state_dict(), tmp_path / "dncnn_sigma2_gray.pth")
    loaded = load_denoiser(tmp_path / "dncnn_sigma2_gray.pth")
    assert loaded.depth == 5 and loaded.in_conv.weight.shape[0] == 16


def test_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_denoiser(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch weights file"):
        load_denoiser(tmp_path / "corrupt.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not hold DnCNN weights"):
        load_denoiser(tmp_path / "foreign.pt")
    atomic_save({"format": "d2gp-npo", "state_dict": {}}, tmp_path / "npo.pt")
    with pytest.raises(CheckpointError, match="is a d2gp-npo file"):
        load_denoiser(tmp_path / "npo.pt")
    save_denoiser(build_dncnn(3, 3, 4), tmp_path / "rgb.pt")
    with pytest.raises(CheckpointError, match="3-channel images, the task has 1"):
        load_denoiser(tmp_path / "rgb.pt", channels=1)
    with pytest.raises(CheckpointError, match="no denoiser is shipped"):
        load_denoiser("nosuchtask")


def test_truncated_file_is_refused(tmp_path):
    save_denoiser(build_dncnn(1, 3, 4), tmp_path / "d.pt")
    data = (tmp_path / "d.pt").read_bytes()
    (tmp_path / "d.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_denoiser(tmp_path / "d.pt")


def test_training_lowers_loss_and_resume_is_exact(tmp_path):
    train, val = _images(48), _images(8, seed=1)
    kwargs = dict(depth=3, features=8, epochs=3, batch_size=16, lr=3e-3, seed=0, progress=False)
    with pytest.warns(UserWarning, match="does not denoise yet"):  # 9 steps: better than untrained, not than noise
        model, history = train_denoiser(train, val, **kwargs)
    assert history["loss"][-1] < history["loss"][0]
    assert history["val_psnr"]["0.05"] > history["val_psnr_0.05_untrained"]
    # Interrupted after one epoch, then resumed from the checkpoint: same weights.
    checkpoint = tmp_path / "run.training"
    _stop_after_epochs(train, val, kwargs, checkpoint, epochs_done=1)
    with pytest.warns(UserWarning, match="does not denoise yet"):
        resumed, resumed_history = train_denoiser(train, val, **kwargs, checkpoint_path=checkpoint)
    assert resumed_history["epoch"] == [1, 2, 3]
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def _stop_after_epochs(train, val, kwargs, checkpoint, epochs_done):
    """Simulate a run killed during epoch ``epochs_done + 1``: its end-of-epoch validation raises
    (the first validation scores the untrained model, before epoch 1)."""
    import d2gp.denoisers as module

    calls = {"n": 0}
    original = module.denoiser_psnr

    def psnr_then_die(*args, **kw):
        if calls["n"] == epochs_done + 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(*args, **kw)

    module.denoiser_psnr = psnr_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            module.train_denoiser(train, val, **kwargs, checkpoint_path=checkpoint)
    finally:
        module.denoiser_psnr = original
    assert checkpoint.exists()


@pytest.mark.parametrize("task,channels", [("spc", 1), ("mri", 1), ("sr", 3)])
def test_shipped_weights_exist_and_load(task, channels):
    assert shipped_denoiser_path(task).is_file(), f"no shipped denoiser for {task}"
    model = load_denoiser(task, channels=channels)
    assert sum(p.numel() for p in model.parameters()) < 60_000


def test_scaled_denoiser_and_task_default(tmp_path):
    from d2gp.denoisers import ScaledDenoiser
    from d2gp.tasks import make_task

    model = build_dncnn(1, 3, 4).eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ScaledDenoiser(model, 0.9)(x), 0.9 * model(x))
    with pytest.raises(ValueError, match="scale"):
        ScaledDenoiser(model, 1.5)
    save_denoiser(model, tmp_path / "d.pt")
    assert make_task("spc", denoiser=str(tmp_path / "d.pt")).denoiser().__class__.__name__ == "DnCNN"
    scaled = make_task("mri", denoiser=str(tmp_path / "d.pt")).denoiser()
    assert isinstance(scaled, ScaledDenoiser) and scaled.scale == 0.97
