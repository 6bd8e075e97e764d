"""Fixtures shared by the test modules."""

import pytest
import torch

from d2gp.denoisers import build_dncnn, save_denoiser


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest, and avoids OpenMP contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_denoiser(tmp_path_factory):
    """A 3-layer, 8-feature DnCNN (seeded, output layer damped so PnP stays tame), saved to a file."""
    path = tmp_path_factory.mktemp("denoiser") / "dncnn.pt"
    torch.manual_seed(0)
    denoiser = build_dncnn(1, depth=3, features=8)
    with torch.no_grad():
        denoiser.out_conv.weight.mul_(0.1)
    save_denoiser(denoiser, path)
    return path
