import csv
import dataclasses
import json
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tiramisu_brats import data
from tiramisu_brats.model import Tiramisu, TiramisuConfig, load_model, save_weights
from tiramisu_brats.train import TrainConfig, train

TINY = TiramisuConfig(first_conv=8, down_blocks=(2, 2), bottleneck=2, up_blocks=(2, 2),
                      growth_rate=4)


@pytest.fixture(scope="module")
def cache(small_cases, tmp_path_factory):
    return data.build_cache(small_cases, tmp_path_factory.mktemp("cache"), crop=(64, 64),
                            planes=("axial",))


def _config(**kw):
    base = dict(model=TINY, epochs=3, steps_per_epoch=6, batch_size=4, patch=(32, 32),
                val_cases=("syn-2",), train_cases=("syn-0", "syn-1"), seed=3)
    return TrainConfig(**{**base, **kw})


def test_training_lowers_the_loss_and_writes_every_artefact(cache, tmp_path):
    rows = train(cache[:2], cache[2:], tmp_path, _config(), device=torch.device("cpu"))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    for name in ("log.csv", "curves.png", "checkpoint.safetensors", "model_last.safetensors",
                 "model_best.safetensors", "train_config.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    logged = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert len(logged) == 3 and 0 <= float(logged[-1]["val_dice_WT"]) <= 1
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_model(tmp_path / "model_last.safetensors")
    assert model.config == TINY


def test_resume_continues_at_the_right_epoch_with_the_same_optimizer_state(cache, tmp_path):
    full = train(cache[:2], cache[2:], tmp_path / "a", _config(), device=torch.device("cpu"))

    class Killed(Exception):
        pass

    def kill(epoch, step, loss):
        if epoch == 3:
            raise Killed

    with pytest.raises(Killed):
        train(cache[:2], cache[2:], tmp_path / "b", _config(), device=torch.device("cpu"),
              on_step=kill)
    with safe_open(str(tmp_path / "b" / "checkpoint.safetensors"), "pt") as f:
        assert '"epoch": 2' in f.metadata()["rows"].split("},")[-1]
    seen = []
    resumed = train(cache[:2], cache[2:], tmp_path / "b", _config(), resume=True,
                    device=torch.device("cpu"), on_step=lambda e, s, v: seen.append(e))
    assert set(seen) == {3}
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full]
    a = load_model(tmp_path / "a" / "model_last.safetensors").state_dict()
    b = load_model(tmp_path / "b" / "model_last.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A kill between the checkpoint and the log left the log an epoch short: a resume, with
    # nothing left to train, writes it whole again.
    log_csv = tmp_path / "b" / "log.csv"
    log_csv.write_text("".join(log_csv.read_text().splitlines(keepends=True)[:3]))
    train(cache[:2], cache[2:], tmp_path / "b", _config(), resume=True,
          device=torch.device("cpu"))
    assert [r["epoch"] for r in csv.DictReader(open(log_csv))] == ["1", "2", "3"]


def test_a_resumed_run_may_be_lengthened_but_keeps_its_recipe():
    from tiramisu_brats.train import resumed_config

    stored = _config(planes=("axial", "coronal"))
    assert resumed_config(stored, {}) == stored
    # Options repeated as the CLI passes them (lists) are no change.
    assert resumed_config(stored, {"planes": ["axial", "coronal"], "patch": [32, 32],
                                   "lr": 1e-3}) == stored
    longer = resumed_config(stored, {"epochs": 5, "minutes": 30.0})
    assert (longer.epochs, longer.minutes) == (5, 30.0)
    assert dataclasses.replace(longer, epochs=3, minutes=None) == stored
    with pytest.raises(ValueError, match=r"differs in lr \(0.0005, stored 0.001\), seed \(4"):
        resumed_config(stored, {"epochs": 5, "lr": 5e-4, "seed": 4})
    cosine = _config(schedule="cosine")
    assert resumed_config(cosine, {"epochs": 3}) == cosine
    with pytest.raises(ValueError, match=r"cosine schedule is laid over its length \(3 epochs"):
        resumed_config(cosine, {"epochs": 4})


def test_a_run_folder_is_not_overwritten_without_resume(cache, tmp_path):
    train(cache[:2], [], tmp_path, _config(epochs=1, steps_per_epoch=1), device=torch.device("cpu"))
    with pytest.raises(FileExistsError, match="holds a run already"):
        train(cache[:2], [], tmp_path, _config(epochs=1), device=torch.device("cpu"))
    # Its results without the checkpoint (deleted, or a copy): still not overwritten.
    (tmp_path / "checkpoint.safetensors").unlink()
    with pytest.raises(FileExistsError, match=r"holds an earlier run's results \(model_best."
                                              r"safetensors, model_last.safetensors, log.csv\)"):
        train(cache[:2], [], tmp_path, _config(epochs=1), device=torch.device("cpu"))


def test_time_budget_stops_training(cache, tmp_path):
    rows = train(cache[:2], [], tmp_path, _config(epochs=50, minutes=1e-4),
                 device=torch.device("cpu"))
    assert len(rows) == 1 and np.isnan(rows[0]["val_dice_WT"])


def test_fine_tuning_starts_from_the_given_weights(cache, tmp_path, tiny_weights):
    from tiramisu_brats.export import file_sha256

    tiny = load_model(tiny_weights)
    config = _config(model=tiny.config, epochs=1, steps_per_epoch=1, lr=1e-12,
                     init=str(tiny_weights), init_sha256=file_sha256(tiny_weights))
    train(cache[:2], [], tmp_path / "a", config, device=torch.device("cpu"))
    tuned = load_model(tmp_path / "a" / "model_last.safetensors").state_dict()
    start = tiny.state_dict()
    # One step at lr 1e-12: the weights are those it started from (BN statistics move).
    for k, v in start.items():
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(tuned[k], v, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="sha256 differs"):
        train(cache[:2], [], tmp_path / "b", _config(model=tiny.config, init=str(tiny_weights),
                                                     init_sha256="0" * 64),
              device=torch.device("cpu"))
    with pytest.raises(ValueError, match="another configuration"):
        other = TiramisuConfig(first_conv=8, down_blocks=(2, 2), bottleneck=2, up_blocks=(2, 2),
                               growth_rate=2)
        train(cache[:2], [], tmp_path / "c", _config(model=other, init=str(tiny_weights)),
              device=torch.device("cpu"))


def test_training_on_three_planes(small_cases, tmp_path):
    cases = data.build_cache(small_cases, tmp_path / "cache", crop=(64, 64))
    planes = {c.plane for c in cases}
    assert planes == {"axial", "coronal", "sagittal"}
    config = _config(planes=("axial", "coronal", "sagittal"), epochs=2)
    train_set = [c for c in cases if c.case_id != "syn-2"]
    val_set = [c for c in cases if c.case_id == "syn-2" and c.plane == "axial"]
    rows = train(train_set, val_set, tmp_path / "run", config, device=torch.device("cpu"))
    assert len(rows) == 2 and 0 <= rows[-1]["val_dice_WT"] <= 1
    assert TrainConfig.from_json((tmp_path / "run" / "train_config.json").read_text()) == config
    with pytest.raises(ValueError, match="planes"):
        _config(planes=("oblique",))


def test_augmentation_strength_reaches_augment(cache, tmp_path, monkeypatch):
    from tiramisu_brats import train as ttrain

    seen = []

    def recording(images, classes, generator, **kw):
        seen.append(kw)
        return data.augment(images, classes, generator, **kw)

    monkeypatch.setattr(ttrain, "augment", recording)
    config = _config(epochs=1, steps_per_epoch=2, rotate_deg=30, zoom=0.25, intensity=0.2,
                     gamma=0.5, low_res=0.25)
    train(cache[:2], [], tmp_path, config, device=torch.device("cpu"))
    assert seen == [dict(rotate_deg=30, scale=0.25, intensity=0.2, gamma=0.5, low_res=0.25)] * 2
    assert TrainConfig.from_json((tmp_path / "train_config.json").read_text()) == config
    for bad in (dict(rotate_deg=200), dict(zoom=0.6), dict(intensity=-0.1), dict(gamma=3),
                dict(low_res=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _config(**bad)


def test_config_of_runs_before_planes_still_reads():
    old = _config().to_json().replace('"planes": ["axial"], ', "")
    old = old.replace('"rotate_deg": 10.0, ', "").replace(', "zoom": 0.1}', "}")
    old = old.replace('"intensity": 0.1, ', "").replace('"gamma": 0.0, ', "")
    old = old.replace('"low_res": 0.0, ', "")
    assert '"rotate_deg"' not in old and '"zoom"' not in old and '"intensity"' not in old
    assert '"gamma"' not in old and '"low_res"' not in old
    old = old.replace('"init": "", "init_sha256": "", ', "").replace('"cache": "", ', "")
    assert '"planes"' not in old and '"init"' not in old and '"cache"' not in old
    old = old[:-1] + ', "extra": {}}'
    assert TrainConfig.from_json(old) == _config()


def test_soft_dice_loss_is_0_for_a_perfect_prediction_and_near_1_for_a_wrong_one():
    from tiramisu_brats.train import soft_dice_loss

    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:6, 2:6] = 2
    target[:, 3:5, 3:5] = 3
    perfect = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0, abs=1e-6)
    wrong = torch.nn.functional.one_hot((target + 1) % 4, 4).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(wrong, target).item() > 0.9
    # Classes absent from both prediction and target count as matched (the +1 smoothing).
    none = torch.zeros(1, 8, 8, dtype=torch.long)
    background = torch.nn.functional.one_hot(none, 4).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(background, none).item() == pytest.approx(0, abs=1e-6)


def test_region_dice_loss_scores_the_regions_not_the_classes():
    from tiramisu_brats.train import region_dice_loss, soft_dice_loss

    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:6, 2:6] = 2
    target[:, 3:5, 3:5] = 1  # necrosis inside edema, no enhancing tumor
    onehot = lambda t: torch.nn.functional.one_hot(t, 4).permute(0, 3, 1, 2).float() * 50  # noqa: E731
    assert region_dice_loss(onehot(target), target).item() == pytest.approx(0, abs=1e-6)
    # Necrosis called enhancing: WT and TC are right, ET (8 voxels where there is none) wrong.
    swapped = torch.where(target == 1, 3, target)
    assert region_dice_loss(onehot(swapped), target).item() == pytest.approx(
        1 - (1 + 1 + 1 / 9) / 3, abs=1e-4)
    # The class Dice counts necrosis and enhancing both wrong.
    assert soft_dice_loss(onehot(swapped), target).item() == pytest.approx(
        1 - (1 / 9 + 1 + 1 / 9) / 3, abs=1e-4)
    # Gradients reach the logits.
    logits = torch.zeros(2, 4, 8, 8, requires_grad=True)
    region_dice_loss(logits, target).backward()
    assert logits.grad.abs().sum() > 0


def test_dice_ce_and_the_cosine_schedule(cache, tmp_path):
    rows = train(cache[:2], [], tmp_path, _config(epochs=4, steps_per_epoch=2, loss="dice_ce",
                                                  schedule="cosine", lr=1e-3),
                 device=torch.device("cpu"))
    # The lr logged is the last step's: step 2k+1 of 8, progress (2k+1)/8.
    expected = [1e-3 * 0.5 * (1 + np.cos(np.pi * (2 * k + 1) / 8)) for k in range(4)]
    np.testing.assert_allclose([r["lr"] for r in rows], expected, rtol=1e-9)
    assert all(np.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in rows)


def test_region_dice_ce_trains(cache, tmp_path):
    rows = train(cache[:2], [], tmp_path, _config(epochs=1, steps_per_epoch=2,
                                                  loss="region_dice_ce"),
                 device=torch.device("cpu"))
    assert np.isfinite(rows[0]["train_loss"]) and rows[0]["train_loss"] > 0
    with pytest.raises(ValueError, match="loss must be one of"):
        _config(loss="dice")


def test_distill_loss_is_the_kl_divergence_from_the_teachers_probabilities():
    from tiramisu_brats.train import distill_loss

    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    same = logits.detach().softmax(1)
    assert distill_loss(logits, same).item() == pytest.approx(0, abs=1e-6)
    # one pixel's worth: target (1/2, 1/2, 0, 0) against a uniform softmax: log 2
    uniform = torch.zeros(1, 4, 1, 1)
    target = torch.tensor([0.5, 0.5, 0, 0]).view(1, 4, 1, 1)
    assert distill_loss(uniform, target).item() == pytest.approx(np.log(2), abs=1e-6)
    loss = distill_loss(logits, torch.roll(same, 1, dims=1))
    loss.backward()
    assert loss.item() > 0 and logits.grad.abs().sum() > 0


def test_distillation_adds_the_teachers_divergence_and_records_them(cache, tmp_path,
                                                                   tiny_weights):
    from tiramisu_brats.export import file_sha256

    tiny = load_model(tiny_weights)
    common = dict(model=tiny.config, epochs=1, steps_per_epoch=2, lr=1e-12,
                  init=str(tiny_weights))
    plain = train(cache[:2], [], tmp_path / "a", _config(**common), device=torch.device("cpu"))
    # the same steps (seed, slices, dropout) with a teacher of other weights: the loss grows
    # by the divergence from it
    teacher = tmp_path / "teacher.safetensors"
    torch.manual_seed(5)
    other = TiramisuConfig(first_conv=8, down_blocks=(2, 2), bottleneck=2, up_blocks=(2, 2),
                           growth_rate=2)
    save_weights(Tiramisu(other), teacher)
    config = _config(**common, teachers=[str(teacher)], distill=0.5,
                     teachers_sha256=[file_sha256(teacher)])
    taught = train(cache[:2], [], tmp_path / "b", config, device=torch.device("cpu"))
    assert taught[0]["train_loss"] > plain[0]["train_loss"] > 0
    stored = TrainConfig.from_json((tmp_path / "b" / "train_config.json").read_text())
    assert stored.teachers == (str(teacher),) and stored.distill == 0.5
    assert stored.teachers_sha256 == (file_sha256(teacher),)
    with pytest.raises(ValueError, match="sha256 differs"):
        train(cache[:2], [], tmp_path / "c", dataclasses.replace(
            config, teachers_sha256=("0" * 64,)), device=torch.device("cpu"))
    three = tmp_path / "three.safetensors"
    save_weights(Tiramisu(dataclasses.replace(other, num_classes=3)), three)
    with pytest.raises(ValueError, match="a teacher of 3 classes for a model of 4"):
        train(cache[:2], [], tmp_path / "d", _config(**common, teachers=[str(three)],
                                                     distill=1.0), device=torch.device("cpu"))
    with pytest.raises(ValueError, match="distill must be > 0 with teachers"):
        _config(distill=1.0)
    with pytest.raises(ValueError, match="distill must be > 0 with teachers"):
        _config(teachers=[str(teacher)])


def test_a_refused_run_is_refused_before_caching_and_writes_nothing(small_cases, tmp_path,
                                                                     tiny_weights):
    from tiramisu_brats import io
    from tiramisu_brats.train import run_from_folders

    not_weights = tmp_path / "notes.safetensors"
    not_weights.write_text("not weights")
    refused = [
        (dict(fold=(5, 5)), ValueError,
         r"^fold 5 of 5: the fold index counts from 0, so it must be below 5$"),
        (dict(fold=(0, 4)), ValueError,
         r"^fold 0 of 4: a 4-fold split needs at least 4 cases, found 3$"),
        (dict(val_cases=["NOPE", "syn-1"]), ValueError,
         r"^validation cases not among the 3 cases found: NOPE \(known: syn-0, syn-1, syn-2\)$"),
        (dict(val_cases=["syn-0", "syn-1", "syn-2"]), ValueError,
         "^no training cases left after the validation split$"),
        (dict(init=tmp_path / "nonexistent"), FileNotFoundError,
         "nonexistent: weights to start from not found$"),
        (dict(init=not_weights), ValueError, "notes.safetensors: not a tiramisu-brats weights"),
        (dict(init=tiny_weights, model=dataclasses.replace(TINY, growth_rate=2)), ValueError,
         "tiny.safetensors: a model of another configuration"),
        (dict(fold=(0, 3), val_cases=["syn-0"]), ValueError,
         r"^the validation split is given 2 ways \(a fold, validation cases\); one of them "),
        (dict(resume=True), ValueError, r"run\d+: nothing to resume: no run there"),
    ]
    for k, (arguments, error, message) in enumerate(refused):
        run = tmp_path / f"run{k}"
        with pytest.raises(error, match=message):
            run_from_folders(small_cases, run, **{"model": TINY, "patch": (32, 32),
                                                  **arguments})
        assert not run.exists(), arguments
    # a run already there (no resume), or a resumed one whose cases are not in the data: the
    # run folder is left as it was, with no cache
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "checkpoint.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match="existing holds a run already"):
        run_from_folders(small_cases, existing, model=TINY, patch=(32, 32))
    assert [p.name for p in existing.iterdir()] == ["checkpoint.safetensors"]
    (existing / "train_config.json").write_text(
        _config(train_cases=("syn-0", "syn-1"), val_cases=("syn-7",)).to_json())
    with pytest.raises(io.InputError, match=r"existing: the run's cases syn-7 are not in the "
                                            r"data$"):
        run_from_folders(small_cases, existing, resume=True)
    assert not (existing / "cache").exists()


def test_a_run_from_folders_validates_on_the_fold_asked_for(small_cases, tmp_path,
                                                            tiny_weights):
    from tiramisu_brats.export import file_sha256
    from tiramisu_brats.train import run_from_folders

    class Started(Exception):
        pass

    def stop(run):
        raise Started(run)

    with pytest.raises(Started) as started:
        run_from_folders(small_cases, tmp_path / "run", fold=(1, 3), init=tiny_weights,
                         on_start=stop, model=TINY, patch=(32, 32), seed=3)
    run = started.value.args[0]
    assert (run.config.val_cases, run.config.train_cases) == (("syn-1",), ("syn-0", "syn-2"))
    assert [c.case_id for c in run.val_set] == ["syn-1"]
    assert run.config.init_sha256 == file_sha256(tiny_weights)
    assert data.is_cache(tmp_path / "run" / "cache")
    assert len(data.open_cache(tmp_path / "run" / "cache")) == 9  # 3 cases, 3 planes


def test_without_validation_the_best_weights_are_the_last(cache, tmp_path):
    from tiramisu_brats.model import read_config

    rows = train(cache[:2], [], tmp_path / "a", _config(epochs=2, steps_per_epoch=1),
                 device=torch.device("cpu"))
    assert len(rows) == 2 and np.isnan(rows[-1]["val_dice_mean"])
    assert read_config(tmp_path / "a" / "model_best.safetensors")[1]["epoch"] == "2"
    best = load_model(tmp_path / "a" / "model_best.safetensors").state_dict()
    last = load_model(tmp_path / "a" / "model_last.safetensors").state_dict()
    assert all(torch.equal(best[k], last[k]) for k in last)
    # with validation cases, the epoch of the best validation mean Dice (the first of equals)
    rows = train(cache[:2], cache[2:], tmp_path / "b", _config(epochs=3, steps_per_epoch=1),
                 device=torch.device("cpu"))
    best = max(rows, key=lambda r: r["val_dice_mean"])["epoch"]
    assert read_config(tmp_path / "b" / "model_best.safetensors")[1]["epoch"] == str(best)


def test_patch_sizes_must_be_positive():
    for patch in ((0, 0), (-32, 64)):  # multiples of 32 all the same
        with pytest.raises(ValueError, match=rf"^patch {re.escape(str(patch))} must be "
                                             "positive multiples of 32$"):
            TrainConfig(patch=patch)


def test_a_resumed_run_refuses_another_split_start_or_teacher():
    from tiramisu_brats.train import resumed_config

    stored = _config()  # validated on syn-2
    # the same split asked for again, as the run's fold, cases or fraction: no change
    assert resumed_config(stored, {}, fold=(0, 3)) == stored
    assert resumed_config(stored, {}, val_cases=["syn-2"]) == stored
    assert resumed_config(stored, {}, val_fraction=0.3) == stored  # seed 3 draws syn-2
    refused = [
        (dict(fold=(1, 3)), r"val_cases \(\('syn-1',\), stored \('syn-2',\)\)$"),
        (dict(val_cases=["syn-0"]), r"val_cases \(\('syn-0',\), stored \('syn-2',\)\)$"),
        (dict(val_fraction=0.7), r"val_cases \(\('syn-1', 'syn-2'\), stored \('syn-2',\)\)$"),
        (dict(init="ft.safetensors"), r"init \('ft.safetensors', stored ''\)$"),
    ]
    for given, message in refused:
        with pytest.raises(ValueError, match="^a resumed run keeps its recipe; it differs in "
                                             + message):
            resumed_config(stored, {}, **given)
    with pytest.raises(ValueError, match=r"differs in distill \(0.5, stored 0.0\), teachers "
                                         r"\(\('t.safetensors',\), stored \(\)\)$"):
        resumed_config(stored, {"teachers": ["t.safetensors"], "distill": 0.5})
    taught = _config(teachers=("t.safetensors",), distill=0.5, init="ft.safetensors")
    assert resumed_config(taught, {"teachers": ["t.safetensors"], "distill": 0.5},
                          init="ft.safetensors") == taught


def test_a_run_is_not_resumed_shorter_than_it_ran(cache, tmp_path):
    train(cache[:2], [], tmp_path, _config(epochs=2, steps_per_epoch=1),
          device=torch.device("cpu"))
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"the run has completed 2 epochs; it cannot go on "
                                         r"with 1$"):
        train(cache[:2], [], tmp_path, _config(epochs=1, steps_per_epoch=1), resume=True,
              device=torch.device("cpu"))
    assert TrainConfig.from_json((tmp_path / "train_config.json").read_text()).epochs == 2
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before


def test_a_corrupt_checkpoint_is_named_on_resume(cache, tmp_path):
    train(cache[:2], [], tmp_path, _config(epochs=1, steps_per_epoch=1),
          device=torch.device("cpu"))
    ckpt = tmp_path / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # a disk that filled up while it was written
    with pytest.raises(ValueError, match=rf"^{ckpt}: not a tiramisu-brats training checkpoint"):
        train(cache[:2], [], tmp_path, _config(epochs=2, steps_per_epoch=1), resume=True,
              device=torch.device("cpu"))


def test_a_resume_reuses_the_cache_the_run_used(small_cases, tmp_path, caplog):
    import shutil

    from tiramisu_brats.train import run_from_folders

    recipe = dict(model=TINY, patch=(32, 32), steps_per_epoch=1, batch_size=2)
    shared, run = tmp_path / "shared", tmp_path / "run"
    run_from_folders(small_cases, run, cache=shared, epochs=1, **recipe)
    stored = TrainConfig.from_json((run / "train_config.json").read_text())
    assert stored.cache == str(shared.absolute()) and len(data.open_cache(shared)) == 9
    resumed = run_from_folders(small_cases, run, resume=True, epochs=2)
    assert len(resumed.rows) == 2 and resumed.config.cache == str(shared.absolute())
    assert not (run / "cache").exists()
    shutil.rmtree(shared)  # gone: cached anew in the run folder, and said so
    with caplog.at_level("WARNING", logger="tiramisu_brats.train"):
        resumed = run_from_folders(small_cases, run, resume=True, epochs=3)
    assert len(resumed.rows) == 3 and len(data.open_cache(run / "cache")) == 9
    assert f"the run's cache {shared.absolute()} is gone" in caplog.text
    assert (TrainConfig.from_json((run / "train_config.json").read_text()).cache
            == str((run / "cache").absolute()))


def test_resuming_a_run_that_completed_no_epoch_is_refused_before_caching(small_cases,
                                                                          tmp_path):
    from tiramisu_brats.train import run_from_folders

    run = tmp_path / "run"
    run.mkdir()  # as a run interrupted in its first epoch leaves it
    (run / "train_config.json").write_text(_config(patch=(32, 32)).to_json())
    started = []
    with pytest.raises(FileNotFoundError, match=r"^.*run: nothing to resume: no epoch of the "
                                                r"run was completed \(no checkpoint"):
        run_from_folders(small_cases, run, resume=True, on_start=started.append)
    assert [p.name for p in run.iterdir()] == ["train_config.json"] and not started


def test_a_cache_folder_given_as_data_is_not_cached_again_elsewhere(small_cases, tmp_path):
    from tiramisu_brats.train import run_from_folders

    data.build_cache(small_cases, tmp_path / "cache")
    with pytest.raises(ValueError, match=r"cache is a slice cache: the cases are read from it, "
                                         r"not cached again into .*other"):
        run_from_folders(tmp_path / "cache", tmp_path / "run", cache=tmp_path / "other",
                         model=TINY, patch=(32, 32))
    assert not (tmp_path / "run").exists() and not (tmp_path / "other").exists()


def _package(monkeypatch, capsys, *args) -> tuple[int, str]:
    """Run scripts/package_weights.py with ``args`` in this process: its exit status, stderr."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "package_weights.py"
    monkeypatch.setattr(sys, "argv", [script.name, *map(str, args)])
    try:
        runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as done:
        code = done.code
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_package_weights_checks_its_inputs_before_writing(cache, tmp_path, monkeypatch, capsys):
    from tiramisu_brats.export import decision
    from tiramisu_brats.model import read_config

    run = tmp_path / "run"
    train(cache[:2], [], run, _config(epochs=2, steps_per_epoch=1, val_cases=(),
                                      cache=str(tmp_path / "c")), device=torch.device("cpu"))
    out = tmp_path / "w.safetensors"
    words = ("--recipe", "r", "--postprocess", "p")
    refused = [
        ((tmp_path / "nope", out, *words), r"nope: no such run folder or weights file$"),
        ((run, out, *words, "--decision", "{bad"), r"unreadable decision '\{bad' \("),
        ((run, out, *words, "--decision", '{"qc_spread_review": 2}'),
         r"expected values in \(0, 1\) for region_threshold"),
        ((run, tmp_path / "w.onnx", *words), r"w.onnx: the weights go to a .safetensors file"),
    ]
    for args, message in refused:
        code, err = _package(monkeypatch, capsys, *args)
        assert code == 2 and re.search(rf"^error: .*{message}", err), err
        assert err.count("\n") == 1 and not list(tmp_path.glob("w.*")), err
    code, err = _package(monkeypatch, capsys, run, out, *words, "--best")
    assert code == 0, err
    _, header = read_config(out)
    assert header["epoch"] == "2" and header["held_out"] == ""  # no validation: best is last
    assert "cache" not in json.loads(header["train_config"])  # a place, not the recipe
    assert out.with_suffix(".onnx").is_file()
    before = out.read_bytes()
    code, err = _package(monkeypatch, capsys, run, out, *words)
    assert code == 2 and f"error: {out}: already exists; pass --overwrite" in err
    assert out.read_bytes() == before
    # a decision recorded in the packaged weights themselves: an update in place
    code, err = _package(monkeypatch, capsys, out, out, "--decision", '{"qc_spread_review": 0.2}')
    assert code == 0 and decision(out) == {"qc_spread_review": 0.2}, err
    code, err = _package(monkeypatch, capsys, run, out, *words, "--overwrite")
    assert code == 0 and decision(out) == {}, err
