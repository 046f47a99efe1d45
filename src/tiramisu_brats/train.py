"""Training: categorical cross-entropy and RMSprop (lr 1e-3) as the reference, on patches.

A run folder holds ``train_config.json``, ``log.csv`` (one row per epoch), ``curves.png``,
``checkpoint.safetensors`` (weights, optimizer and random states: resumable), and the weights
files ``model_last.safetensors`` and ``model_best.safetensors`` (best validation mean Dice; in a
run without validation cases, the last epoch's weights too).
Every file is written under a temporary name and renamed, so a kill leaves the last complete
epoch. Nothing is pickled.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the same ``train`` runs data-parallel
with DistributedDataParallel: every process draws the same global batch from the same seeded
generators and trains on its own slice of it, so a run is the same computation on any number of
processes that divides ``micro_batches`` (BatchNorm statistics are taken per micro-batch).
Only rank 0 writes files. See docs/distributed.md.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io as _io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tiramisu_brats import data as tdata
from tiramisu_brats import infer, io
from tiramisu_brats.data import (
    QUANT_OFFSET,
    QUANT_STEP,
    CachedCase,
    PatchSampler,
    augment,
    dequantize,
)
from tiramisu_brats.metrics import Confusion
from tiramisu_brats.model import REFERENCE, Tiramisu, TiramisuConfig, save_weights
from tiramisu_brats.preprocess import PLANES

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
    # Augmentation (data.augment): rotation within ±rotate_deg degrees, zoom within ±zoom,
    # per-modality intensity gain and shift within ±intensity, a gamma curve with exponent
    # within [1 / (1 + gamma), 1 + gamma] (0: none, the reference), each sample seen at up to
    # half the resolution per axis with probability low_res (0: none, the reference); flips
    # always.
    rotate_deg: float = 10.0
    zoom: float = 0.1
    intensity: float = 0.1
    gamma: float = 0.0
    low_res: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # "ce" (the reference), "dice_ce" (+ soft Dice of the tumor classes) or "region_dice_ce"
    # (+ soft Dice of the regions WT, TC, ET, which are what is scored)
    loss: str = "ce"
    schedule: str = "constant"  # "constant" (the reference) or "cosine"
    # Stop when this budget is spent, within an epoch: that epoch ends there (validated and
    # saved), so a run lengthened past it is not step for step one asked for the longer budget.
    minutes: float | None = None
    seed: int = 0
    val_cases: tuple[str, ...] = ()
    train_cases: tuple[str, ...] = ()
    # bf16 autocast on CUDA and on CPUs that compute in bf16 (AVX512-BF16, AMX): on 2 such
    # cores 2.9x the patches per second of fp32 (docs/benchmarks.md)
    amp: bool = True
    compile: bool = False  # torch.compile on CUDA; ignored on CPU
    # The global batch runs as this many micro-batches of batch_size / micro_batches patches,
    # each with its own BatchNorm statistics, gradients summed (accumulation); under DDP each
    # of W processes runs micro_batches / W of them. The result does not depend on W.
    micro_batches: int = 1
    # Planes the slices are drawn from (one per sample, each plane as likely); the reference
    # trained on axial slices only.
    planes: tuple[str, ...] = ("axial",)
    # Weights the run starts from (fine-tuning), by file name and sha256; "" for a fresh start.
    init: str = ""
    init_sha256: str = ""
    # Distillation: the mean softmax of these weights (by file name and sha256) on each batch is
    # a second target, the KL divergence from it added to the loss with weight `distill`: a way
    # to teach one model what accurate mode's two models find together (docs/model-card.md).
    teachers: tuple[str, ...] = ()
    teachers_sha256: tuple[str, ...] = ()
    distill: float = 0.0
    # The slice cache folder the run read its cases from (absolute; "" where not known, as in
    # runs before this field): where the machine keeps the data, not part of the recipe. A
    # resume given no cache folder reuses it.
    cache: str = ""

    def __post_init__(self) -> None:
        for name in ("patch", "planes", "val_cases", "train_cases", "teachers",
                     "teachers_sha256"):  # lists (JSON, CLI) too
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if (self.distill > 0) != bool(self.teachers) or self.distill < 0:
            raise ValueError(f"distill must be > 0 with teachers and 0 without, got "
                             f"{self.distill} with {len(self.teachers)} teacher(s)")
        if self.teachers_sha256 and len(self.teachers_sha256) != len(self.teachers):
            raise ValueError(f"{len(self.teachers_sha256)} sha256 for {len(self.teachers)} "
                             "teachers")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        d = self.model.divisor
        if any(p <= 0 or p % d for p in self.patch):
            raise ValueError(f"patch {self.patch} must be positive multiples of {d}")
        for name in ("epochs", "steps_per_epoch", "batch_size", "micro_batches", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (name != "seed"):
                raise ValueError(f"{name}={value!r} must be an integer >= {int(name != 'seed')}")
        for name, lo, hi in (("tumor_share", 0, 1), ("lr", 0, 10), ("weight_decay", 0, 1),
                             ("rotate_deg", 0, 180), ("zoom", 0, 0.5), ("intensity", 0, 1),
                             ("gamma", 0, 2), ("low_res", 0, 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"{name}={value!r} must be a number in [{lo}, {hi}]")
        if self.minutes is not None and not (isinstance(self.minutes, (int, float))
                                             and self.minutes > 0):
            raise ValueError(f"minutes={self.minutes!r} must be a positive number")
        unknown = sorted(set(self.planes) - set(PLANES))
        if not self.planes or unknown:
            raise ValueError(f"planes {self.planes!r}: choose from {', '.join(PLANES)}")
        if self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of "
                             f"micro_batches {self.micro_batches}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """A config from untrusted JSON: unknown keys and bad values are refused."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("invalid training config: expected a JSON object")
        if data.get("extra") == {}:  # an always-empty field of runs before planes existed
            del data["extra"]
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"invalid training config: unknown keys {unknown}")
        data["model"] = TiramisuConfig.from_dict(data["model"])
        return cls(**data)


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for the next allocation instead of giving it back to the
    kernel: every training step frees and reallocates the same activations, and memory new
    to the process is cleared by the kernel page by page first (about 40 % of a CPU step's
    time went there; docs/benchmarks.md). No effect where the C library is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return
    if mallopt is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        mallopt(m_mmap_threshold, 1 << 30)  # large blocks from the heap, not fresh mmaps
        mallopt(m_trim_threshold, 1 << 30)  # and the heap's top not trimmed after each step


def pick_device() -> torch.device:
    """CUDA when present, else the CPU with all its cores."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(os.cpu_count() or 1)
    return torch.device("cpu")


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job: ``rank`` of ``size`` processes in all,
    ``local_rank`` of ``local_size`` on this machine. One process: ``World()``."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: torch.device | None = None) -> tuple[World, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment.

    ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` (all set by torchrun). Backend NCCL on CUDA, gloo on the CPU; each process
    uses ``cuda:LOCAL_RANK`` when CUDA is present, else its share of the CPU cores. Without
    those variables (or with ``WORLD_SIZE=1``) a single process: ``(World(), pick_device())``.
    Idempotent: a group already joined is reused. ``shutdown_distributed`` leaves it.
    """
    joined = tdist.is_available() and tdist.is_initialized()
    size = tdist.get_world_size() if joined else _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World(), device or pick_device()
    local_rank = _env_int("LOCAL_RANK", 0)
    local_size = _env_int("LOCAL_WORLD_SIZE", 1)
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not joined:
        if not tdist.is_available():
            raise RuntimeError("this PyTorch build has no torch.distributed")
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = World(tdist.get_rank(), tdist.get_world_size(), local_rank, local_size)
    log.info("process %d of %d (local %d of %d) on %s", world.rank, world.size,
             world.local_rank, world.local_size, device)
    return world, device


@contextmanager
def distributed(device: torch.device | None = None):
    """``init_distributed`` for a block: yields ``(world, device)``; leaves at the end a
    process group that it joined."""
    joined = tdist.is_available() and tdist.is_initialized()
    world, device = init_distributed(device)
    try:
        yield world, device
    finally:
        if not joined:
            shutdown_distributed()


def shutdown_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(device: torch.device | None = None) -> None:
    """Wait for every process of the group (nothing to wait for in a single process)."""
    if tdist.is_available() and tdist.is_initialized():
        if device is not None and device.type == "cuda" and tdist.get_backend() == "nccl":
            tdist.barrier(device_ids=[device.index])
        else:
            tdist.barrier()


def in_turn(function: Callable[[], object], device: torch.device | None = None):
    """Run ``function`` on rank 0 first, then on the first process of every other machine,
    then on the rest, with barriers in between: for work such as building the slice cache,
    which the first run writes and the later ones find done (on a shared or a node-local
    folder alike). Returns what ``function`` returned in this process."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return function()
    rank, local_rank = tdist.get_rank(), _env_int("LOCAL_RANK", 0)
    turns = (rank == 0, rank != 0 and local_rank == 0, local_rank != 0)
    result = None
    for mine in turns:
        if mine:
            result = function()
        barrier(device)
    return result


def _dice_loss(probs: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """1 - mean over channels of the soft Dice of ``probs`` and ``truth`` (N, R, H, W), each
    channel's sums over the whole batch; + 1 smoothing, so a channel empty in both scores 1."""
    inter = (probs * truth).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + truth.sum((0, 2, 3))
    return 1 - ((2 * inter + 1) / (denom + 1)).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the tumor classes; logits (N, K, H, W), target (N, H, W)."""
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    return _dice_loss(logits.float().softmax(1)[:, 1:], onehot)


def region_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the regions WT, TC, ET; logits (N, K, H, W), target (N, H, W).

    A region's probability is the sum of its classes' softmax probabilities, so tumor core
    (necrosis + enhancing) is rewarded as a whole, whichever of its two classes a voxel gets.
    """
    member = torch.zeros(len(REGION_CLASSES), logits.shape[1], device=logits.device)
    for r, classes in enumerate(REGION_CLASSES.values()):
        member[r, list(classes)] = 1
    probs = torch.einsum("rk,nkhw->nrhw", member, logits.float().softmax(1))
    return _dice_loss(probs, member[:, target].permute(1, 0, 2, 3))


# The training losses: cross-entropy alone ("ce", the reference), or with one of these added.
DICE_LOSSES = {"dice_ce": soft_dice_loss, "region_dice_ce": region_dice_loss}
LOSSES = ("ce", *DICE_LOSSES)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; on CUDA through pinned memory, asynchronously."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@torch.no_grad()
def predict_classes(model: Tiramisu, images: np.ndarray, device: torch.device,
                    batch: int = 16, amp: bool = True) -> np.ndarray:
    """Class indices (Z', H, W) uint8 for cached slices ``images`` (Z', C, H, W) uint8 codes."""
    model.eval()
    out = np.empty((images.shape[0], *images.shape[2:]), np.uint8)
    for i in range(0, len(images), batch):
        x = _to_device(dequantize(np.asarray(images[i : i + batch])), device)
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=amp and (device.type == "cuda" or infer.has_bf16())):
            out[i : i + batch] = model(x).argmax(1).to(torch.uint8).cpu().numpy()
    return out


def validate(model: Tiramisu, cases: Sequence[CachedCase], device: torch.device,
             amp: bool = True) -> dict[str, float]:
    """Mean Dice per region over whole validation volumes (every brain slice of each case)."""
    scores = _case_dice(model, cases, device, amp)
    return {r: float(np.mean(v)) if v else float("nan") for r, v in scores.items()}


def _case_dice(model: Tiramisu, cases: Sequence[CachedCase], device: torch.device,
               amp: bool) -> dict[str, list[float]]:
    scores = {r: [] for r in REGION_CLASSES}
    for case in cases:
        pred = predict_classes(model, case.images, device, amp=amp)
        ref = np.asarray(case.classes)
        for region, cls in REGION_CLASSES.items():
            scores[region].append(Confusion.from_masks(np.isin(pred, cls), np.isin(ref, cls)).dice)
    return scores


def _validate_shared(model: Tiramisu, cases: Sequence[CachedCase], device: torch.device,
                     amp: bool, world: World) -> dict[str, float]:
    """``validate`` with the cases split over the processes; every process gets the means."""
    if world.size == 1:
        return validate(model, cases, device, amp)
    mine = cases[world.rank :: world.size]
    scores = _case_dice(model, mine, device, amp)
    sums = torch.tensor([*(sum(scores[r]) for r in REGION_CLASSES), len(mine)],
                        dtype=torch.float64, device=device)
    tdist.all_reduce(sums)
    sums = sums.cpu()
    count = sums[-1].item()
    return {r: sums[i].item() / count if count else float("nan")
            for i, r in enumerate(REGION_CLASSES)}


def _broadcast_float(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` in every process (decisions that must agree, such as timing)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    tdist.broadcast(tensor, 0)
    return tensor.item()


def _check_micro_batches(config: TrainConfig, world: World) -> None:
    """Refuse a batch that the processes of ``world`` cannot share out."""
    if config.micro_batches % world.size:
        raise ValueError(f"micro_batches {config.micro_batches} must be a multiple of the "
                         f"number of processes, {world.size}: each runs micro_batches / "
                         f"{world.size} micro-batches of every batch")


def _same_everywhere(text: str) -> None:
    """Refuse to start when the processes were given different recipes (they would hang or
    silently train different things)."""
    texts: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(texts, text)
    if len(set(texts)) > 1:
        ranks = [i for i, t in enumerate(texts) if t != texts[0]]
        raise ValueError(f"the processes of this run differ in their training config or cases "
                         f"(ranks {ranks} differ from rank 0)")


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _rank_seed(seed: int, rank: int, epoch: int) -> int:
    """The dropout seed of ``rank`` > 0 when no saved state of its own exists."""
    return (seed + rank + 1_000_003 * epoch) % 2**63


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
                    rows: list[dict], best: float,
                    rank_rng: Sequence[dict[str, torch.Tensor]] = ()) -> None:
    """Everything needed to resume, in one safetensors file, written atomically.

    ``rank_rng``: under DDP, the random states (``_rng_state``) of every process, in rank
    order; those of ranks 1.. are stored beside this process's (rank 0's) own.
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state, meta = _state_tensors(optimizer, rng, gen)
    tensors.update(state)
    for rank, states in enumerate(rank_rng):
        if rank:
            tensors.update({f"rng.{k}.rank{rank}": v.cpu().contiguous()
                            for k, v in states.items()})
    meta["world_size"] = str(max(len(rank_rng), 1))
    meta.update({"format": "tiramisu-brats-checkpoint/1", "train_config": config.to_json(),
                 "rows": json.dumps(rows), "best": repr(best)})
    io.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta),
                    overwrite=True)


def load_checkpoint(path: Path, model: Tiramisu, optimizer, rng, gen, rank: int = 0):
    """Restore a checkpoint in place; returns (log rows, best score).

    Every process of a DDP run loads the same checkpoint: model, optimizer and the shared
    sampling and augmentation generators are the same everywhere; the global torch generator
    (dropout) is ``rank``'s own, saved by a run with at least ``rank + 1`` processes, else one
    seeded from the seed, the rank and the epoch.
    """
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
    suffix = f".rank{rank}" if rank else ""
    rows = json.loads(meta["rows"])
    if f"rng.torch{suffix}" in tensors:
        torch.set_rng_state(tensors[f"rng.torch{suffix}"])
        if f"rng.cuda{suffix}" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"])
    else:
        torch.manual_seed(_rank_seed(json.loads(meta["train_config"])["seed"], rank, len(rows)))
    gen.set_state(tensors["rng.augment"])
    rng.bit_generator.state = json.loads(meta["rng_numpy"])
    return rows, float(meta["best"])


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
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no 1.5
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

    Under torchrun every process calls ``train`` with the same arguments; it joins the process
    group (``init_distributed``) unless one is joined already, and leaves a group it joined.
    Every process returns the same rows; only rank 0 writes the run folder.
    """
    with distributed(device) as (world, device):
        return _train(train_cases, val_cases, Path(run_dir), config, resume, device, on_step,
                      world)


def _load_init(model: Tiramisu, config: TrainConfig) -> None:
    """Start from the weights ``config.init`` (checked against ``config.init_sha256``)."""
    from tiramisu_brats.export import file_sha256
    from tiramisu_brats.model import load_model

    path = Path(config.init)
    _check_init(path, config.model)
    if config.init_sha256 and file_sha256(path) != config.init_sha256:
        raise ValueError(f"{path}: not the weights this run started from (sha256 differs)")
    model.load_state_dict(load_model(path).state_dict())
    log.info("starting from %s", path)


def _check_init(path: Path, model: TiramisuConfig) -> None:
    """Refuse weights to start from that are missing, not weights, or of another model than
    ``model`` (from the file's header: no tensor is read)."""
    from tiramisu_brats.model import read_config

    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights to start from not found")
    source, _ = read_config(path)
    if source != model:
        raise ValueError(f"{path}: a model of another configuration ({source}) than "
                         f"this run's ({model})")


def _load_teachers(config: TrainConfig, device: torch.device, channels_last: bool
                   ) -> list[Tiramisu]:
    """The teachers of ``config`` (checked against their sha256), frozen, in eval mode."""
    from tiramisu_brats.export import file_sha256
    from tiramisu_brats.model import load_model

    teachers = []
    for k, name in enumerate(config.teachers):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: teacher weights not found")
        if config.teachers_sha256 and file_sha256(path) != config.teachers_sha256[k]:
            raise ValueError(f"{path}: not the teacher this run started with (sha256 differs)")
        with torch.random.fork_rng(devices=[]):  # building it draws: keep the run's stream
            teacher = load_model(path).to(device).eval().requires_grad_(False)
        if teacher.config.num_classes != config.model.num_classes:
            raise ValueError(f"{path}: a teacher of {teacher.config.num_classes} classes for a "
                             f"model of {config.model.num_classes}")
        if channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        teachers.append(teacher)
    return teachers


def distill_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL divergence from ``target`` probabilities to the softmax of ``logits``, both
    (N, K, H, W), summed over classes and averaged over pixels."""
    logp = logits.float().log_softmax(1)
    return (target * (target.clamp_min(1e-8).log() - logp)).sum(1).mean()


def _open_run(run_dir: Path, config: TrainConfig, resume: bool, model, optimizer, rng, gen,
              rank: int):
    if resume:
        _check_resumable(run_dir, config)
        rows, best = load_checkpoint(run_dir / "checkpoint.safetensors", model, optimizer, rng,
                                     gen, rank)
        if rank == 0:
            log.info("resumed %s at epoch %d", run_dir, len(rows))
            # A kill between the checkpoint and the log leaves the log an epoch short.
            _write_log(run_dir, rows)
            plot_curves(rows, run_dir / "curves.png")
        return rows, best
    _check_new_run_dir(run_dir)
    return [], -1.0


def _check_resumable(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to resume a run that completed no epoch, or to go on with fewer ``epochs`` than
    it completed (its log and checkpoint would hold more than its config); reads the
    checkpoint's header only."""
    from safetensors import safe_open

    ckpt = run_dir / "checkpoint.safetensors"
    if not ckpt.exists():
        raise FileNotFoundError(
            f"{run_dir}: nothing to resume: no epoch of the run was completed (no "
            "checkpoint.safetensors); the run can start anew, without resuming")
    try:
        with safe_open(str(ckpt), framework="pt") as f:
            done = len(json.loads((f.metadata() or {})["rows"]))
    except Exception as err:  # safetensors raises several types for a corrupt header
        raise ValueError(f"{ckpt}: not a tiramisu-brats training checkpoint ({err})") from None
    if config.epochs < done:
        raise ValueError(f"{run_dir}: the run has completed {done} epochs; it cannot go on "
                         f"with {config.epochs}")


def _check_new_run_dir(run_dir: Path) -> None:
    """Refuse to start a new run in a folder that holds one, or an earlier run's results (a
    run killed before its first epoch ended leaves none: it may start anew)."""
    if (run_dir / "checkpoint.safetensors").exists():
        raise FileExistsError(
            f"{run_dir} holds a run already (and resuming it was not asked for)")
    results = [name for name in ("model_best.safetensors", "model_last.safetensors", "log.csv")
               if (run_dir / name).exists()]
    if results:
        raise FileExistsError(f"{run_dir} holds an earlier run's results ({', '.join(results)})"
                              ", without a checkpoint to resume it from")


@dataclass
class _Run:
    """A training run in this process, as ``_setup`` builds it; ``rows``, ``best`` and
    ``elapsed`` (training seconds so far) grow epoch by epoch."""

    config: TrainConfig
    run_dir: Path
    world: World
    device: torch.device
    val_cases: Sequence[CachedCase]
    model: Tiramisu
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    ddp: torch.nn.Module | None
    step_model: Callable[[torch.Tensor], torch.Tensor]  # net, compiled when asked (CUDA)
    optimizer: torch.optim.Optimizer
    sampler: PatchSampler
    rng: np.random.Generator
    gen: torch.Generator
    rows: list[dict]
    best: float
    elapsed: float
    channels_last: bool
    autocast: dict
    # The global batch: micro_batches micro-batches of `micro` patches; this process runs
    # `local` of them, the slice `share` of the batch.
    local: int
    micro: int
    share: slice
    buffers: list[torch.Tensor]
    floats: list[torch.Tensor]  # the floating-point buffers (BatchNorm statistics)
    teachers: list[Tiramisu]  # config.teachers, frozen

    @property
    def budget(self) -> float | None:
        """The time budget in seconds, if any."""
        return None if self.config.minutes is None else self.config.minutes * 60


def _train(train_cases, val_cases, run_dir: Path, config: TrainConfig, resume: bool,
           device: torch.device, on_step, world: World) -> list[dict]:
    run = _setup(train_cases, val_cases, run_dir, config, resume, device, world)
    for epoch in range(len(run.rows) + 1, config.epochs + 1):
        if run.budget is not None and run.elapsed >= run.budget:
            if world.main:
                log.info("time budget of %.1f min spent after %d epochs", config.minutes,
                         len(run.rows))
            break
        start = time.perf_counter()
        losses = _train_epoch(run, epoch, start, on_step)
        _end_epoch(run, epoch, losses, start)
    return run.rows


def _setup(train_cases, val_cases, run_dir: Path, config: TrainConfig, resume: bool,
           device: torch.device, world: World) -> _Run:
    """Check the job, build the model, optimizer and sampler, and open the run folder (a new
    run, or the state of the last complete epoch when resuming)."""
    _check_micro_batches(config, world)
    if world.size > 1:
        _same_everywhere("|".join([config.to_json(), *(c.case_id for c in train_cases), "",
                                   *(c.case_id for c in val_cases)]))
    run_dir.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # one patch size: find the fastest kernels once
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)  # sampling: the same in every process
    gen = torch.Generator(device=device).manual_seed(config.seed)  # augmentation: the same
    model = Tiramisu(config.model).to(device)  # the same initial weights in every process
    if config.init and not (resume and (run_dir / "checkpoint.safetensors").exists()):
        _load_init(model, config)
    if world.rank:  # dropout differs between processes (rank 0 keeps the single-process one)
        torch.manual_seed(config.seed + world.rank)
    bf16 = config.amp and (cuda or infer.has_bf16())
    if cuda or bf16:
        model = model.to(memory_format=torch.channels_last)
    if not cuda:
        keep_freed_memory()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.lr, alpha=0.9, eps=1e-7,
                                    weight_decay=config.weight_decay)
    error = None
    try:
        rows, best = _open_run(run_dir, config, resume, model, optimizer, rng, gen, world.rank)
    except (OSError, ValueError) as err:
        error = err
    if world.size > 1:  # fail together: a process left alone would wait forever
        failed = torch.zeros(world.size, device=device)
        failed[world.rank] = error is not None
        tdist.all_reduce(failed)
        if error is None and failed.any():
            first = int(failed.nonzero()[0].item())
            raise io.InputError(f"{run_dir}: process {first} of this run could not open the "
                                "run (see its error)")
    if error is not None:
        raise error
    if world.main:
        io.atomic_write_text(run_dir / "train_config.json", config.to_json())
    ddp = None
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (BatchNorm statistics) are averaged below: no broadcast before each forward.
        params = inspect.signature(DistributedDataParallel).parameters
        name = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        buffer_sync = {name: False}  # the newer name where this PyTorch has it
        ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                      **buffer_sync)
    net = ddp or model
    if config.compile and not cuda and world.main:
        log.warning("torch.compile is used on CUDA only; ignored on the CPU")
    step_model = torch.compile(net) if config.compile and cuda else net
    local = config.micro_batches // world.size
    micro = config.batch_size // config.micro_batches
    buffers = list(model.buffers())
    return _Run(
        config, run_dir, world, device, val_cases, model, net, ddp, step_model, optimizer,
        PatchSampler(train_cases, config.patch, config.tumor_share), rng, gen, rows, best,
        elapsed=sum(r["seconds"] for r in rows), channels_last=cuda or bf16,
        autocast=dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16),
        local=local, micro=micro,
        share=slice(world.rank * local * micro, (world.rank + 1) * local * micro),
        buffers=buffers, floats=[b for b in buffers if b.is_floating_point()],
        teachers=_load_teachers(config, device, cuda or bf16))


def _train_epoch(run: _Run, epoch: int, start: float,
                 on_step: Callable[[int, int, float], None] | None) -> list[float]:
    """The steps of one epoch (fewer where the time budget runs out); returns their losses."""
    config = run.config
    total_steps = config.epochs * config.steps_per_epoch
    run.net.train()
    losses = []
    for step in range(config.steps_per_epoch):
        if run.budget is None:
            progress = ((epoch - 1) * config.steps_per_epoch + step) / total_steps
        else:  # with a time budget the schedule runs over the budget (rank 0's clock)
            progress = _broadcast_float(
                (run.elapsed + time.perf_counter() - start) / run.budget, run.device)
            if progress >= 1:
                break
        if config.schedule == "cosine":
            for g in run.optimizer.param_groups:
                g["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        losses.append(_step(run))
        if on_step:
            on_step(epoch, step, losses[-1])
    return losses


def _step(run: _Run) -> float:
    """One optimizer step on a global batch drawn from the sampler; returns its loss."""
    config, device, local, micro = run.config, run.device, run.local, run.micro
    codes, classes = run.sampler.sample(run.rng, config.batch_size)
    x = (_to_device(codes, device).float() - QUANT_OFFSET) * QUANT_STEP  # = dequantize
    y = _to_device(classes, device).long()
    # All of the batch, then this process's share: the generator stays shared.
    x, y = augment(x, y, run.gen, rotate_deg=config.rotate_deg, scale=config.zoom,
                   intensity=config.intensity, gamma=config.gamma, low_res=config.low_res)
    x, y = x[run.share], y[run.share]
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    soft = None
    if run.teachers:  # the teachers' mean softmax: the distillation target
        with torch.no_grad(), torch.autocast(**run.autocast):
            soft = torch.stack([t(x).float().softmax(1) for t in run.teachers]).mean(0)
    run.optimizer.zero_grad(set_to_none=True)
    before = [b.clone() for b in run.buffers] if local > 1 else None
    sums = [torch.zeros_like(b) for b in run.floats] if local > 1 else None
    step_loss = torch.zeros((), device=device)
    for j in range(local):
        if j:  # every micro-batch updates the statistics from the same start
            for b, b0 in zip(run.buffers, before):
                b.copy_(b0)
        xj, yj = x[j * micro : (j + 1) * micro], y[j * micro : (j + 1) * micro]
        sync = run.ddp is None or j == local - 1  # DDP: all-reduce on the last one only
        with nullcontext() if sync else run.ddp.no_sync():
            with torch.autocast(**run.autocast):
                logits = run.step_model(xj)
            loss = F.cross_entropy(logits.float(), yj)
            if config.loss in DICE_LOSSES:
                loss = loss + DICE_LOSSES[config.loss](logits, yj)
            if soft is not None:
                loss = loss + config.distill * distill_loss(
                    logits, soft[j * micro : (j + 1) * micro])
            (loss / local if local > 1 else loss).backward()
        step_loss += loss.detach()
        if sums is not None:
            for acc, b in zip(sums, run.floats):
                acc += b
    if sums is not None:  # statistics: the mean of the micro-batches' updates
        for acc, b in zip(sums, run.floats):
            b.copy_(acc / local)
    if run.world.size > 1:  # one all-reduce: statistics and loss, averaged
        flat = torch.cat([*(b.reshape(-1) for b in run.floats), step_loss.reshape(1)])
        tdist.all_reduce(flat)
        flat /= run.world.size
        step_loss = flat[-1]
        for b, part in zip(run.floats, flat[:-1].split([b.numel() for b in run.floats])):
            b.copy_(part.view_as(b))
    run.optimizer.step()
    return step_loss.item() / local


def _end_epoch(run: _Run, epoch: int, losses: list[float], start: float) -> None:
    """Validate, add the epoch's log row and (rank 0) write the epoch's files."""
    config, device, world = run.config, run.device, run.world
    dice = (_validate_shared(run.model, run.val_cases, device, config.amp, world)
            if run.val_cases else {r: float("nan") for r in REGION_CLASSES})
    seconds = _broadcast_float(time.perf_counter() - start, device)
    run.elapsed += seconds
    mean = float(np.mean(list(dice.values())))
    seen = run.rows[-1]["slices_seen"] if run.rows else 0
    run.rows.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                     **{f"val_dice_{r}": v for r, v in dice.items()}, "val_dice_mean": mean,
                     "lr": run.optimizer.param_groups[0]["lr"], "seconds": seconds,
                     "slices_seen": seen + len(losses) * config.batch_size})
    rank_rng: list = []
    if world.size > 1:  # every process's dropout generator goes into the checkpoint
        rank_rng = [None] * world.size
        tdist.all_gather_object(rank_rng, _rng_state(device))
    if world.main:
        run.best = _save_epoch(run.run_dir, run.model, run.optimizer, run.rng, run.gen, config,
                               run.rows, run.best, rank_rng, validated=bool(run.val_cases))
    barrier(device)  # the others wait for rank 0's files


def _save_epoch(run_dir: Path, model, optimizer, rng, gen, config: TrainConfig,
                rows: list[dict], best: float, rank_rng, validated: bool) -> float:
    """Write the files of a finished epoch; returns the best validation mean Dice so far.

    ``model_best.safetensors`` gets the epoch's weights where its validation mean beats
    ``best``, and every epoch's where the run has no validation cases (``validated`` false):
    with nothing to tell the epochs apart, the best is the last."""
    row = rows[-1]
    mean = row["val_dice_mean"]
    meta = {"epoch": str(row["epoch"]), "val_dice_mean": repr(mean),
            "train_config": config.to_json()}
    io.atomic_write(run_dir / "model_last.safetensors",
                    lambda tmp: save_weights(model, tmp, metadata=meta), overwrite=True)
    best_path = run_dir / "model_best.safetensors"
    better = not math.isnan(mean) and mean > best
    if better or not validated or not best_path.exists():
        io.atomic_write(best_path, lambda tmp: save_weights(model, tmp, metadata=meta),
                        overwrite=True)
    best = mean if better else best
    # The checkpoint, written after the weights, marks the epoch complete.
    save_checkpoint(run_dir / "checkpoint.safetensors", model, optimizer, rng, gen, config,
                    rows, best, rank_rng)
    _write_log(run_dir, rows)
    plot_curves(rows, run_dir / "curves.png")
    log.info("epoch %d: loss %.4f, val Dice WT %.3f TC %.3f ET %.3f (%.0f s)", row["epoch"],
             row["train_loss"], row["val_dice_WT"], row["val_dice_TC"], row["val_dice_ET"],
             row["seconds"])
    return best


@dataclass(frozen=True)
class FolderRun:
    """A run that ``run_from_folders`` set up: its ``config`` (the stored one when resumed),
    this process's place in the job (``world``), the cached cases it trains on (``train_set``,
    in the config's planes) and validates on (``val_set``, axial: what ``segment`` runs by
    default), and once trained the log ``rows`` (one dict per epoch, as ``train`` returns)."""

    config: TrainConfig
    world: World
    train_set: list[CachedCase]
    val_set: list[CachedCase]
    rows: list[dict] = dataclasses.field(default_factory=list)


def run_from_folders(
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None,
    resume: bool = False, fold: tuple[int, int] | None = None, val_cases: Sequence[str] = (),
    val_fraction: float = 0.0, init: str | os.PathLike[str] | None = None,
    device: torch.device | None = None,
    on_cache: Callable[[Sequence[Path]], Iterable[Path]] | None = None,
    on_start: Callable[[FolderRun], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    **recipe,
) -> FolderRun:
    """Train on folder(s) of labelled cases (any layout ``io`` reads), or on one cache folder,
    into the run folder ``output``; returns the run with its log rows.

    Case folders are cached first (``data.build_cache``, every plane) into ``cache`` (default
    ``output/cache``, or for a resumed run the cache folder it used, while it exists; reused
    across runs; recorded in the config). What the arguments and the case folders' names tell
    (the split, ``init``, a run already in ``output``, ...) is checked before: a refused run
    writes nothing. Validated on: fold ``fold = (i, k)`` (``i`` from 0) of a k-fold split by
    case (``data.kfold``), else the cases ``val_cases``, else a random ``val_fraction`` of
    them (``data.split_cases``; seeded by the recipe's ``seed``).
    ``init``: weights to start from (fine-tuning), recorded with their sha256 (as are the
    recipe's ``teachers``). ``recipe``: the other fields of ``TrainConfig`` (``epochs``,
    ``batch_size``, ``model``, ``planes``, ...);
    ``micro_batches`` defaults to one per process. ``resume``: continue the run in
    ``output`` with its stored config; ``recipe`` may then lengthen it (``epochs``,
    ``minutes``: see ``resumed_config``) and repeat, but not change, the rest, as ``fold``,
    ``val_*`` and ``init`` may repeat the run's split and starting weights.

    Under torchrun every process calls this with the same arguments and joins the process
    group (``distributed``); rank 0 caches the cases first, the others then find them cached
    (``in_turn``). Only rank 0 writes the run and calls back: ``on_cache(folders)`` wraps the
    case folders as they are cached (e.g. a progress bar's ``track``), ``on_start(run)``
    before the first step, ``on_step(epoch, step, loss)`` after every step.
    """
    set_here = {"val_cases", "train_cases", "init", "init_sha256", "teachers_sha256"}
    wrong = sorted(k for k in recipe
                   if k in set_here or k not in {f.name for f in dataclasses.fields(TrainConfig)})
    if wrong:
        raise TypeError(f"not recipe fields of TrainConfig: {', '.join(wrong)}")
    ways = [name for name, value in (("a fold", fold), ("validation cases", val_cases),
                                     ("a validation fraction", val_fraction)) if value]
    if len(ways) > 1:
        raise io.InputError(f"the validation split is given {len(ways)} ways ("
                            f"{', '.join(ways)}); one of them decides it")
    dirs = ([Path(data)] if isinstance(data, (str, os.PathLike))
            else [Path(d) for d in data])
    output = Path(output)
    with distributed(device) as (world, device):
        config = _stored_config(output) if resume else None
        if config is not None:
            try:
                config = resumed_config(config, recipe, fold=fold, val_cases=val_cases,
                                        val_fraction=val_fraction, init=init)
            except ValueError as err:
                raise io.InputError(f"{output}: {err}") from None
        cached = len(dirs) == 1 and tdata.is_cache(dirs[0])
        if cached and cache is not None and Path(cache).absolute() != dirs[0].absolute():
            raise io.InputError(f"{dirs[0]} is a slice cache: the cases are read from it, "
                                f"not cached again into {cache}")
        cases = tdata.open_cache(dirs[0]) if cached else []
        ids = (sorted({c.case_id for c in cases}) if cached
               else list(tdata.find_training_cases(dirs)))  # names only: no image read
        if config is None:
            _check_new_run_dir(output)
            config = _new_config(ids, world, fold, val_cases, val_fraction, init, recipe)
        else:
            missing = sorted({*config.train_cases, *config.val_cases} - set(ids))
            if missing:
                raise io.InputError(f"{output}: the run's cases {io.names_text(missing, 5)} are "
                                    "not in the data")
            _check_resumable(output, config)
        _check_micro_batches(config, world)
        if cached:
            cache_dir = dirs[0]
        else:
            cache_dir = (Path(cache) if cache is not None
                         else _default_cache(output, config.cache, world))
            progress = on_cache if on_cache is not None and world.main else iter
            cases = in_turn(lambda: tdata.build_cache(dirs, cache_dir, progress=progress),
                            device)  # rank 0 writes, the others read
        config = dataclasses.replace(config, cache=str(cache_dir.absolute()))
        run = FolderRun(config, world, tdata.select(cases, config.train_cases, config.planes),
                        tdata.select(cases, config.val_cases))
        if on_start is not None and world.main:
            on_start(run)
        rows = train(run.train_set, run.val_set, output, config, resume=resume, device=device,
                     on_step=on_step if world.main else None)
    return dataclasses.replace(run, rows=rows)


def _default_cache(output: Path, stored: str, world: World) -> Path:
    """The cache folder of a run given none: ``stored`` (the one a resumed run used) while it
    exists, else ``output/cache``."""
    if stored and Path(stored).is_dir():
        return Path(stored)
    if stored and world.main:
        log.warning("the run's cache %s is gone: caching the cases anew in %s", stored,
                    output / "cache")
    return output / "cache"


def _stored_config(run_dir: Path) -> TrainConfig:
    """The config of the run in ``run_dir`` (untrusted JSON: refused when not valid)."""
    path = run_dir / "train_config.json"
    if not path.is_file():
        raise io.InputError(f"{run_dir}: nothing to resume: no run there (no {path.name})")
    try:
        return TrainConfig.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as err:
        raise io.InputError(f"{path}: {err}") from None


def resumed_config(stored: TrainConfig, recipe: dict, *, fold: tuple[int, int] | None = None,
                   val_cases: Sequence[str] = (), val_fraction: float = 0.0,
                   init: str | os.PathLike[str] | None = None) -> TrainConfig:
    """The config a resumed run goes on with: ``stored``, lengthened where ``recipe`` (fields
    of ``TrainConfig``) asks for more ``epochs`` or ``minutes``.

    With the constant schedule a run lengthened in ``epochs`` is the run that had asked for
    that length from the start (the random states go on from the checkpoint); a time budget
    ends its last epoch early, and the lengthened run goes on with a new epoch. A cosine
    schedule is laid over the run's length, so lengthening it would change the learning rates
    of the epochs already run: refused, as is any other field of ``recipe`` that differs from
    ``stored``, and a split (``fold``, ``val_cases``, ``val_fraction``: see
    ``run_from_folders``) or ``init`` given that is not the run's.
    """
    def as_stored(value):  # lists (JSON, CLI) as the config holds them
        return tuple(value) if isinstance(value, list) else value

    differences = [(k, as_stored(recipe[k]), getattr(stored, k)) for k in sorted(recipe)
                   if as_stored(recipe[k]) != getattr(stored, k)]
    changed = [k for k, _, _ in differences]
    fixed = [d for d in differences if d[0] not in ("epochs", "minutes")]
    if fold is not None or val_cases or val_fraction:
        ids = sorted({*stored.train_cases, *stored.val_cases})  # the split was made of these
        val = (tdata.kfold(ids, *fold, stored.seed) if fold is not None
               else tdata.split_cases(ids, list(val_cases), val_fraction, stored.seed)[1])
        if set(val) != set(stored.val_cases):
            fixed.append(("val_cases", tuple(val), stored.val_cases))
    if init is not None and str(init) != stored.init:
        fixed.append(("init", str(init), stored.init))
    if fixed:
        raise ValueError("a resumed run keeps its recipe; it differs in "
                         + ", ".join(f"{k} ({v!r}, stored {s!r})" for k, v, s in fixed))
    if changed and stored.schedule == "cosine":
        raise ValueError(
            f"this run's cosine schedule is laid over its length ({stored.epochs} epochs"
            + (f", {stored.minutes} minutes" if stored.minutes is not None else "")
            + "); lengthening it would change the learning rates of the epochs already run")
    return dataclasses.replace(stored, **{k: recipe[k] for k in changed})


def _new_config(ids: list[str], world: World, fold: tuple[int, int] | None,
                val_cases: Sequence[str], val_fraction: float, init, recipe: dict
                ) -> TrainConfig:
    """The config of a new run on the cases ``ids`` (see ``run_from_folders``); refused when
    the split, ``init`` or a teacher does not fit."""
    from tiramisu_brats.export import file_sha256

    seed = recipe.get("seed", 0)
    if fold is not None:
        val = tdata.kfold(ids, fold[0], fold[1], seed)
    else:
        _, val = tdata.split_cases(ids, list(val_cases), val_fraction, seed)
    recipe = {**recipe, "micro_batches": recipe.get("micro_batches") or world.size}
    for name in ("patch", "planes"):
        if name in recipe:
            recipe[name] = tuple(recipe[name])
    if recipe.get("teachers"):
        recipe["teachers"] = tuple(str(t) for t in recipe["teachers"])
        missing = [t for t in recipe["teachers"] if not Path(t).is_file()]
        if missing:
            raise io.InputError(f"{', '.join(missing)}: teacher weights not found")
        recipe["teachers_sha256"] = tuple(file_sha256(Path(t)) for t in recipe["teachers"])
    config = TrainConfig(**recipe, val_cases=tuple(val),
                         train_cases=tuple(i for i in ids if i not in val))
    if init is None:
        return config
    _check_init(Path(init), config.model)
    return dataclasses.replace(config, init=str(init), init_sha256=file_sha256(Path(init)))
