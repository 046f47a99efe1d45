"""Run the network on a batch of slices, with one of several backends behind one interface.

A backend is a callable ``(N, C, H, W)`` float32 → logits ``(N, K, H, W)`` float32.
``predict_labels`` feeds it the slices of a case in batches and returns BraTS labels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("torch",)
CLASS_TO_LABEL = np.array([0, 1, 2, 4], np.uint8)


def default_weights() -> Path:
    """The model shipped with the package."""
    return Path(str(resources.files("tiramisu_brats") / "weights" / "tiramisu-brats.safetensors"))


class Backend(Protocol):
    name: str
    device: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class TorchBackend:
    """PyTorch eager; on a CUDA device with bf16 autocast."""

    name = "torch"

    def __init__(self, weights: Path, device: str | None = None,
                 threads: int | None = None) -> None:
        import torch

        from tiramisu_brats.model import load_model

        self._torch = torch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self.device = device
        self.model = load_model(weights, device=device)
        if device != "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            with torch.autocast(x.device.type, dtype=torch.bfloat16,
                                enabled=x.device.type == "cuda"):
                return self.model(x).float().cpu().numpy()


def load_backend(name: str = "torch", weights: Path | None = None, *, threads: int | None = None,
                 device: str | None = None) -> Backend:
    """Build the backend ``name`` (one of ``BACKENDS``) for the weights file ``weights``."""
    weights = Path(weights) if weights is not None else default_weights()
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: model weights not found")
    if name == "torch":
        return TorchBackend(weights, device=device, threads=threads)
    raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def predict_labels(
    backend: Backend, slices: np.ndarray, batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Labels (Z', H, W) uint8 in 0/1/2/4 for slices (Z', C, H, W) float32, by argmax."""
    out = np.empty((slices.shape[0], *slices.shape[2:]), np.uint8)
    for i in range(0, len(slices), batch_size):
        batch = np.ascontiguousarray(slices[i : i + batch_size], dtype=np.float32)
        out[i : i + len(batch)] = CLASS_TO_LABEL[backend(batch).argmax(1)]
        if on_batch:
            on_batch(len(batch))
    return out
