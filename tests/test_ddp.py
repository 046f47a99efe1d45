"""Beyond one process: DDP training (gloo, two CPU processes) and sharded cohort inference.

Two processes with the same global batch train what one process trains when it runs the batch
as the same micro-batches (BatchNorm statistics per micro-batch), within float tolerance.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from typer.testing import CliRunner

from tiramisu_brats import data
from tiramisu_brats.cli import app
from tiramisu_brats.model import Tiramisu, TiramisuConfig, load_model, save_weights
from tiramisu_brats.train import (
    TrainConfig,
    World,
    in_turn,
    init_distributed,
    shutdown_distributed,
    train,
)

TINY = TiramisuConfig(first_conv=8, down_blocks=(2, 2), bottleneck=2, up_blocks=(2, 2),
                      growth_rate=4, dropout=0.0)
WORLD = 2
CPU = torch.device("cpu")
RUN_FILES = {"train_config.json", "log.csv", "curves.png", "checkpoint.safetensors",
             "model_last.safetensors", "model_best.safetensors"}


def _config(**kw) -> TrainConfig:
    base = dict(model=TINY, epochs=1, steps_per_epoch=4, batch_size=8, patch=(32, 32),
                micro_batches=2, val_cases=("syn-2",), train_cases=("syn-0", "syn-1"), seed=7)
    return TrainConfig(**{**base, **kw})


# A: two micro-batches, one per process, with validation (split over the processes).
# B: four micro-batches, two per process (gradient accumulation inside each process); 2 epochs.
RUNS = {"A": {},
        "B": dict(micro_batches=4, val_cases=(), train_cases=("syn-0", "syn-1", "syn-2"),
                  epochs=2, steps_per_epoch=2)}


def _sets(cache_dir: Path, config: TrainConfig):
    cases = data.open_cache(cache_dir)
    return data.select(cases, config.train_cases), data.select(cases, config.val_cases)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _worker(rank: int, cache_dir: Path, out: Path, ports: list[int]) -> None:
    """One of WORLD processes, with the environment torchrun gives it."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    # A: train() joins the process group from the environment, and leaves it.
    os.environ["MASTER_PORT"] = str(ports[0])
    config = _config()
    rows = train(*_sets(cache_dir, config), out / "A", config, device=CPU)
    (out / f"A.rows{rank}.json").write_text(json.dumps(rows))
    # B: a group joined beforehand (as the CLI does); stopped after epoch 1, resumed by both.
    os.environ["MASTER_PORT"] = str(ports[1])
    world, device = init_distributed(CPU)
    assert world == World(rank, WORLD, rank, WORLD) and device == CPU
    try:
        config = _config(**RUNS["B"])
        train(*_sets(cache_dir, config), out / "B", dataclasses.replace(config, epochs=1),
              device=device)
        rows = train(*_sets(cache_dir, config), out / "B", config, resume=True, device=device)
        (out / f"B.rows{rank}.json").write_text(json.dumps(rows))
    finally:
        shutdown_distributed()


@pytest.fixture(scope="module")
def cache_dir(small_cases, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    data.build_cache(small_cases, path, crop=(64, 64))
    return path


@pytest.fixture(scope="module")
def ddp_runs(cache_dir, tmp_path_factory) -> Path:
    """Runs A and B trained by two processes (torch.multiprocessing, gloo)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(cache_dir, out, _free_ports(2)), nprocs=WORLD, join=True)
    return out


@pytest.fixture(scope="module")
def single_runs(cache_dir, tmp_path_factory) -> Path:
    """The same runs in one process; A also resumed for a second epoch (A2)."""
    out = tmp_path_factory.mktemp("single")
    with _one_thread():
        config = _config()
        train(*_sets(cache_dir, config), out / "A", config, device=CPU)
        shutil.copytree(out / "A", out / "A2")
        config = _config(epochs=2)
        train(*_sets(cache_dir, config), out / "A2", config, resume=True, device=CPU)
        config = _config(**RUNS["B"])
        train(*_sets(cache_dir, config), out / "B", config, device=CPU)
    return out


@contextmanager
def _one_thread():
    """One thread, as in each of the two processes: the same float reductions."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for g, w in zip(got, want):
        assert g["slices_seen"] == w["slices_seen"] and g["lr"] == w["lr"]
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-5)
        for k in ("val_dice_WT", "val_dice_TC", "val_dice_ET", "val_dice_mean"):
            assert g[k] == pytest.approx(w[k], abs=1e-6, nan_ok=True), k


def _assert_same_weights(a: Path, b: Path) -> None:
    """Parameters and BatchNorm statistics alike. Summing gradients in another order (B: two
    per process, then across processes) differs by rounding, which RMSprop (eps 1e-7) amplifies
    for the parameters with next to no gradient (biases before a BatchNorm): ~4e-6 after the 4
    steps of B, while a micro-batch or scaling mistake is off by 1e-3..1e-2."""
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains_with_the_same_micro_batches(
        ddp_runs, single_runs) -> None:
    for name in ("A", "B"):
        rows0 = _rows(ddp_runs / f"{name}.rows0.json")
        rows1 = _rows(ddp_runs / f"{name}.rows1.json")
        assert json.dumps(rows0) == json.dumps(rows1)  # every process returns the same rows
        with open(ddp_runs / name / "log.csv", newline="") as f:
            assert len(list(csv.DictReader(f))) == len(rows0) == _config(**RUNS[name]).epochs
        _assert_same_rows(rows0, _rows_of(single_runs / name))
        _assert_same_weights(ddp_runs / name / "model_last.safetensors",
                             single_runs / name / "model_last.safetensors")
        # Rank 0 alone wrote the run folder: its files, no leftovers of another writer.
        assert {p.name for p in (ddp_runs / name).iterdir()} == RUN_FILES
    assert 0 <= _rows(ddp_runs / "A.rows0.json")[-1]["val_dice_WT"] <= 1


def _rows_of(run: Path) -> list[dict]:
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        return json.loads(f.metadata()["rows"])


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_in_one_process(ddp_runs, single_runs, cache_dir,
                                                 tmp_path) -> None:
    with safe_open(str(ddp_runs / "A" / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["world_size"] == "2"
        assert "rng.torch.rank1" in f.keys()  # rank 1's dropout generator is kept too
    run = tmp_path / "A"
    shutil.copytree(ddp_runs / "A", run)
    config = _config(epochs=2)
    with _one_thread():
        rows = train(*_sets(cache_dir, config), run, config, resume=True, device=CPU)
    _assert_same_rows(rows, _rows_of(single_runs / "A2"))
    _assert_same_weights(run / "model_last.safetensors",
                         single_runs / "A2" / "model_last.safetensors")


@pytest.mark.slow
def test_torchrun_runs_the_cli_on_two_processes(small_cases, tmp_path) -> None:
    """``torchrun --standalone --nproc_per_node 2 -m tiramisu_brats train``: rank 0 builds the
    cache and writes the run, every process trains; one micro-batch per process by default."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(WORLD), "-m", "tiramisu_brats", "train", str(small_cases), "-o", str(run),
           "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--patch", "32", "32",
           "--growth-rate", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1, proc.stdout  # rank 0 alone prints
    assert "2 processes" in proc.stderr
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    assert len(list((run / "cache").glob("*.json"))) == 3
    config = TrainConfig.from_json((run / "train_config.json").read_text())
    assert config.micro_batches == WORLD and config.batch_size == 4


def test_micro_batches_must_divide_the_batch() -> None:
    with pytest.raises(ValueError, match="multiple of micro_batches"):
        _config(batch_size=6, micro_batches=4)
    with pytest.raises(ValueError, match="micro_batches=0 must be an integer >= 1"):
        _config(micro_batches=0)
    old = json.loads(_config().to_json())
    del old["micro_batches"]  # a train_config.json written before the field existed
    assert TrainConfig.from_json(json.dumps(old)).micro_batches == 1


def test_without_torchrun_everything_is_one_process(monkeypatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed(CPU) == (World(), CPU)
    assert in_turn(lambda: 42) == 42
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_distributed(CPU)


# ------------------------------------------------------------------ sharded cohort inference


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_weights(Tiramisu(TINY).eval(), tmp_path_factory.mktemp("w") / "tiny.safetensors")


def _segment(*args):
    return CliRunner().invoke(app, ["segment", *(str(a) for a in args), "--backend", "torch",
                                    "--no-progress"])


def test_shards_of_a_cohort_cover_every_case_exactly_once(small_cases, tiny_model,
                                                          tmp_path) -> None:
    out = tmp_path / "out"
    written: list[list[str]] = []
    for i in range(2):  # as two jobs of an array would, into the same folder
        before = {p.name for p in out.glob("*.nii.gz")}
        result = _segment(small_cases, "-o", out, "--model", tiny_model, "--shard", f"{i}/2")
        assert result.exit_code == 0, result.output
        assert f"{2 - i} segmented, 0 failed" in result.output
        written.append(sorted({p.name for p in out.glob("*.nii.gz")} - before))
    # Sorted case folders, every 2nd from the I-th: no overlap, nothing left out.
    assert written == [["syn-0.nii.gz", "syn-2.nii.gz"], ["syn-1.nii.gz"]]
    assert not list(out.glob("*.csv"))
    # One evaluate over the union folder is the report of the whole cohort.
    result = CliRunner().invoke(app, ["evaluate", str(out), str(small_cases), "-o",
                                      str(tmp_path / "report"), "--no-overlays", "--no-progress"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "report" / "metrics.csv", newline="") as f:
        assert sorted(r["case"] for r in csv.DictReader(f)) == ["syn-0", "syn-1", "syn-2"]


def test_a_shard_beyond_the_cases_is_empty_and_bad_shards_are_refused(small_cases, tiny_model,
                                                                      tmp_path) -> None:
    result = _segment(small_cases, "-o", tmp_path / "empty", "--model", tiny_model,
                      "--shard", "3/4")
    assert result.exit_code == 0, result.output
    assert "0 segmented, 0 failed" in result.output
    for bad in ("2/2", "1/0", "-1/2", "1", "a/b", "1/2/3"):
        result = _segment(small_cases, "-o", tmp_path / "bad", "--model", tiny_model,
                          "--shard", bad)
        assert result.exit_code == 2 and "--shard" in result.output, (bad, result.output)
    result = _segment(small_cases / "syn-0", "-o", tmp_path / "one.nii.gz", "--model",
                      tiny_model, "--shard", "0/2")
    assert result.exit_code == 2 and "folder of cases" in result.output, result.output
    assert not (tmp_path / "bad").exists() and not (tmp_path / "one.nii.gz").exists()
