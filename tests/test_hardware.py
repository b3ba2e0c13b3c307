"""Profile choice from compute capability (never from is_bf16_supported) and precision flags."""
from types import SimpleNamespace

import pytest
import torch

from sitlib import hardware


def fake_gpu(monkeypatch, major, minor, name="GPU", mem=16 * 2**30):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(major=major, minor=minor, name=name, total_memory=mem))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 reports


@pytest.mark.parametrize("cc,profile", [((7, 5), "t4"), ((8, 0), "a100"), ((8, 6), "a100"), ((9, 0), "h100")])
def test_profile_from_compute_capability(monkeypatch, cc, profile):
    fake_gpu(monkeypatch, *cc)
    prof, det = hardware.get_profile("auto")
    assert prof.name == profile and det.compute_capability == cc
    assert prof.bf16 == (cc >= (8, 0))
    assert prof.load_in_4bit == (cc < (8, 0))


def test_cpu_when_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    prof, det = hardware.get_profile("auto")
    assert prof.name == "cpu" and prof.dtype == "float32" and not prof.gradient_checkpointing
    assert prof.overrides["models.student"] == "embedded"


def test_gpu_profile_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        hardware.get_profile("a100")
    with pytest.raises(ValueError, match="unknown profile 'v100'"):
        hardware.get_profile("v100")


def test_set_precision_follows_profile():
    hardware.set_precision(hardware.PROFILES["h100"])
    assert torch.backends.cuda.matmul.allow_tf32
    hardware.set_precision(hardware.PROFILES["cpu"])
    assert not torch.backends.cuda.matmul.allow_tf32
