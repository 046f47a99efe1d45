import json
import re

import pytest
import torch

from tiramisu_brats.model import (
    FC_DENSENET103,
    REFERENCE,
    Tiramisu,
    TiramisuConfig,
    count_parameters,
    load_model,
    read_config,
    recompute_batchnorm,
    save_weights,
)

TINY = TiramisuConfig(first_conv=8, down_blocks=(2, 2), bottleneck=2, up_blocks=(2, 2),
                      growth_rate=4)


def test_reference_down_path_shapes_match_table_1():
    model = Tiramisu(REFERENCE).eval()
    shapes = []
    hooks = [model.first.register_forward_hook(lambda m, i, o: shapes.append(o.shape[1:]))]
    for pool in model.pool:
        hooks.append(pool.register_forward_hook(lambda m, i, o: shapes.append(o.shape[1:])))
    with torch.no_grad():
        x = torch.randn(1, 4, 192, 160)
        y = model(x)
        bottleneck = model.bottleneck(torch.randn(1, 352, 6, 5))
    for h in hooks:
        h.remove()
    # (channels, H, W): the reference's 192x160x48, 96x80x80, ... 6x5x352.
    assert [tuple(s) for s in shapes] == [
        (48, 192, 160), (80, 96, 80), (120, 48, 40), (176, 24, 20), (256, 12, 10), (352, 6, 5)
    ]
    assert tuple(bottleneck.shape) == (1, 472, 6, 5)
    assert tuple(y.shape) == (1, 4, 192, 160)


def test_parameter_counts_of_the_presets():
    # The reference paper's "9.3 M" is FC-DenseNet103 with k=16; its own k=8 gives 2.56 M.
    assert count_parameters(Tiramisu(REFERENCE)) == 2_564_956
    assert count_parameters(Tiramisu(FC_DENSENET103)) == 9_320_724


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = Tiramisu(TINY).train()
    x = torch.randn(2, 4, 32, 64)
    loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 4, (2, 32, 64)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize("shape", [(1, 4, 190, 160), (1, 4, 192, 150)])
def test_bad_input_size_says_what_to_pad_to(shape):
    with pytest.raises(ValueError, match="pad to 192x160"):
        Tiramisu(REFERENCE)(torch.zeros(shape))


def test_wrong_channel_count_is_refused():
    with pytest.raises(ValueError, match=r"expected a batch \(N, 4, H, W\)"):
        Tiramisu(TINY)(torch.zeros(1, 3, 32, 32))


def test_weights_round_trip_rebuilds_from_the_file_alone(tmp_path):
    torch.manual_seed(1)
    model = Tiramisu(TINY).eval()
    path = save_weights(model, tmp_path / "m.safetensors", metadata={"note": "x"})
    config, meta = read_config(path)
    assert config == TINY and meta["note"] == "x"
    loaded = load_model(path)
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*tmp"))


def test_half_weights_load_as_float32_close_to_the_original(tmp_path):
    torch.manual_seed(2)
    model = Tiramisu(TINY).eval()
    loaded = load_model(save_weights(model, tmp_path / "h.safetensors", half=True))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-2, atol=1e-2)


def test_config_with_unknown_keys_or_bad_values_is_refused():
    with pytest.raises(ValueError, match="unknown keys"):
        TiramisuConfig.from_dict({"growth_rate": 8, "evil": "os.system"})
    with pytest.raises(ValueError, match="growth_rate"):
        TiramisuConfig.from_dict({"growth_rate": -3})
    with pytest.raises(ValueError, match="dropout"):
        TiramisuConfig.from_dict({"dropout": 5.0})
    assert TiramisuConfig.from_dict(json.loads(REFERENCE.to_json())) == REFERENCE


def test_a_file_that_is_not_our_weights_is_refused(tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x80\x04not safetensors at all")
    with pytest.raises(ValueError, match="not a tiramisu-brats weights file"):
        load_model(bogus)


def test_weights_with_other_tensors_than_their_config_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from tiramisu_brats.model import read_config

    model = Tiramisu(TiramisuConfig(first_conv=8, down_blocks=(2,), bottleneck=2,
                                    up_blocks=(2,), growth_rate=4))
    path = save_weights(model, tmp_path / "w.safetensors")
    _, header = read_config(path)
    state = load_file(str(path))
    first = sorted(state)[0]
    state["extra.weight"] = state.pop(first)
    save_file(state, str(path), metadata=header)
    with pytest.raises(ValueError, match=rf"w\.safetensors: weights do not match the config "
                       rf"\(missing \['{re.escape(first)}'\], unexpected \['extra\.weight'\]\)"):
        load_model(path)


def test_weights_that_are_not_finite_are_refused(tmp_path):
    model = Tiramisu(TiramisuConfig(first_conv=8, down_blocks=(2,), bottleneck=2,
                                    up_blocks=(2,), growth_rate=4))
    with torch.no_grad():
        next(iter(model.parameters())).view(-1)[0] = float("nan")
    path = save_weights(model, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"nan\.safetensors: .* holds values that are not finite"):
        load_model(path)


def test_recompute_batchnorm_takes_the_plain_mean_over_the_batches_with_dropout_off():
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(3)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), norm)
    batches = [torch.randn(4, 3, 5, 5) * 2 + 1, torch.randn(4, 3, 5, 5) - 3]
    assert recompute_batchnorm(model, batches) is model and not model.training
    # dropout off: the statistics are those of the batches themselves, equally weighted
    expected_mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    expected_var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(norm.running_mean, expected_mean)
    torch.testing.assert_close(norm.running_var, expected_var)
    assert norm.num_batches_tracked.item() == 2
