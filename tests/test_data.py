import numpy as np
import pytest
import torch

from tiramisu_brats import data


def test_quantization_round_trip_is_within_half_a_step_and_keeps_background_zero():
    z = np.array([0.0, -3.9, 1.234, 7.77, 11.9], np.float32)
    back = data.dequantize(data.quantize(z))
    assert back[0] == 0.0
    np.testing.assert_allclose(back, z, atol=data.QUANT_STEP / 2 + 1e-6)


def test_cache_is_built_once_and_reused(small_cases, tmp_path):
    cases = data.build_cache(small_cases, tmp_path, crop=(64, 64))
    assert [c.case_id for c in cases] == ["syn-0", "syn-1", "syn-2"]
    c = cases[0]
    assert c.images.dtype == np.uint8 and c.images.shape[1:] == (4, 64, 64)
    assert c.classes.shape == (c.images.shape[0], 64, 64)
    assert set(np.unique(c.classes)) == {0, 1, 2, 3}
    assert len(c.tumor_slices) > 0
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = data.build_cache(small_cases, tmp_path, crop=(64, 64))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes
    np.testing.assert_array_equal(again[0].images, c.images)
    assert data.is_cache(tmp_path) and len(data.open_cache(tmp_path)) == 3


def test_kfold_partitions_the_cases():
    ids = [f"c{i}" for i in range(17)]
    folds = [data.kfold(ids, i, 5) for i in range(5)]
    assert sorted(i for f in folds for i in f) == sorted(ids)
    assert [len(f) for f in folds] == [4, 4, 3, 3, 3]
    with pytest.raises(ValueError, match="impossible"):
        data.kfold(ids, 5, 5)


def test_split_is_by_case():
    train, val = data.split_cases(["a", "b", "c", "d"], val_fraction=0.25, seed=1)
    assert len(val) == 1 and set(train) | set(val) == {"a", "b", "c", "d"}
    assert data.split_cases(["a", "b"], val_cases=["b"]) == (["a"], ["b"])
    with pytest.raises(ValueError, match="not found"):
        data.split_cases(["a", "b"], val_cases=["zz"])


def test_sampler_centres_patches_on_tumor(small_cases, tmp_path):
    cases = data.build_cache(small_cases, tmp_path, crop=(64, 64))
    rng = np.random.default_rng(0)
    images, classes = data.PatchSampler(cases, (32, 32), tumor_share=1.0).sample(rng, 16)
    assert images.shape == (16, 4, 32, 32) and classes.shape == (16, 32, 32)
    assert all(classes[i].any() for i in range(16))
    _, none = data.PatchSampler(cases, (32, 32), tumor_share=0.0).sample(rng, 64)
    assert sum(not c.any() for c in none) > 0


def test_augment_keeps_shapes_labels_and_background():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 4, 32, 32)
    x[:, :, 8:24, 8:24] = torch.randn(4, 4, 16, 16)
    y = torch.zeros(4, 32, 32, dtype=torch.long)
    y[:, 12:20, 12:20] = 3
    xa, ya = data.augment(x, y, gen)
    assert xa.shape == x.shape and ya.shape == y.shape and ya.dtype == torch.long
    assert set(ya.unique().tolist()) <= {0, 3}
    assert (xa[:, :, :2, :2] == 0).all()  # corners stay background
    # Without geometric or intensity change the batch is only flipped.
    xi, _ = data.augment(x, y, torch.Generator().manual_seed(0), rotate_deg=0, scale=0,
                          intensity=0)
    assert torch.allclose(xi.abs().sum(), x.abs().sum(), rtol=1e-4)
