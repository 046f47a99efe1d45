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
def real_case(real_data):
    """``real_case("brats-labeled/BraTS2021_00005")``: that path in the real data, else skip
    (a data folder that holds other cases)."""

    def find(relative: str) -> Path:
        path = real_data / relative
        if not path.exists():
            pytest.skip(f"{relative} not in the real BraTS data at {real_data}")
        return path

    return find


@pytest.fixture(scope="session", autouse=True)
def _no_user_cache(tmp_path_factory):
    """No test writes into the user's ~/.cache (compiled models, int8 models): the cache lies in
    this session's temporary folder; ``user_cache`` gives a test a fresh one of its own."""
    saved = {k: os.environ.get(k) for k in ("TIRAMISU_BRATS_CACHE", "XDG_CACHE_HOME")}
    os.environ.pop("TIRAMISU_BRATS_CACHE", None)
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-session"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def random_weights():
    """``random_weights(folder, seed=0)`` writes tiny random weights to
    ``folder/tiny.safetensors``, BatchNorm statistics away from 0/1 so that they matter."""
    import torch

    from tiramisu_brats.model import Tiramisu, TiramisuConfig, save_weights

    config = TiramisuConfig(first_conv=8, down_blocks=(2, 2), bottleneck=2, up_blocks=(2, 2),
                            growth_rate=4)

    def write(folder: Path, seed: int = 0) -> Path:
        torch.manual_seed(seed)
        model = Tiramisu(config)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        return save_weights(model, folder / "tiny.safetensors")

    return write


@pytest.fixture(scope="session")
def write_partner(tmp_path_factory, random_weights):
    """``write_partner(weights, decision=None, made_for=None)`` writes other tiny random
    weights as the partner of ``weights`` (``export.partner``): beside them, their header
    naming ``made_for`` (default the weights' sha256) and recording ``decision`` (a JSON
    text)."""
    from safetensors.numpy import load_file, save_file

    from tiramisu_brats.export import file_sha256
    from tiramisu_brats.model import read_config

    def write(weights: Path, decision: str | None = None, made_for: str | None = None) -> Path:
        other = random_weights(tmp_path_factory.mktemp("partner"), seed=1)
        _, header = read_config(other)
        header["partner_of"] = made_for or file_sha256(weights)
        if decision is not None:
            header["decision"] = decision
        path = weights.with_name(weights.stem + ".partner.safetensors")
        save_file(load_file(other), str(path), metadata=header)
        return path

    return write


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, random_weights) -> Path:
    """Tiny random weights with their ONNX export beside them (exported once per module)."""
    from tiramisu_brats.export import export_onnx

    weights = random_weights(tmp_path_factory.mktemp("tiny"))
    export_onnx(weights, weights.with_suffix(".onnx"))
    return weights


@pytest.fixture()
def user_cache(tmp_path_factory, monkeypatch):
    """Keep made files out of ~/.cache: the user cache dir lies in a temporary folder."""
    monkeypatch.delenv("TIRAMISU_BRATS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))


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
