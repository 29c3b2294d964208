"""Run the Triton kernels in Triton's CPU interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any test module
imports ``sharedctx_kernels.attention``. Run these tests in their own pytest process: with the variable
set, ``resolve_backend("auto")`` on the CPU picks the (slow) interpreted triton backend.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; full-size kernel checks (skipped without a GPU)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: full-size compiled-kernel check (the CPU run uses the interpreter)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
