"""Test-session set-up: Triton's interpreter before any @triton.jit runs (no GPU here), and a CUDA marker
that skips with a reason. The disk is kept small by pyproject's tmp_path_retention_policy = "failed":
pytest deletes a passing test's tmp_path when the test ends (training runs leave ~130 MB checkpoints;
keeping them all once filled CI's disk)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
