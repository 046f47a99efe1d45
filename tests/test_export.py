"""Model files: the ONNX export and its cache, the records of made files, int8 calibration."""

from __future__ import annotations

import importlib.util
import json
import shutil
import types

import numpy as np
import pytest

from tiramisu_brats import export, infer, io

pytestmark = pytest.mark.usefixtures("user_cache")
needs_nncf = pytest.mark.skipif(importlib.util.find_spec("nncf") is None,
                                reason="nncf not installed (pip install 'tiramisu-brats[int8]')")


def test_export_is_cached_beside_the_weights(tmp_path, monkeypatch, random_weights):
    weights = random_weights(tmp_path)
    path = export.model_file(weights)
    assert path == tmp_path / "tiny.onnx"
    assert export.recorded(path) == {"weights_sha256": export.file_sha256(weights)}
    mtime = path.stat().st_mtime_ns

    def no_export(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_onnx", no_export)
    for name in ("openvino", "onnxruntime"):
        infer.load_backend(name, weights)
    assert path.stat().st_mtime_ns == mtime


def test_stale_export_is_replaced(tmp_path, tiny, random_weights):
    weights = shutil.copy(tiny, tmp_path / "tiny.safetensors")
    shutil.copy(tiny.with_suffix(".onnx"), tmp_path / "tiny.onnx")
    shutil.copy(export.sidecar(tiny.with_suffix(".onnx")), export.sidecar(tmp_path / "tiny.onnx"))
    assert export.model_file(weights) == tmp_path / "tiny.onnx"  # same weights: reused
    random_weights(tmp_path, seed=1)  # retrained: the export beside is stale
    path = export.model_file(weights)
    assert export.recorded(path) == {"weights_sha256": export.file_sha256(weights)}


def test_cache_dir_when_weights_folder_is_not_writable(tmp_path, tiny, monkeypatch,
                                                      random_weights):
    monkeypatch.setattr(export, "_writable", lambda folder: False)
    path = export.model_file(tiny)  # the export beside is found first
    assert path == tiny.with_suffix(".onnx")
    weights = random_weights(tmp_path, seed=2)
    path = export.model_file(weights)
    assert path.parent == export.cache_dir() and path.name.startswith("tiny-")
    assert not (tmp_path / "tiny.onnx").exists()


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert export.cache_dir() == tmp_path / "xdg" / "tiramisu-brats"
    monkeypatch.setenv("TIRAMISU_BRATS_CACHE", str(tmp_path / "mine"))
    assert export.cache_dir() == tmp_path / "mine"


def test_export_has_dynamic_shapes_and_a_record_of_its_weights(tiny):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(tiny.with_suffix(".onnx")))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["n", 4, "h", "w"]
    assert export.recorded(tiny.with_suffix(".onnx")) == {
        "weights_sha256": export.file_sha256(tiny)}


def test_pytorch_without_the_dynamo_exporter_exports_the_same_network(tmp_path, tiny,
                                                                       monkeypatch):
    # PyTorch 2.2-2.4 (the extras allow them) have only the TorchScript exporter: as they
    # would, call it without a dynamo argument.
    import inspect

    import onnx
    import onnxruntime as ort
    import torch

    from tiramisu_brats.model import load_model

    real = torch.onnx.export
    assert "dynamo" in inspect.signature(real).parameters  # this PyTorch: the dynamo path

    def torchscript_only(model, args, f, *, input_names, output_names, opset_version):
        return real(model, args, f, input_names=input_names, output_names=output_names,
                    opset_version=opset_version, dynamo=False)

    monkeypatch.setattr(torch.onnx, "export", torchscript_only)
    path = export.export_onnx(tiny, tmp_path / "legacy.onnx")
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == export.LEGACY_OPSET
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["n", 4, "h", "w"]
    x = np.random.default_rng(0).standard_normal((2, 4, 96, 64)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = load_model(tiny)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"slices": x})[0], expected, atol=1e-4)


def test_a_model_file_without_its_record_is_made_again(tmp_path, tiny):
    weights = shutil.copy(tiny, tmp_path / "tiny.safetensors")
    shutil.copy(tiny.with_suffix(".onnx"), tmp_path / "tiny.onnx")  # no sidecar: unknown
    before = (tmp_path / "tiny.onnx").stat().st_mtime_ns
    assert export.model_file(weights) == tmp_path / "tiny.onnx"
    assert (tmp_path / "tiny.onnx").stat().st_mtime_ns != before
    assert export.recorded(tmp_path / "tiny.onnx")["weights_sha256"] == export.file_sha256(tiny)
    export.sidecar(tmp_path / "tiny.onnx").write_text("not json")
    assert export.model_file(weights) == tmp_path / "tiny.onnx"  # unreadable record: made again
    assert export.recorded(tmp_path / "tiny.onnx")["weights_sha256"] == export.file_sha256(tiny)


def test_the_shipped_export_belongs_to_the_shipped_weights():
    weights = export.default_weights()
    assert export.recorded(weights.with_suffix(".onnx")) == {
        "weights_sha256": export.file_sha256(weights)}


@needs_nncf
@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_int8_without_calibration_or_an_int8_model_is_a_clear_error(tmp_path, tiny, backend):
    weights = shutil.copy(tiny, tmp_path / "tiny.safetensors")
    with pytest.raises(export.CalibrationNeeded, match="quantizing to int8 needs calibration"):
        export.model_file(weights, "int8", backend)
    with pytest.raises(export.CalibrationNeeded):
        infer.load_backend(backend, weights, precision="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]  # nothing made
    with pytest.raises(export.CalibrationNeeded):  # a calibration named: only that one will do
        export.model_file(weights, "int8", backend, calibration_id="mine")


@needs_nncf
@pytest.mark.slow
def test_the_segmenter_quantizes_on_synthetic_slices_only_where_no_int8_model_exists(
        tmp_path, tiny, monkeypatch):
    from tiramisu_brats import synthetic
    from tiramisu_brats.api import Segmenter

    weights = shutil.copy(tiny, tmp_path / "tiny.safetensors")
    shutil.copy(tiny.with_suffix(".onnx"), tmp_path / "tiny.onnx")
    shutil.copy(export.sidecar(tiny.with_suffix(".onnx")), export.sidecar(tmp_path / "tiny.onnx"))
    slices = np.random.default_rng(0).standard_normal((4, 4, 64, 64)).astype(np.float32)
    monkeypatch.setattr(synthetic, "calibration_slices", lambda: slices)  # the real: seconds
    made_now = Segmenter(weights, precision="int8").backend
    assert "quantized on synthetic slices, its labels not checked" in made_now.why
    assert export.recorded(tmp_path / "tiny.int8.xml") == {
        "weights_sha256": export.file_sha256(weights),
        "calibration": synthetic.SYNTHETIC_CALIBRATION}

    def no_slices():
        raise AssertionError("calibration slices made again")

    monkeypatch.setattr(synthetic, "calibration_slices", no_slices)
    # Any int8 model of these weights will do, e.g. one made from given slices.
    export.quantize(tmp_path / "tiny.onnx", tmp_path / "tiny.int8.xml", slices[:2])
    made = export.recorded(tmp_path / "tiny.int8.xml")["calibration"]
    assert made.startswith("slices:(2, 4, 64, 64):")
    found = Segmenter(weights, precision="int8").backend
    assert (found.precision, found.why) == ("int8", "asked for")
    assert export.recorded(tmp_path / "tiny.int8.xml")["calibration"] == made


def test_decision_read_from_the_header(tmp_path, random_weights):
    from safetensors.numpy import load_file, save_file

    weights = random_weights(tmp_path)
    assert export.decision(weights) == {}
    from tiramisu_brats.model import read_config

    _, header = read_config(weights)
    tensors = load_file(weights)
    for text, expected in (('{"region_threshold": 0.3, "qc_spread_review": 0.098}',
                            {"region_threshold": 0.3, "qc_spread_review": 0.098}),
                           ('{"region_threshold": "0.25"}', {"region_threshold": 0.25})):
        save_file(tensors, str(weights), metadata={**header, "decision": text})
        assert export.decision(weights) == expected
    for bad in ('{"region_threshold": 1.5}', '{"threshold": 0.3}', "not json",
                '{"region_threshold": "high"}'):
        save_file(tensors, str(weights), metadata={**header, "decision": bad})
        with pytest.raises(ValueError, match="decision"):
            export.decision(weights)


def test_the_partner_is_found_beside_the_weights_only_when_made_for_them(
        tmp_path, random_weights, write_partner, caplog):
    weights = random_weights(tmp_path)
    assert export.partner(weights) is None
    path = write_partner(weights)
    assert path.name == "tiny.partner.safetensors"
    assert export.partner(weights) == path
    assert export.partner(weights, export.file_sha256(weights)) == path
    write_partner(weights, made_for="0" * 64)
    with caplog.at_level("WARNING"):
        assert export.partner(weights) is None
    assert "partner of other weights (sha256 000000000000)" in caplog.text


def test_the_shipped_weights_have_their_partner_with_accurate_modes_rule():
    # New shipped weights need their partner re-made (scripts/package_weights.py --partner-of),
    # else accurate mode would fall back to the weights alone, with a warning only.
    found = export.partner(export.default_weights())
    assert found is not None and found.with_suffix(".onnx").is_file()
    assert set(export.decision(found)) == {"region_threshold", "qc_spread_review"}


def test_an_int8_models_check_goes_into_its_record_and_names_it_the_one_that_keeps_labels(
        tmp_path, tiny):
    weights = shutil.copy(tiny, tmp_path / "tiny.safetensors")
    path = tmp_path / "tiny.int8.xml"
    path.write_text("<net/>")
    sha = export.file_sha256(weights)
    export.sidecar(path).write_text(json.dumps({"weights_sha256": sha, "calibration": "mine"}))
    assert export.int8_that_keeps_labels(weights) is None  # never checked
    check = {"kept": True, "cases": 3, "largest_change": 0.002, "tolerance": 0.01}
    export.record_check(path, check)
    assert export.recorded(path) == {"weights_sha256": sha, "calibration": "mine",
                                     "labels_check": check}
    assert export.int8_that_keeps_labels(weights) == (path, check)
    assert export.model_file(weights, "int8", calibration_id="mine") == path
    with pytest.raises(export.CalibrationNeeded):  # another calibration asked for: none here
        export.model_file(weights, "int8", calibration_id="other")
    export.record_check(path, {**check, "kept": False})
    assert export.int8_that_keeps_labels(weights) is None


def test_another_calibration_never_replaces_a_checked_int8_model_beside_the_weights(
        tmp_path, tiny, monkeypatch):
    weights = shutil.copy(tiny, tmp_path / "tiny.safetensors")
    path = tmp_path / "tiny.int8.xml"
    path.write_text("<net/>")
    check = {"kept": True, "cases": 3, "largest_change": 0.002, "tolerance": 0.01}
    export.sidecar(path).write_text(json.dumps({
        "weights_sha256": export.file_sha256(weights), "calibration": "mine",
        "labels_check": check}))
    made = []
    monkeypatch.setattr(export, "require_nncf", lambda source: None)
    monkeypatch.setattr(export, "quantize", lambda source, target, *a: made.append(target)
                        or target)
    monkeypatch.setenv("TIRAMISU_BRATS_CACHE", "")  # the weights' folder is writable
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    other = export.model_file(weights, "int8", calibration=np.zeros((2, 4, 8, 8), np.float32))
    assert made == [other] and other.parent == tmp_path / "xdg" / "tiramisu-brats"
    assert path.read_text() == "<net/>" and export.int8_that_keeps_labels(weights) == (path,
                                                                                      check)


def test_a_corrupt_partner_or_weights_header_is_a_clear_error(tmp_path, tiny):
    weights = shutil.copy(tiny, tmp_path / "m.safetensors")
    (tmp_path / "m.partner.safetensors").write_bytes(b"\x01" * 1000)
    with pytest.raises(ValueError, match=r"m\.partner\.safetensors: not a tiramisu-brats "
                                         r"weights file"):
        export.partner(weights)


def test_the_shipped_int8_model_belongs_to_the_shipped_weights_and_kept_their_labels():
    weights = export.default_weights()
    found = export.int8_that_keeps_labels(weights)
    assert found is not None, "no int8 model beside the shipped weights whose record says kept"
    path, check = found
    assert path == weights.with_name("tiramisu-brats.int8.xml")
    assert path.with_suffix(".bin").is_file()
    assert check["cases"] == 27 and check["largest_change"] <= check["tolerance"] == 0.01
    assert export.recorded(path)["calibration"].startswith("cases:20:")


class _FakeNNCF:
    """Enough of ``nncf`` to reach what ``export`` gives it, with no quantization done."""

    DropType = types.SimpleNamespace(ABSOLUTE="absolute")
    Dataset = staticmethod(list)
    quantize = staticmethod(lambda model, *args, **kwargs: model)

    def __init__(self):
        self.validation_fn = None

    def quantize_with_accuracy_control(self, model, *args, validation_fn, **kwargs):
        self.validation_fn = validation_fn
        return model


class _Labels:
    """A compiled model whose logits give ``labels`` (BraTS labels of one slice)."""

    def __init__(self, labels: np.ndarray):
        classes = io.LABEL_TO_CLASS[labels]
        self.logits = np.stack([(classes == k) * 10.0 for k in range(4)])[None]

    def create_infer_request(self):
        return types.SimpleNamespace(infer=lambda inputs: [self.logits])


def test_accuracy_control_scores_a_region_empty_in_both_label_maps_as_agreeing(tiny):
    import openvino as ov

    nncf = _FakeNNCF()
    validation = np.zeros((1, 4, 16, 16), np.float32)
    export._quantize_keeping_labels(nncf, ov.Core().read_model(tiny.with_suffix(".onnx")),
                                    [], validation, 0.001)
    fp32 = np.zeros((16, 16), np.uint8)
    fp32[4:12, 4:12] = 2  # edema only: TC and ET empty
    false_et = fp32.copy()
    false_et[5, 5] = 4  # int8 adds enhancing tumor (and so tumor core)
    samples = [(validation[:1], fp32)]
    assert nncf.validation_fn(_Labels(fp32), samples) == (1.0, [1.0])
    pooled, each = nncf.validation_fn(_Labels(false_et), samples)
    wt = 2 * 64 / 128  # whole tumor unchanged; TC and ET: 0 of 1 voxel
    assert pooled == pytest.approx(wt / 3) and each == [pytest.approx(wt / 3)]


@pytest.mark.parametrize("suffix", [".int8.xml", ".int8.onnx"])
def test_a_crash_while_replacing_an_int8_model_leaves_no_record_naming_it_checked(
        tmp_path, tiny, monkeypatch, suffix):
    if suffix == ".int8.onnx":
        pytest.importorskip("onnx")
    weights = shutil.copy(tiny, tmp_path / "tiny.safetensors")
    source = shutil.copy(tiny.with_suffix(".onnx"), tmp_path / "tiny.onnx")
    shutil.copy(export.sidecar(tiny.with_suffix(".onnx")), export.sidecar(source))
    path = tmp_path / f"tiny{suffix}"
    path.write_text("old")
    path.with_suffix(".bin").write_text("old")
    export._record(path, weights_sha256=export.file_sha256(weights), calibration="old",
                   labels_check={"kept": True})
    backend = "openvino" if suffix == ".int8.xml" else "onnxruntime"
    assert export.int8_that_keeps_labels(weights, backend) is not None

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(export, "require_nncf", lambda source: _FakeNNCF())
    monkeypatch.setattr(export, "_record", killed)
    with pytest.raises(KeyboardInterrupt):
        export.quantize(source, path, np.zeros((2, 4, 32, 32), np.float32), "new")
    assert path.read_bytes() != b"old"  # the new model is in place...
    assert not export.sidecar(path).exists()  # ...with no record: never the default
    assert export.int8_that_keeps_labels(weights, backend) is None
