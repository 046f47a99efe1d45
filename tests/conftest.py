"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real BraTS data folder (``$TIRAMISU_BRATS_DATA`` or ``../shared/data``), else skip."""
    path = Path(os.environ.get("TIRAMISU_BRATS_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real BraTS data not found at {path} (set TIRAMISU_BRATS_DATA)")
    return path
