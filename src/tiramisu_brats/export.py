"""The model files the ONNX backends run, made from a weights file and cached.

``model_file`` finds or makes them: ``<stem>.onnx`` beside the ``.safetensors`` (shipped with
the package), else one exported once with PyTorch (``export_onnx``) and cached (beside the
weights when that folder is writable, else in ``cache_dir()``); for int8, a model quantized
once with NNCF (``quantize``) and cached the same way (``<stem>.int8.xml``, an OpenVINO IR, for
openvino; ``<stem>.int8.onnx`` for onnxruntime). Each has a JSON beside it (``sidecar``)
giving the sha256 of the weights it came from and, for int8, the calibration slices it was
quantized on, so that a stale file is never used. With these files at hand, nothing here
imports PyTorch.

Every import of torch, openvino, onnx and nncf happens inside functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from importlib import resources
from pathlib import Path
from types import ModuleType

import numpy as np

from tiramisu_brats import io, metrics

log = logging.getLogger(__name__)

OPSET = 18


class CalibrationNeeded(io.InputError):
    """An int8 model is to be made, and no calibration slices were given to quantize on."""


def default_weights() -> Path:
    """The model shipped with the package."""
    return Path(str(resources.files("tiramisu_brats") / "weights" / "tiramisu-brats.safetensors"))


def cache_dir() -> Path:
    """``$TIRAMISU_BRATS_CACHE``, else ``$XDG_CACHE_HOME/tiramisu-brats`` (``~/.cache``)."""
    if os.environ.get("TIRAMISU_BRATS_CACHE"):
        return Path(os.environ["TIRAMISU_BRATS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiramisu-brats"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, in hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


DECISION_KEYS = ("region_threshold", "qc_spread_review", "qc_confidence_review")


def _header(weights: Path, key: str) -> str | None:
    """The metadata entry ``key`` of a safetensors file's header, None where absent;
    ``ValueError`` where the file is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as f:
            return (f.metadata() or {}).get(key)
    except Exception as err:  # safetensors raises several types for a corrupt header
        raise ValueError(f"{weights}: not a tiramisu-brats weights file ({err})") from None


def slice_divisor(weights: Path) -> int:
    """The multiple the network's slices' sides must be (its pooling), from the weights'
    header (without PyTorch); ``ValueError`` where the network does not take the four
    modalities and give the four classes that segmenting reads and writes. A config that is
    not valid at all is left to ``model.read_config`` (which says what is wrong with it)."""
    try:
        config = json.loads(_header(weights, "config") or "null")
    except json.JSONDecodeError:
        config = None
    config = config if isinstance(config, dict) else {}
    inputs, classes = config.get("in_channels", 4), config.get("num_classes", 4)
    blocks = config.get("down_blocks")
    divisor = 2 ** len(blocks) if isinstance(blocks, list) and 0 < len(blocks) < 10 else 32
    known = all(isinstance(v, int) and not isinstance(v, bool) for v in (inputs, classes))
    if known and (inputs, classes) != (len(io.MODALITIES), len(io.CLASS_TO_LABEL)):
        raise ValueError(f"{weights}: a network of {inputs} input channels and {classes} "
                         f"classes; segmenting needs {len(io.MODALITIES)} (T1, T1ce, T2, FLAIR) "
                         f"and {len(io.CLASS_TO_LABEL)} (background, necrosis, edema, "
                         "enhancing)")
    return divisor


def decision(weights: Path) -> dict[str, float]:
    """The decision rule chosen on the validation split for ``weights`` and recorded in their
    header (metadata ``decision``, a JSON object): ``region_threshold`` (how probabilities
    become labels: ``infer.region_labels``), ``qc_spread_review`` (the view spread above
    which a case is flagged for review: ``api.quality``) and ``qc_confidence_review`` (the
    mean probability of one view below which it is: ``api.confidence``). ``{}`` where none was
    recorded (the argmax and the default review thresholds then apply)."""
    try:
        return parse_decision(_header(weights, "decision") or "{}")
    except ValueError as err:
        raise ValueError(f"{weights}: {err} in the header") from None


def parse_decision(text: str) -> dict[str, float]:
    """A decision rule from its JSON ``text`` (see ``decision``); ``ValueError`` says what
    is wrong with it."""
    try:
        rule = json.loads(text)
        values = {k: float(rule[k]) for k in DECISION_KEYS if k in rule}
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"unreadable decision {text!r} ({err})") from None
    if set(rule) - set(DECISION_KEYS) or not all(0 < v < 1 for v in values.values()):
        raise ValueError(f"decision {text}: expected values in (0, 1) for "
                         f"{', '.join(DECISION_KEYS)}")
    return values


def partner(weights: Path, sha: str | None = None) -> Path | None:
    """The second model that accurate mode fuses with ``weights``: ``<stem>.partner.safetensors``
    beside them, whose header names their sha256 (``partner_of``; ``sha``, computed when not
    given). Its ``decision`` is accurate mode's rule for the two models' views fused. None
    where there is none, or (with a warning) where it was made for other weights."""
    weights = Path(weights)
    path = weights.with_name(weights.stem + ".partner.safetensors")
    if not path.is_file():
        return None
    made_for = _header(path, "partner_of")
    if made_for != (sha or file_sha256(weights)):
        log.warning("%s: made as the partner of other weights (sha256 %s), not of %s: accurate "
                    "mode runs %s alone", path, str(made_for)[:12], weights.name, weights.name)
        return None
    return path


def sidecar(path: Path) -> Path:
    """The JSON beside a made model file that says what it was made from
    (``{"weights_sha256": ..., "calibration": ...}``)."""
    return Path(path).with_name(Path(path).name + ".json")


def recorded(path: Path) -> dict:
    """What a made model file was made from, from its ``sidecar``."""
    return json.loads(sidecar(path).read_text())


def _record(path: Path, **facts: object) -> Path:
    """Write ``path``'s sidecar: after the model file, so that it marks the file complete."""
    io.atomic_write_text(sidecar(path), json.dumps(facts, sort_keys=True), overwrite=True)
    return path


def _forget(path: Path) -> None:
    """Remove ``path``'s sidecar before the file is replaced: a crash between writing the new
    file and its record then leaves a file without a record (made again, never the default),
    not the new file under the old record (e.g. its ``labels_check``)."""
    sidecar(path).unlink(missing_ok=True)


def _matches(path: Path, expected: dict[str, object]) -> bool:
    try:
        meta = recorded(path)
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable record of a model file (%s); ignoring it", path, err)
        return False
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in expected.items())


def _checked(path: Path) -> bool:
    """Whether the model file ``path`` records a check of its labels against fp32's."""
    try:
        meta = recorded(path)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("labels_check"), dict)


def export_onnx(weights: Path, path: Path) -> Path:
    """Export the weights to ONNX (opset 18, or 17 with PyTorch before 2.5; N, H and W
    dynamic), recording their sha256.

    Needs PyTorch. The network is fully convolutional, so a trace at one size with the input
    and output dims then made symbolic is exact for every size (and far faster to export than
    ``torch.export``'s symbolic shapes).
    """
    import torch

    from tiramisu_brats.model import load_model

    weights, path = Path(weights), Path(path)
    model = load_model(weights)
    side = 2 * model.config.divisor
    sample = torch.zeros(1, model.config.in_channels, side, side)
    log.info("exporting %s to %s", weights, path)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = _onnx_proto(torch, model, sample)
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, name in ((0, "n"), (2, "h"), (3, "w")):
            dims[axis].dim_param = name
    del proto.graph.value_info[:]  # intermediate shapes of the trace's size
    _forget(path)
    io.atomic_write_bytes(path, proto.SerializeToString(), overwrite=True)
    return _record(path, weights_sha256=file_sha256(weights))


# PyTorch before 2.5 has no dynamo exporter: its TorchScript exporter goes up to opset 17.
LEGACY_OPSET = 17


def _onnx_proto(torch: ModuleType, model, sample):
    """The ONNX ``ModelProto`` of ``model`` traced on ``sample``: by the dynamo exporter
    (PyTorch >= 2.5), else by the TorchScript one (opset ``LEGACY_OPSET``)."""
    import inspect

    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        return torch.onnx.export(model, (sample,), input_names=["slices"],
                                 output_names=["logits"], opset_version=OPSET, dynamo=True,
                                 verbose=False).model_proto
    import io as _io

    import onnx

    buffer = _io.BytesIO()
    torch.onnx.export(model, (sample,), buffer, input_names=["slices"],
                      output_names=["logits"], opset_version=LEGACY_OPSET)
    return onnx.load_from_string(buffer.getvalue())


def _calibration_id(calibration: np.ndarray) -> str:
    """What a model's record calls calibration slices given without a name: their shape and
    a hash of their values."""
    data = np.ascontiguousarray(calibration, np.float32)
    return f"slices:{data.shape}:{hashlib.sha256(data.tobytes()).hexdigest()[:16]}"


def require_nncf(source: Path) -> ModuleType:
    """The ``nncf`` module, or an error (about ``source``) saying how to install it."""
    try:
        import nncf
    except ImportError:
        raise io.InputError(f"{source}: int8 needs NNCF: pip install 'tiramisu-brats[int8]'") \
            from None
    return nncf


def quantize(source: Path, path: Path, calibration: np.ndarray,
             calibration_id: str | None = None, validation: np.ndarray | None = None,
             max_drop: float = 0.001) -> Path:
    """Quantize an fp32 ONNX export to int8 with NNCF post-training quantization.

    ``path`` ending in ``.xml`` gets an OpenVINO IR quantized on OpenVINO's graph (what the
    openvino backend runs: on a QDQ ONNX of the same network, OpenVINO's logits were ten times
    further from fp32), else a QDQ ONNX (for onnxruntime). ``calibration``: slices
    ``(N, C, H, W)`` float32 that look like the real input. The result records (``sidecar``)
    the weights' sha256 and the calibration: ``calibration_id``, default the slices' shape and
    hash.

    ``validation`` (IR only): slices ``(M, C, H, W)`` float32 on which the int8 labels must
    agree with fp32's: NNCF's accuracy control then keeps in floating point, one by one, the
    layers whose quantization costs most, until the Dice of the int8 labels against fp32's
    (WT, TC, ET pooled over the slices, averaged) is within ``max_drop`` of 1.
    """
    nncf = require_nncf(source)
    props = {"weights_sha256": recorded(source)["weights_sha256"],
             "calibration": calibration_id or _calibration_id(calibration)}
    items = [np.ascontiguousarray(s[None], np.float32) for s in calibration]
    log.info("quantizing %s to int8 on %d slices", source, len(items))
    if path.suffix == ".xml":
        import openvino as ov

        model = ov.Core().read_model(source)
        if validation is None:
            model = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))
        else:
            model = _quantize_keeping_labels(nncf, model, items, validation, max_drop)
            props["max_drop"] = max_drop
        _forget(path)
        io.atomic_write(path, lambda tmp: ov.save_model(model, tmp, compress_to_fp16=False),
                        overwrite=True, companions=(".bin",))
        return _record(path, **props)
    if validation is not None:
        raise ValueError(f"{path}: accuracy-controlled int8 is made as an OpenVINO IR (.xml)")
    import onnx

    model = nncf.quantize(onnx.load(str(source)), nncf.Dataset([{"slices": x} for x in items]),
                          subset_size=len(items))
    _forget(path)
    io.atomic_write_bytes(path, model.SerializeToString(), overwrite=True)
    return _record(path, **props)


def _quantize_keeping_labels(nncf, model, items: list[np.ndarray], validation: np.ndarray,
                             max_drop: float):
    """``nncf.quantize_with_accuracy_control`` of an OpenVINO model, the metric the agreement
    of the labels with those of the fp32 model on ``validation``."""
    import openvino as ov

    reference = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = reference.create_infer_request()
    data = [(np.ascontiguousarray(x[None], np.float32),
             io.CLASS_TO_LABEL[request.infer({0: x[None]})[0].argmax(1)[0]]) for x in validation]

    def agreement(compiled, samples) -> tuple[float, list[float]]:
        # Per region, summed over the slices: twice the overlap, and the two masks' sizes.
        run = compiled.create_infer_request()
        both, total, each = np.zeros(3), np.zeros(3), []
        for x, ref in samples:
            pred = io.CLASS_TO_LABEL[run.infer({0: x})[0].argmax(1)[0]]
            masks = [(metrics.region_mask(pred, r), metrics.region_mask(ref, r))
                     for r in metrics.REGIONS]
            overlap = np.array([2 * np.count_nonzero(m & e) for m, e in masks])
            sizes = np.array([np.count_nonzero(m) + np.count_nonzero(e) for m, e in masks])
            both += overlap
            total += sizes
            each.append(float(np.mean(_dice(overlap, sizes))))
        return float(np.mean(_dice(both, total))), each

    log.info("accuracy control on %d slices, max drop %g", len(data), max_drop)
    return nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(items), nncf.Dataset(data), validation_fn=agreement,
        max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(items))


def _dice(overlap: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per region, twice the overlap over the two masks' sizes; 1 where both masks are empty,
    so that an int8 model adding a region fp32 lacks scores below one that agrees."""
    return np.where(sizes > 0, overlap / np.maximum(sizes, 1), 1.0)


def model_file(weights: Path, precision: str = "fp32", backend: str = "openvino",
               calibration: np.ndarray | None = None, calibration_id: str | None = None
               ) -> Path:
    """The model file a backend runs for ``weights``: ``<stem>.onnx`` (fp32), or for int8
    ``<stem>.int8.xml`` (``backend`` openvino, an IR) or ``<stem>.int8.onnx`` (onnxruntime).

    Looked for beside the weights, then in ``cache_dir()`` (``candidates``), and used only if
    it records the weights' sha256 (and, given ``calibration`` or ``calibration_id``, that
    calibration: ``calibration_id``, default the slices' shape and hash; without either any
    int8 model of these weights will do, e.g. a shipped one made by ``api.quantize_int8``);
    else made (exported with PyTorch, quantized with NNCF on ``calibration``: without it
    ``CalibrationNeeded`` is raised) and written to ``$TIRAMISU_BRATS_CACHE`` when set, else
    beside the weights when that folder is writable, else to ``cache_dir()``.
    """
    weights = Path(weights)
    sha = file_sha256(weights)
    expected: dict[str, object] = {"weights_sha256": sha}
    if calibration is not None or calibration_id is not None:
        expected["calibration"] = calibration_id or _calibration_id(calibration)
    beside, cached = candidates(weights, precision, backend, sha)
    for path in (beside, cached):
        if path.is_file() and _matches(path, expected):
            log.info("using %s", path)
            return path
    if precision == "int8":
        require_nncf(weights)  # a missing NNCF is the first thing to fix
        if calibration is None:
            raise CalibrationNeeded(
                f"{weights}: no int8 model of these weights beside them or in {cache_dir()}, "
                "and quantizing to int8 needs calibration slices")
    target = made_file(weights, precision, backend, sha)
    if precision == "int8":
        if target == beside and _checked(beside):
            target = cached  # a checked int8 model (``api.quantize_int8``'s) is never replaced
            target.parent.mkdir(parents=True, exist_ok=True)
        return quantize(model_file(weights), target, calibration, expected["calibration"])
    try:
        import torch  # noqa: F401
    except ImportError:
        raise io.InputError(
            f"{weights}: no ONNX export of these weights beside them or in {cache_dir()}, and "
            "making one needs PyTorch: pip install 'tiramisu-brats[torch]'") from None
    return export_onnx(weights, target)


def candidates(weights: Path, precision: str = "fp32", backend: str = "openvino",
               sha: str | None = None) -> tuple[Path, Path]:
    """Where ``model_file`` looks for the model file of ``weights``: beside them, and in
    ``cache_dir()`` under their name and sha256 (``sha``, computed when not given)."""
    weights = Path(weights)
    suffix = ".onnx"
    if precision == "int8":
        suffix = ".int8.xml" if backend == "openvino" else ".int8.onnx"
    sha = sha or file_sha256(weights)
    return (weights.with_name(weights.stem + suffix),
            cache_dir() / f"{weights.stem}-{sha[:16]}{suffix}")


def made_file(weights: Path, precision: str = "fp32", backend: str = "openvino",
              sha: str | None = None) -> Path:
    """Where a model file made for ``weights`` is written (its folder made): beside them when
    that folder is writable and ``$TIRAMISU_BRATS_CACHE`` unset, else in ``cache_dir()``."""
    beside, cached = candidates(weights, precision, backend, sha)
    target = beside if _writable(Path(weights).parent) else cached
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def record_check(path: Path, check: dict) -> None:
    """Add to a made int8 model's record how its labels compared with fp32's
    (``api.quantize_int8``: ``kept``, ``cases``, ``largest_change``, ...)."""
    _record(path, **{**recorded(path), "labels_check": check})


def int8_that_keeps_labels(weights: Path, backend: str = "openvino") -> tuple[Path, dict] | None:
    """The int8 model of ``weights`` (beside them or cached) whose record says that its labels
    kept Dice within the tolerance of fp32's on every case checked, and that check; None
    where there is none."""
    sha = file_sha256(weights)
    for path in candidates(weights, "int8", backend, sha):
        if path.is_file() and _matches(path, {"weights_sha256": sha}):
            check = recorded(path).get("labels_check")
            if isinstance(check, dict) and check.get("kept") is True:
                return path, check
    return None


def _writable(folder: Path) -> bool:
    """Whether made model files may go into the weights' folder."""
    return os.access(folder, os.W_OK) and not os.environ.get("TIRAMISU_BRATS_CACHE")
