"""Shared test set-up: GPU tests skip cleanly where no NVIDIA GPU answers through NVML."""

from __future__ import annotations

import functools

import pytest


@functools.cache
def nvidia_gpu_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return count > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if nvidia_gpu_present():
        return
    skip = pytest.mark.skip(reason="no NVIDIA GPU here (NVML found none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
