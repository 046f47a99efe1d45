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



@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A tiny random-init model on disk: fast enough for CLI and API tests."""
    import torch

    from tiramisu_brats.model import Tiramisu, TiramisuConfig, save_weights

    torch.manual_seed(0)
    config = TiramisuConfig(first_conv=8, down_blocks=(2, 2), bottleneck=2, up_blocks=(2, 2),
                            growth_rate=4)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    return save_weights(Tiramisu(config).eval(), path)


@pytest.fixture(scope="session")
def small_cases(tmp_path_factory):
    """Three small synthetic labelled cases (48 x 40 x 32) in a folder of case folders."""
    from tiramisu_brats.synthetic import make_case, write_case

    root = tmp_path_factory.mktemp("cases")
    for seed in range(3):
        write_case(make_case(seed, shape=(48, 40, 32), case_id=f"syn-{seed}"), root)
    return root
