"""Training: categorical cross-entropy and RMSprop (lr 1e-3) as the reference, on patches.

A run folder holds ``train_config.json``, ``log.csv`` (one row per epoch), ``curves.png``,
``checkpoint.safetensors`` (weights, optimizer and random states: resumable), and the weights
files ``model_last.safetensors`` and ``model_best.safetensors`` (best validation mean Dice).
Every file is written under a temporary name and renamed, so a kill leaves the last complete
epoch. Nothing is pickled.
"""

from __future__ import annotations

import csv
import dataclasses
import io as _io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tiramisu_brats import io
from tiramisu_brats.data import CachedCase, PatchSampler, augment, dequantize
from tiramisu_brats.metrics import Confusion
from tiramisu_brats.model import REFERENCE, Tiramisu, TiramisuConfig, save_weights

log = logging.getLogger(__name__)

LOG_COLUMNS = ("epoch", "train_loss", "val_dice_WT", "val_dice_TC", "val_dice_ET",
               "val_dice_mean", "lr", "seconds", "slices_seen")
# Class indices of each region (0 background, 1 necrosis, 2 edema, 3 enhancing).
REGION_CLASSES = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe; stored in the run folder and in every checkpoint."""

    model: TiramisuConfig = REFERENCE
    epochs: int = 50
    steps_per_epoch: int = 100
    batch_size: int = 8
    patch: tuple[int, int] = (128, 128)
    tumor_share: float = 0.8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "ce"  # "ce" (the reference) or "dice_ce"
    schedule: str = "constant"  # "constant" (the reference) or "cosine"
    minutes: float | None = None  # stop after the epoch that passes this budget
    seed: int = 0
    val_cases: tuple[str, ...] = ()
    train_cases: tuple[str, ...] = ()
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    compile: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss not in ("ce", "dice_ce"):
            raise ValueError(f"loss must be 'ce' or 'dice_ce', got {self.loss!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        d = self.model.divisor
        if any(p % d for p in self.patch):
            raise ValueError(f"patch {self.patch} must be multiples of {d}")
        if self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 1:
            raise ValueError("epochs, steps_per_epoch and batch_size must be >= 1")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data = json.loads(text)
        data["model"] = TiramisuConfig.from_dict(data["model"])
        data["patch"] = tuple(data["patch"])
        data["val_cases"] = tuple(data["val_cases"])
        data["train_cases"] = tuple(data["train_cases"])
        return cls(**data)


def pick_device() -> torch.device:
    """CUDA when present, else the CPU with all its cores."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(os.cpu_count() or 1)
    return torch.device("cpu")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the tumor classes; logits (N, K, H, W), target (N, H, W)."""
    probs = logits.float().softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + 1) / (denom + 1)).mean()


@torch.no_grad()
def predict_classes(model: Tiramisu, images: np.ndarray, device: torch.device,
                    batch: int = 16, amp: bool = True) -> np.ndarray:
    """Class indices (Z', H, W) uint8 for cached slices ``images`` (Z', C, H, W) uint8 codes."""
    model.eval()
    out = np.empty((images.shape[0], *images.shape[2:]), np.uint8)
    for i in range(0, len(images), batch):
        x = torch.from_numpy(dequantize(np.asarray(images[i : i + batch]))).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=amp and device.type == "cuda"):
            out[i : i + batch] = model(x).argmax(1).to(torch.uint8).cpu().numpy()
    return out


def validate(model: Tiramisu, cases: Sequence[CachedCase], device: torch.device,
             amp: bool = True) -> dict[str, float]:
    """Mean Dice per region over whole validation volumes (every brain slice of each case)."""
    scores = {r: [] for r in REGION_CLASSES}
    for case in cases:
        pred = predict_classes(model, case.images, device, amp=amp)
        ref = np.asarray(case.classes)
        for region, cls in REGION_CLASSES.items():
            scores[region].append(Confusion.from_masks(np.isin(pred, cls), np.isin(ref, cls)).dice)
    return {r: float(np.mean(v)) if v else float("nan") for r, v in scores.items()}


def _state_tensors(optimizer, rng: np.random.Generator, gen: torch.Generator):
    tensors, scalars = {}, {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.augment"] = gen.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"optim_scalars": json.dumps(scalars),
            "optim_groups": json.dumps(optimizer.state_dict()["param_groups"]),
            "rng_numpy": json.dumps(rng.bit_generator.state)}
    return tensors, meta


def save_checkpoint(path: Path, model: Tiramisu, optimizer, rng, gen, config: TrainConfig,
                    rows: list[dict], best: float) -> None:
    """Everything needed to resume, in one safetensors file, written atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state, meta = _state_tensors(optimizer, rng, gen)
    tensors.update(state)
    meta.update({"format": "tiramisu-brats-checkpoint/1", "train_config": config.to_json(),
                 "rows": json.dumps(rows), "best": repr(best)})
    io.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta),
                    overwrite=True)


def load_checkpoint(path: Path, model: Tiramisu, optimizer, rng, gen):
    """Restore a checkpoint in place; returns (log rows, best score)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    if meta.get("format") != "tiramisu-brats-checkpoint/1":
        raise ValueError(f"{path}: not a tiramisu-brats training checkpoint")
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    for k, v in json.loads(meta["optim_scalars"]).items():
        idx, key = k.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["optim_groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.augment"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    rng.bit_generator.state = json.loads(meta["rng_numpy"])
    return json.loads(meta["rows"]), float(meta["best"])


def _write_log(run_dir: Path, rows: list[dict]) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, LOG_COLUMNS)
    writer.writeheader()
    writer.writerows({k: r[k] for k in LOG_COLUMNS} for r in rows)
    io.atomic_write_text(run_dir / "log.csv", buf.getvalue())


def plot_curves(rows: list[dict], path: Path) -> Path:
    """Training loss and validation Dice per epoch as a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    ax1.plot(epochs, [r["train_loss"] for r in rows], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    for region in REGION_CLASSES:
        ax2.plot(epochs, [r[f"val_dice_{region}"] for r in rows], marker="o", label=region)
    ax2.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="Validation Dice (whole volumes)")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), overwrite=True)
    return path


def train(
    train_cases: Sequence[CachedCase],
    val_cases: Sequence[CachedCase],
    run_dir: Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    device: torch.device | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[dict]:
    """Train ``config`` on cached cases; returns the log rows (one dict per epoch).

    ``on_step(epoch, step, loss)`` is called after every optimizer step (progress bars).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = device or pick_device()
    cuda = device.type == "cuda"
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    model = Tiramisu(config.model).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.lr, alpha=0.9, eps=1e-7,
                                    weight_decay=config.weight_decay)
    ckpt = run_dir / "checkpoint.safetensors"
    rows, best = [], -1.0
    if resume:
        if not ckpt.exists():
            raise FileNotFoundError(f"{ckpt}: nothing to resume")
        rows, best = load_checkpoint(ckpt, model, optimizer, rng, gen)
        log.info("resumed %s at epoch %d", run_dir, len(rows))
    elif ckpt.exists():
        raise FileExistsError(f"{run_dir} holds a run already: pass --resume or another folder")
    io.atomic_write_text(run_dir / "train_config.json", config.to_json())
    step_model = torch.compile(model) if config.compile else model
    sampler = PatchSampler(train_cases, config.patch, config.tumor_share)
    total_steps = config.epochs * config.steps_per_epoch
    elapsed = sum(r["seconds"] for r in rows)
    seen = rows[-1]["slices_seen"] if rows else 0
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=config.amp and cuda)
    budget = None if config.minutes is None else config.minutes * 60
    for epoch in range(len(rows) + 1, config.epochs + 1):
        if budget is not None and elapsed >= budget:
            log.info("time budget of %.1f min spent after %d epochs", config.minutes, len(rows))
            break
        start = time.perf_counter()
        model.train()
        losses = []
        for step in range(config.steps_per_epoch):
            if budget is None:
                progress = ((epoch - 1) * config.steps_per_epoch + step) / total_steps
            else:  # with a time budget the schedule runs over the budget
                progress = (elapsed + time.perf_counter() - start) / budget
                if progress >= 1:
                    break
            if config.schedule == "cosine":
                for g in optimizer.param_groups:
                    g["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            codes, classes = sampler.sample(rng, config.batch_size)
            x = torch.from_numpy(dequantize(codes)).to(device, non_blocking=True)
            y = torch.from_numpy(classes.astype(np.int64)).to(device, non_blocking=True)
            x, y = augment(x, y, gen)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(**autocast):
                logits = step_model(x)
            loss = F.cross_entropy(logits.float(), y)
            if config.loss == "dice_ce":
                loss = loss + soft_dice_loss(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if on_step:
                on_step(epoch, step, losses[-1])
        dice = validate(model, val_cases, device, config.amp) if val_cases else {
            r: float("nan") for r in REGION_CLASSES}
        seconds = time.perf_counter() - start
        elapsed += seconds
        mean = float(np.mean(list(dice.values())))
        rows.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                     **{f"val_dice_{r}": v for r, v in dice.items()}, "val_dice_mean": mean,
                     "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                     "slices_seen": seen + len(losses) * config.batch_size})
        seen = rows[-1]["slices_seen"]
        meta = {"epoch": str(epoch), "val_dice_mean": repr(mean),
                "train_config": config.to_json()}
        save_weights(model, run_dir / "model_last.safetensors", metadata=meta)
        best_path = run_dir / "model_best.safetensors"
        if (not math.isnan(mean) and mean > best) or not best_path.exists():
            best = mean if not math.isnan(mean) else best
            save_weights(model, best_path, metadata=meta)
        # The checkpoint, written after the weights, marks the epoch complete.
        save_checkpoint(ckpt, model, optimizer, rng, gen, config, rows, best)
        _write_log(run_dir, rows)
        plot_curves(rows, run_dir / "curves.png")
        log.info("epoch %d: loss %.4f, val Dice WT %.3f TC %.3f ET %.3f (%.0f s)", epoch,
                 rows[-1]["train_loss"], dice["WT"], dice["TC"], dice["ET"], seconds)
    return rows
