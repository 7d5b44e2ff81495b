"""nam_runtime.cpu: the device mode's mappings, and that without it CUDA requests fail here."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nam_runtime import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patches are a no-op with CUDA")


@pytest.fixture(autouse=True)
def _keep_suite_hits() -> Iterator[None]:
    # These tests call the mode directly; only megatron's own calls may count towards the suite's
    # proof that every patch is needed.
    saved = cpu.hits()
    yield
    cpu.reset_hits()
    cpu.merge_hits(saved)


def test_without_the_mode_cuda_requests_fail() -> None:
    # The premise of the whole package: CI's CUDA build of torch raises on any real CUDA call.
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda"), 0])
def test_mode_maps_cuda_device_arguments_to_cpu(device: object) -> None:
    before = cpu.hits()["mode.device_argument"]
    with cpu.CpuDeviceMode():
        made = torch.zeros(2, device=device)
        moved = torch.ones(2).to(device)
    assert made.device.type == moved.device.type == "cpu"
    assert cpu.hits()["mode.device_argument"] == before + 2


def test_mode_leaves_cpu_and_dtype_arguments_alone() -> None:
    before = cpu.hits()
    with cpu.CpuDeviceMode():
        a = torch.zeros(2, device="cpu").to(torch.float64)
        b = a.to("cpu", torch.float32)
    assert (a.dtype, b.dtype) == (torch.float64, torch.float32)
    assert cpu.hits() == before


def test_mode_keeps_cuda_tensors_on_cpu_and_answers_type_checks() -> None:
    t = torch.zeros(3)
    with cpu.CpuDeviceMode():
        assert t.cuda() is t
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.half().type() == "torch.cuda.HalfTensor"
        assert t.type(torch.float64).dtype == torch.float64  # a conversion, not a query
    assert t.type() == "torch.FloatTensor"


def test_merge_hits_rejects_unknown_patch_names() -> None:
    with pytest.raises(KeyError, match=r"unknown nam_runtime\.cpu patch 'nope'"):
        cpu.merge_hits({"nope": 1})


def test_every_patch_is_documented() -> None:
    for patch in cpu.PATCHES.values():
        assert patch.where and patch.why, patch.name


def test_readme_table_lists_exactly_the_patches() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## The patches", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)
    assert rows == list(cpu.PATCHES)
