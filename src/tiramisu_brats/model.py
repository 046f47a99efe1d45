"""The FC-DenseNet ("Tiramisu", Jégou et al. 2017) for 2D axial MRI slices.

File order: building blocks, then the model, then its config and presets, then the weights on
disk (safetensors with the config in the header, never a pickle).

Shapes: the model takes a batch ``(N, C, H, W)`` float32 with ``H`` and ``W`` multiples of 32
(five 2x2 poolings) and returns logits ``(N, num_classes, H, W)``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "tiramisu-brats/1"


class DenseLayer(nn.Sequential):
    """BN, ReLU, 3x3 conv to ``growth_rate`` maps, dropout."""

    def __init__(self, in_channels: int, growth_rate: int, dropout: float) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=True),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        )


class DenseBlock(nn.Module):
    """``n_layers`` dense layers, each seeing the concatenation of all maps before it.

    Returns the input and the new maps concatenated, ``(N, C + n_layers * k, H, W)``; with
    ``new_only=True`` only the ``n_layers * k`` new maps (what the up path upsamples).
    """

    def __init__(self, in_channels: int, n_layers: int, growth_rate: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, dropout) for i in range(n_layers)
        )
        self.out_channels = in_channels + n_layers * growth_rate
        self.new_channels = n_layers * growth_rate

    def forward(self, x: torch.Tensor, new_only: bool = False) -> torch.Tensor:
        new = []
        for layer in self.layers:
            out = layer(x)
            x = torch.cat([x, out], dim=1)
            new.append(out)
        return torch.cat(new, dim=1) if new_only else x


class TransitionDown(nn.Sequential):
    """BN, ReLU, 1x1 conv, dropout, 2x2 max-pool: halves H and W, keeps the channels."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=True),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.MaxPool2d(2),
        )


class TransitionUp(nn.ConvTranspose2d):
    """3x3 transposed conv, stride 2: doubles H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, stride=2, padding=1, output_padding=1)


@dataclass(frozen=True)
class TiramisuConfig:
    """Everything needed to rebuild the network; stored inside every weights file."""

    in_channels: int = 4
    num_classes: int = 4
    first_conv: int = 48
    down_blocks: tuple[int, ...] = (4, 5, 7, 10, 12)
    bottleneck: int = 15
    up_blocks: tuple[int, ...] = (12, 10, 7, 5, 4)
    growth_rate: int = 8
    dropout: float = 0.2

    def __post_init__(self) -> None:
        # Accept lists from JSON but keep the dataclass hashable and frozen.
        object.__setattr__(self, "down_blocks", tuple(self.down_blocks))
        object.__setattr__(self, "up_blocks", tuple(self.up_blocks))
        problems = []
        for name in ("in_channels", "num_classes", "first_conv", "growth_rate", "bottleneck"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1024:
                problems.append(f"{name}={value!r} must be an integer in 1..1024")
        if not self.down_blocks or len(self.down_blocks) != len(self.up_blocks):
            problems.append("down_blocks and up_blocks must be non-empty and of equal length")
        for n in (*self.down_blocks, *self.up_blocks):
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
                problems.append(f"block size {n!r} must be an integer in 1..128")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout!r} must be in [0, 1)")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def divisor(self) -> int:
        """H and W must be multiples of this (one 2x2 pooling per down block)."""
        return 2 ** len(self.down_blocks)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TiramisuConfig:
        """Build a config from untrusted JSON: unknown keys and bad values are refused."""
        if not isinstance(data, dict):
            raise ValueError("invalid model config: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"invalid model config: unknown keys {unknown}")
        return cls(**data)


class Tiramisu(nn.Module):
    """FC-DenseNet: ``(N, in_channels, H, W)`` float32 → logits ``(N, num_classes, H, W)``."""

    def __init__(self, config: TiramisuConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TiramisuConfig()
        k, p = config.growth_rate, config.dropout
        self.first = nn.Conv2d(config.in_channels, config.first_conv, 3, padding=1, bias=True)
        channels = config.first_conv
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        skips = []
        for n in config.down_blocks:
            block = DenseBlock(channels, n, k, p)
            self.down.append(block)
            channels = block.out_channels
            skips.append(channels)
            self.pool.append(TransitionDown(channels, p))
        self.bottleneck = DenseBlock(channels, config.bottleneck, k, p)
        new = self.bottleneck.new_channels
        self.up = nn.ModuleList()
        self.unpool = nn.ModuleList()
        for n, skip in zip(config.up_blocks, reversed(skips)):
            self.unpool.append(TransitionUp(new))
            block = DenseBlock(new + skip, n, k, p)
            self.up.append(block)
            new, channels = block.new_channels, block.out_channels
        self.head = nn.Conv2d(channels, config.num_classes, 1, bias=True)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError that says what to pad to when ``x`` does not fit the network."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected a batch (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        d = self.config.divisor
        h, w = x.shape[-2:]
        if h % d or w % d:
            raise ValueError(
                f"H and W must be multiples of {d}: got {h}x{w}, pad to "
                f"{-(-h // d) * d}x{-(-w // d) * d}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.first(x)
        skips = []
        for block, pool in zip(self.down, self.pool):
            x = block(x)
            skips.append(x)
            x = pool(x)
        last = len(self.up) - 1
        x = self.bottleneck(x, new_only=True)
        for i, (unpool, block) in enumerate(zip(self.unpool, self.up)):
            x = torch.cat([unpool(x), skips.pop()], dim=1)
            x = block(x, new_only=i < last)
        return self.head(x)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Presets. The reference (Table 1 of the Tiramisu BraTS paper) is FC-DenseNet103's layout with
# growth rate 8; FC-DenseNet103 (Jégou et al.) uses 16.
REFERENCE = TiramisuConfig()
FC_DENSENET103 = TiramisuConfig(growth_rate=16)


def recompute_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Replace ``model``'s BatchNorm running statistics by their plain mean over ``batches``
    (each ``(N, C, H, W)`` float32), run in train mode with dropout off (inference runs
    without it); returns ``model`` in eval mode."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain mean over the batches
        elif isinstance(module, nn.Dropout):
            module.eval()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return model.eval()


def save_weights(
    model: Tiramisu, path: str | Path, *, metadata: dict[str, str] | None = None,
    half: bool = False,
) -> Path:
    """Write the weights to ``path`` as safetensors with the config JSON in the header.

    ``half=True`` stores float16 (half the size; loading casts back to float32). The file is
    written in place: a caller that must never leave half a file behind wraps this in
    ``io.atomic_write``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if half and t.is_floating_point():
            t = t.half()
        tensors[name] = t.contiguous()
    meta = {"format": FORMAT, "config": model.config.to_json(), **(metadata or {})}
    save_file(tensors, str(path), metadata=meta)
    return path


def read_config(path: str | Path) -> tuple[TiramisuConfig, dict[str, str]]:
    """Read the config and metadata from a weights file's header (no tensors are loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises several types for a corrupt header
        raise ValueError(f"{path}: not a tiramisu-brats weights file ({err})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(
            f"{path}: not a tiramisu-brats weights file (format {meta.get('format')!r})")
    try:
        config = TiramisuConfig.from_dict(json.loads(meta["config"]))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
    return config, meta


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Tiramisu:
    """Rebuild the model from its weights file alone, in eval mode, float32."""
    from safetensors.torch import load_file

    config, _ = read_config(path)
    model = Tiramisu(config)
    state = load_file(str(path), device="cpu")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, expected "
                             f"{tuple(expected[name].shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():  # a diverged run's weights
            raise ValueError(f"{path}: {name} holds values that are not finite (NaN or inf)")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.to(device).eval()
