"""Backends: parity with PyTorch, windows and tumor slices, imports, int8."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiramisu_brats import export, infer, io
from tiramisu_brats.model import REFERENCE, Tiramisu, load_model, save_weights
from tiramisu_brats.preprocess import brain_windows, preprocess
from tiramisu_brats.synthetic import make_case

ONNX_BACKENDS = ("openvino", "onnxruntime")
REAL_CASE = "brats-labeled/BraTS2021_00006"
pytestmark = pytest.mark.usefixtures("user_cache")


@pytest.fixture(scope="module")
def synthetic_slices() -> np.ndarray:
    return preprocess(make_case(3, shape=(64, 64, 48)).image, crop=(64, 64))[0]


def _torch_logits(weights: Path, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return load_model(weights)(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("name", ONNX_BACKENDS)
def test_logits_match_torch(tiny, name):
    x = np.random.default_rng(0).standard_normal((3, 4, 64, 96)).astype(np.float32)
    backend = infer.load_backend(name, tiny, precision="fp32")
    assert (backend.name, backend.precision) == (name, "fp32")
    np.testing.assert_allclose(backend(x), _torch_logits(tiny, x), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", ONNX_BACKENDS)
def test_labels_match_torch(tiny, name, synthetic_slices):
    ref = infer.load_backend("torch", tiny).predict(synthetic_slices)
    calls = []
    labels = infer.predict_labels(infer.load_backend(name, tiny, precision="fp32"),
                                  synthetic_slices, 3, on_batch=calls.append)
    assert labels.dtype == np.uint8 and labels.shape == ref.shape
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    assert (labels == ref).mean() >= 0.999
    assert sum(calls) == len(synthetic_slices) and max(calls) == 3


def test_predict_labels_in_windows(tiny, synthetic_slices):
    backend = infer.load_backend("torch", tiny)
    whole = backend.predict(synthetic_slices)
    n = len(synthetic_slices)
    everything = [(slice(0, 64), slice(0, 64))] * n
    np.testing.assert_array_equal(infer.predict_labels(backend, synthetic_slices,
                                                       windows=everything), whole)
    windows = [(slice(0, 64), slice(32, 64)), None, (slice(32, 64), slice(0, 32))] * (n // 3)
    windows += [everything[0]] * (n - len(windows))
    calls = []
    labels = infer.predict_labels(backend, synthetic_slices, 4, on_batch=calls.append,
                                  windows=windows)
    assert sum(calls) == n
    for i, w in enumerate(windows):
        expected = np.zeros_like(whole[i])
        if w is not None:  # the window alone through the network, 0 around it
            part = np.ascontiguousarray(synthetic_slices[i : i + 1, :, w[0], w[1]])
            expected[w] = backend.predict(part)[0]
        np.testing.assert_array_equal(labels[i], expected)
    with pytest.raises(ValueError, match="windows for"):
        infer.predict_labels(backend, synthetic_slices, windows=windows[:-1])


@pytest.mark.parametrize("name", ["torch", "openvino"])
def test_probabilities_are_the_softmax_of_the_logits_in_their_windows(tiny, name,
                                                                       synthetic_slices):
    backend = infer.load_backend(name, tiny, precision="fp32")
    x = synthetic_slices
    probs = infer.predict_probabilities(backend, x)
    logits = _torch_logits(tiny, x)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=2e-4)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(io.CLASS_TO_LABEL[probs.argmax(1)], backend.predict(x))
    n = len(x)
    windows = [(slice(0, 32), slice(32, 64)), None] * (n // 2) + [None] * (n % 2)
    inside = infer.predict_probabilities(backend, x, windows=windows)
    assert (inside[1::2, 0] == 1).all() and (inside[1::2, 1:] == 0).all()  # no window: bg
    assert (inside[0, 0, 32:] == 1).all() and (inside[0, 0, :, :32] == 1).all()
    part = np.ascontiguousarray(x[:1, :, :32, 32:])
    np.testing.assert_allclose(inside[0, :, :32, 32:],
                               infer.predict_probabilities(backend, part)[0], atol=1e-5)


class _Threshold(infer.Backend):
    """Label 2 where channel 0 exceeds 0.5; records the slices it saw (channel 1 holds the
    slice's index)."""

    batch_size = 3
    channels, divisor = 2, 8  # its slices: (N, 2, 8, 8)

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.seen += [int(i) for i in batch[:, 1, 0, 0]]
        logits = np.zeros((len(batch), 4, *batch.shape[2:]), np.float32)
        logits[:, 0], logits[:, 2] = 0.5, batch[:, 0]
        return logits


@pytest.mark.parametrize("windowed", [False, True])
def test_tumor_slices_skip_only_tumor_thinner_than_the_stride_between_tumor_free_ones(windowed):
    assert (infer.TUMOR_STRIDE, infer.TUMOR_REACH) == (4, 2)
    slices = np.zeros((41, 2, 8, 8), np.float32)
    slices[:, 1] = np.arange(41)[:, None, None]
    # A tumor; 3 slices wholly between coarse slices 24 and 28, 5 from the tumor and 4 from
    # the next; 4 slices reaching coarse slice 36, and 2 slices from them a one-slice sliver
    # (which closing could join to them).
    for k in (*range(10, 21), 25, 26, 27, 31, 33, 34, 35, 36):
        slices[k, 0, 2:5, 3:6] = 1
    windows = [(slice(0, 8), slice(0, 8))] * 41 if windowed else None
    stats: dict[str, int] = {}
    full = infer.predict_labels(_Threshold(), slices, windows=windows, stats=stats)
    assert stats == {"run": 41}
    backend, calls = _Threshold(), []
    labels = infer.predict_labels(backend, slices, on_batch=calls.append, windows=windows,
                                  tumor_slices=True, stats=stats)
    # Coarse slices, then those within 2 of tumor until each run of tumor slices has 2
    # tumor-free slices run on each side.
    expected_run = {*range(0, 41, 4), *range(8, 23), *range(29, 39)}
    assert sorted(backend.seen) == sorted(expected_run)  # each once
    assert stats == {"run": len(expected_run)} and sum(calls) == 41
    expected = full.copy()
    expected[[25, 26, 27]] = 0  # thinner than the stride, between tumor-free coarse slices
    np.testing.assert_array_equal(labels, expected)
    assert all((full[k] == 2).sum() == 9 for k in (25, 26, 27, 31))


def test_bf16_close_to_fp32(tiny):
    x = np.random.default_rng(1).standard_normal((2, 4, 32, 32)).astype(np.float32)
    logits = infer.load_backend("openvino", tiny, precision="bf16")(x)
    np.testing.assert_allclose(logits, _torch_logits(tiny, x), atol=0.05, rtol=0)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"  # `import torch` raises ImportError


def test_api_import_does_not_import_backends():
    # Segmenting pays only for what it uses: no backend and no plotting library at import.
    result = _python("import sys, tiramisu_brats.api, tiramisu_brats.cli\n"
                     "print(sorted(m for m in ('torch', 'openvino', 'onnxruntime', 'nncf', "
                     "'matplotlib') if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ONNX_BACKENDS)
def test_shipped_export_runs_without_torch(tiny, name):
    code = BLOCK_TORCH + (
        "import numpy as np\nfrom tiramisu_brats import infer\n"
        f"b = infer.load_backend({name!r}, {str(tiny)!r})\n"
        "print(b(np.zeros((1, 4, 32, 32), np.float32)).shape)\n"
        "assert sys.modules['torch'] is None\n")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 4, 32, 32)"


def test_no_export_and_no_torch_is_a_clear_error(tmp_path, random_weights):
    weights = random_weights(tmp_path)
    result = _python(BLOCK_TORCH + "from tiramisu_brats import infer\n"
                     f"infer.load_backend('openvino', {str(weights)!r})")
    assert result.returncode != 0
    assert "InputError" in result.stderr and "tiramisu-brats[torch]" in result.stderr
    assert not (tmp_path / "tiny.onnx").exists()


def test_unknown_backend_and_precision(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        infer.load_backend("tensorrt", tiny)
    with pytest.raises(ValueError, match="not available with the torch backend"):
        infer.load_backend("torch", tiny, precision="int8")
    with pytest.raises(ValueError, match="not available with the onnxruntime backend"):
        infer.load_backend("onnxruntime", tiny, precision="bf16")
    with pytest.raises(FileNotFoundError):
        infer.load_backend("openvino", tmp_path / "missing.safetensors")


@pytest.mark.parametrize("field", [dict(num_classes=5), dict(num_classes=3),
                                   dict(in_channels=3)])
def test_weights_of_a_network_segmenting_cannot_use_are_refused_before_any_export(
        tmp_path, field):
    from tiramisu_brats.model import Tiramisu, TiramisuConfig, save_weights

    config = TiramisuConfig(first_conv=8, down_blocks=(2, 2), bottleneck=2, up_blocks=(2, 2),
                            growth_rate=4, **field)
    weights = save_weights(Tiramisu(config).eval(), tmp_path / "odd.safetensors")
    for name in infer.BACKENDS:
        with pytest.raises(ValueError, match=r"odd\.safetensors: a network of \d input channels "
                                             r"and \d classes; segmenting needs 4"):
            infer.load_backend(name, weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.safetensors"]  # no export


def test_slices_the_network_cannot_take_are_refused_before_any_runs(tiny):
    backend = infer.load_backend("onnxruntime", tiny)
    assert backend.divisor == 4
    for shape in [(3, 4, 50, 70), (2, 3, 64, 64), (2, 4, 64)]:
        with pytest.raises(ValueError, match=r"expected slices \(N, 4, H, W\) with H and W "
                                             r"multiples of 4, got shape"):
            infer.predict_labels(backend, np.zeros(shape, np.float32))
        with pytest.raises(ValueError, match="expected slices"):
            infer.predict_probabilities(backend, np.zeros(shape, np.float32))


def test_segmenter_records_backend_and_precision(tiny):
    import openvino as ov

    from tiramisu_brats.api import Segmenter

    info = Segmenter(tiny, precision="fp32").model_info()
    assert (info["backend"], info["precision"]) == (infer.DEFAULT_BACKEND, "fp32")
    # The default asks for bf16; OpenVINO computes in it only where the CPU can.
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert Segmenter(tiny).model_info()["precision"] == ("bf16" if has_bf16 else "fp32")


needs_nncf = pytest.mark.skipif(importlib.util.find_spec("nncf") is None,
                                reason="nncf not installed (pip install 'tiramisu-brats[int8]')")


def _int8_named(weights: Path, check: dict | None) -> Path:
    """An IR beside ``weights`` in the place of their int8 model, recording ``check`` (fp32
    inside: which model the default picks is tested here, not what int8 computes)."""
    import openvino as ov

    path = weights.with_name(weights.stem + ".int8.xml")
    ov.save_model(ov.Core().read_model(weights.with_suffix(".onnx")), path)
    record = {"weights_sha256": export.file_sha256(weights), "calibration": "test"}
    if check is not None:
        record["labels_check"] = check
    export.sidecar(path).write_text(json.dumps(record))
    return path


def test_the_default_is_int8_only_where_its_model_kept_the_labels_on_a_cpu_that_favours_it(
        tmp_path, tiny, monkeypatch):
    from tiramisu_brats.api import Segmenter

    weights = shutil.copy(tiny, tmp_path / "tiny.safetensors")
    shutil.copy(tiny.with_suffix(".onnx"), tmp_path / "tiny.onnx")
    shutil.copy(export.sidecar(tiny.with_suffix(".onnx")), export.sidecar(tmp_path / "tiny.onnx"))
    avx2 = ("Some CPU", frozenset({"avx2", "fma"}))
    monkeypatch.setattr(infer, "cpu_info", lambda: avx2)
    precision, why, path = infer.choose_precision("openvino", weights)
    assert (precision, path) == ("bf16", None)
    assert why.startswith("fp32: no int8 model of these weights that keeps the labels")
    kept = {"kept": True, "cases": 27, "tolerance": 0.01, "largest_change": 0.0042}
    _int8_named(weights, None)  # quantized, never checked
    assert infer.choose_precision("openvino", weights)[0] == "bf16"
    _int8_named(weights, {**kept, "kept": False})
    assert infer.choose_precision("openvino", weights)[0] == "bf16"
    made = _int8_named(weights, kept)
    precision, why, path = infer.choose_precision("openvino", weights)
    assert (precision, path) == ("int8", made)
    assert why == ("int8: the CPU has avx2, and this int8 model kept Dice within 0.01 of fp32 "
                   "on 27 labelled cases (largest change 0.0042)")
    backend = infer.load_backend("openvino", weights)
    assert (backend.precision, backend.why) == ("int8", why)
    info = Segmenter(weights).model_info()
    assert (info["precision"], info["precision_why"]) == ("int8", why)
    assert infer.load_backend("openvino", weights, precision="fp32").why == "asked for"
    # Not where the CPU has no int8 instructions, nor off the CPU, nor with other backends.
    assert infer.choose_precision("openvino", weights, device="gpu")[0] == "bf16"
    assert infer.choose_precision("torch", weights)[:2] == ("fp32", "the torch backend's default")
    monkeypatch.setattr(infer, "cpu_info", lambda: ("Old CPU", frozenset({"sse4_2"})))
    precision, why, _ = infer.choose_precision("openvino", weights)
    assert (precision, why) == ("bf16", "fp32: the CPU has none of avx2, avx512_vnni "
                                        "for int8; the CPU does not compute in bf16")
    monkeypatch.setattr(infer, "cpu_info", lambda: ("", frozenset({"avx512_vnni",
                                                                   "avx512_bf16"})))
    assert infer.choose_precision("openvino", weights)[0] == "int8"
    amx = frozenset({"avx2", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})
    monkeypatch.setattr(infer, "cpu_info", lambda: ("", amx))  # bf16 beats int8 with AMX
    assert infer.choose_precision("openvino", weights) == (
        "bf16", "bf16: the CPU has amx_bf16, with which OpenVINO computes this network faster "
        "in bf16 than in int8", None)
    monkeypatch.setattr(infer, "cpu_info", lambda: ("", frozenset({"avx512_vnni",
                                                                   "avx512_bf16"})))
    shutil.copy(tiny, weights)  # the same weights again: still theirs
    assert infer.choose_precision("openvino", weights)[0] == "int8"
    with open(weights, "ab") as f:  # other weights: the int8 model is not theirs
        f.write(b" ")
    assert infer.choose_precision("openvino", weights)[0] == "bf16"


@needs_nncf
@pytest.mark.slow
@pytest.mark.parametrize("name", ONNX_BACKENDS)
def test_int8_agrees_with_fp32(tmp_path, tiny, name, synthetic_slices, monkeypatch):
    weights = shutil.copy(tiny, tmp_path / "tiny.safetensors")
    shutil.copy(tiny.with_suffix(".onnx"), tmp_path / "tiny.onnx")
    shutil.copy(export.sidecar(tiny.with_suffix(".onnx")), export.sidecar(tmp_path / "tiny.onnx"))
    calibration = preprocess(make_case(4, shape=(64, 64, 48)).image, crop=(64, 64))[0]
    backend = infer.load_backend(name, weights, precision="int8", calibration=calibration)
    ref = infer.load_backend("torch", weights).predict(synthetic_slices)
    assert (backend.predict(synthetic_slices) == ref).mean() >= 0.99
    made = tmp_path / ("tiny.int8.xml" if name == "openvino" else "tiny.int8.onnx")
    assert export.recorded(made)["weights_sha256"] == export.file_sha256(weights)
    assert name != "openvino" or made.with_suffix(".bin").is_file()  # the IR's second file
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries

    def no_quantize(*args):
        raise AssertionError("quantized again")

    monkeypatch.setattr(export, "quantize", no_quantize)
    infer.load_backend(name, weights, precision="int8", calibration=calibration)
    infer.load_backend(name, weights, precision="int8")  # any calibration will do
    with pytest.raises(AssertionError, match="quantized again"):  # other calibration: redo
        infer.load_backend(name, weights, precision="int8", calibration=calibration[:5])


@pytest.mark.slow
@pytest.mark.real
def test_real_case_labels_match_torch(real_case, tmp_path, monkeypatch):
    """Every backend against PyTorch on a real case (the shipped model, else random weights)."""
    monkeypatch.setenv("TIRAMISU_BRATS_CACHE", str(tmp_path / "cache"))  # not into the package
    weights = export.default_weights()
    if not weights.is_file():
        weights = save_weights(Tiramisu(REFERENCE), tmp_path / "reference.safetensors")
    image = io.read_case(io.find_case_files(real_case(REAL_CASE))).image
    slices = preprocess(image)[0][::4]
    ref = infer.load_backend("torch", weights).predict(slices)
    for name in ONNX_BACKENDS:
        labels = infer.load_backend(name, weights, precision="fp32").predict(slices)
        agree = (labels == ref).mean()
        assert agree >= 0.999, json.dumps({"backend": name, "agreement": agree})
    # The default path: openvino's default precision on each slice's brain window.
    labels = infer.predict_labels(infer.load_backend("openvino", weights), slices,
                                  windows=brain_windows(slices))
    agree = (labels == ref).mean()
    assert agree >= 0.999, json.dumps({"backend": "openvino default", "agreement": agree})


def test_region_labels_nest_the_regions_and_argmax_without_a_threshold():
    # background, necrosis, edema, enhancing; one voxel per column
    probs = np.array([[0.40, 0.60, 0.55, 0.80, 0.30, 0.25],
                      [0.10, 0.05, 0.20, 0.05, 0.20, 0.30],
                      [0.45, 0.25, 0.10, 0.10, 0.15, 0.10],
                      [0.05, 0.10, 0.15, 0.05, 0.35, 0.35]], np.float32)
    np.testing.assert_array_equal(infer.region_labels(probs), [2, 0, 0, 0, 4, 4])
    # WT = 1 - p0: .60 .40 .45 .20 .70 .75; TC = p1 + p3: .15 .15 .35 .10 .55 .65; ET = p3
    np.testing.assert_array_equal(infer.region_labels(probs, 0.3), [2, 2, 1, 0, 4, 4])
    np.testing.assert_array_equal(infer.region_labels(probs, 0.5), [2, 0, 0, 0, 1, 1])
    batch = np.stack([probs, probs[:, ::-1]])[..., None]  # (N, K, H, W) = (2, 4, 6, 1)
    np.testing.assert_array_equal(infer.region_labels(batch, 0.3, axis=1)[:, :, 0],
                                  [[2, 2, 1, 0, 4, 4], [4, 4, 0, 1, 2, 2]])


def test_labels_by_threshold_are_those_of_the_softmax(tiny, synthetic_slices):
    backend = infer.load_backend("openvino", tiny, precision="fp32")
    probs = infer.predict_probabilities(backend, synthetic_slices)
    for t in (0.2, 0.4):
        labels = backend.predict(synthetic_slices, threshold=t)
        expected = infer.region_labels(probs, t, axis=1)
        assert (labels == expected).mean() > 0.999  # ties at the threshold may round apart
        assert (labels > 0).sum() >= (backend.predict(synthetic_slices) > 0).sum() * (t < 0.5)


def test_an_isa_cap_hides_the_flags_it_caps(monkeypatch):
    flags = frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8"})
    monkeypatch.setattr(infer, "_proc_cpuinfo", lambda: ("some CPU", flags))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert infer.has_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert infer.cpu_info() == ("some CPU", frozenset({"avx2", "fma"})) and not infer.has_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert infer.cpu_info()[1] == {"avx2", "fma", "avx512f", "avx512_vnni"}


def test_openvino_asked_for_bf16_computes_fp32_where_the_cpu_has_none(tiny, monkeypatch):
    monkeypatch.setattr(infer, "has_bf16", lambda: False)
    backend = infer.load_backend("openvino", tiny, precision="bf16")
    assert backend.precision == "fp32"
    assert backend.why == "bf16 asked for; this CPU computes the network in fp32"


@pytest.mark.parametrize("module, backend, extra", [
    ("torch", infer.TorchBackend, "torch"),
    ("onnxruntime", infer.OnnxRuntimeBackend, "onnx"),
])
def test_a_backend_whose_library_is_not_installed_says_which_extra_brings_it(
        monkeypatch, tmp_path, module, backend, extra):
    monkeypatch.setitem(sys.modules, module, None)  # what an install without it does
    with pytest.raises(io.InputError, match=rf"needs .*: pip install 'tiramisu-brats\[{extra}\]'"):
        backend(tmp_path / "model")
