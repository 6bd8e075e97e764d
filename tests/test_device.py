"""The one place that decides the device: names, errors, layouts; seeded noise that does not depend on it."""

import pytest
import torch
from deepinv.physics import GaussianNoise

import d2gp.device as device_module
from d2gp.device import (DeviceError, cpu_has_amx_bf16, describe_device, module_device, precision, prepare,
                          resolve_device, to_cpu, use_bf16)
from d2gp.preconditioners import NPO
from d2gp.tasks import make_task
from d2gp.tasks.base import measure


def test_resolve_device_names_and_errors(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert "CPU" in describe_device(torch.device("cpu"))


def test_prepare_makes_convolutions_channels_last_and_to_cpu_detaches():
    conv = prepare(torch.nn.Conv2d(1, 4, 3), torch.device("cpu"))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    out = conv(torch.randn(2, 1, 8, 8))  # a one-channel input is ambiguous: the weights decide
    assert out.is_contiguous(memory_format=torch.channels_last)
    state = to_cpu(NPO().state_dict())
    assert all(not v.requires_grad and v.device.type == "cpu" for v in state.values())
    assert module_device(conv) == torch.device("cpu") and module_device(lambda v: v) == torch.device("cpu")
    precision("training", torch.device("cpu"))  # no effect, no error on the CPU
    with pytest.raises(ValueError, match="purpose"):
        precision("inference", torch.device("cpu"))


def test_bf16_by_default_only_on_cpus_with_amx(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for amx in (True, False):
        monkeypatch.setattr(device_module, "cpu_has_amx_bf16", lambda amx=amx: amx)
        assert use_bf16(None, cpu) is amx and use_bf16(None, "cpu") is amx
        assert use_bf16(None, cuda) is False  # TF32 there; bf16 on GPUs is not measured
        assert use_bf16(True, cpu) is True and use_bf16(False, cpu) is False  # a setting given wins
        assert use_bf16(True, cuda) is True


def test_amx_detection_falls_back_to_cpuinfo(monkeypatch, tmp_path):
    flags = any("amx_bf16" in line.split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    cpu_has_amx_bf16.cache_clear()
    assert cpu_has_amx_bf16() is flags  # torch's check and the kernel's flags agree
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    cpu_has_amx_bf16.cache_clear()
    assert cpu_has_amx_bf16() is flags
    cpu_has_amx_bf16.cache_clear()  # not the fallback's answer for the tests after this one


def test_amx_detection_respects_a_onednn_isa_cap(monkeypatch):
    """Below AMX (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, AVX2, …) oneDNN's bf16 convolutions have no
    tiles, so an unset autocast stays float32; a cap at or above AMX leaves the CPU's answer."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    try:
        for cap, amx in (("AVX2", False), ("avx512_core_bf16", False), ("AVX512_CORE_AMX", True), ("ALL", True),
                         ("", True)):
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
            cpu_has_amx_bf16.cache_clear()
            assert cpu_has_amx_bf16() is amx, cap
            assert use_bf16(None, "cpu") is amx
    finally:
        cpu_has_amx_bf16.cache_clear()


def test_seeded_noise_is_deepinvs_and_per_image():
    """measure() draws the same numbers as deepinv's GaussianNoise seeded per image, whatever the batching."""
    task = make_task("spc", image_size=16)
    x = torch.rand(3, 1, 16, 16)
    y = measure(task.student, x, seed=7)
    clean = task.student.A(x)
    reference = GaussianNoise(sigma=task.config.noise_sigma, rng=torch.Generator())
    expected = torch.cat([reference(clean[i:i + 1], seed=7 + i) for i in range(3)])
    assert torch.equal(y, expected)
    assert torch.equal(measure(task.student, x[1:], seed=7, offset=1), y[1:])


def test_task_on_a_device_keeps_its_operators_and_denoiser_there():
    task = make_task("spc", device="cpu", image_size=16)
    assert task.device == torch.device("cpu")
    assert module_device(task.student) == task.device
    den = task.denoiser()
    assert next(den.parameters()).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_task_measures_and_solves_like_the_cpu():  # pragma: no cover - runs where a GPU is
    from d2gp.solver import pnp_fista

    x = torch.rand(2, 1, 32, 32)
    cpu, gpu = make_task("spc", device="cpu"), make_task("spc", device="cuda")
    y_cpu, y_gpu = measure(cpu.student, x, seed=3), measure(gpu.student, x.cuda(), seed=3)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-6)
    precision("evaluation", gpu.device)
    with torch.no_grad():
        a = pnp_fista(cpu.student, y_cpu, cpu.denoiser(), cpu.student_step_size, 5)
        b = pnp_fista(gpu.student, y_gpu, gpu.denoiser(), gpu.student_step_size, 5)
    torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)
