"""Run the network on a batch of slices, with one of several backends behind one interface.

A backend is a callable ``(N, C, H, W)`` float32 → logits ``(N, K, H, W)`` float32; its
``predict`` feeds it the slices of a case in batches and returns BraTS labels.

Backends: ``openvino`` (the default: fastest on CPU), ``onnxruntime`` and ``torch`` (eager; the
one for CUDA). The first two run the model file ``export.model_file`` finds or makes for the
weights (their ONNX export, or an int8 model). Precisions: ``fp32``; ``bf16`` (openvino,
torch; faster on CPUs with AVX512-BF16 or AMX: openvino's default there; on other CPUs OpenVINO
computes in fp32 and the backend says so); ``int8`` (openvino, onnxruntime), quantized on
calibration slices (openvino's default on CPUs with int8 instructions but no bf16, where an
int8 model of the weights kept the labels: ``choose_precision``). With the model files at
hand, neither ONNX backend imports PyTorch.

Every import of torch, openvino and onnxruntime happens inside functions.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from tiramisu_brats import io
from tiramisu_brats.export import (
    cache_dir,
    default_weights,
    int8_that_keeps_labels,
    model_file,
    slice_divisor,
)

log = logging.getLogger(__name__)

BACKENDS = ("openvino", "onnxruntime", "torch")
DEFAULT_BACKEND = "openvino"
PRECISIONS = ("fp32", "bf16", "int8")
SUPPORTED = {"openvino": PRECISIONS, "onnxruntime": ("fp32", "int8"), "torch": ("fp32", "bf16")}
# Each backend's precision when none is asked for; openvino's is chosen per CPU and weights
# (choose_precision): int8 where its model kept the labels and it is the faster, else bf16
# (fp32 on CPUs without it).
DEFAULT_PRECISION = {"openvino": "bf16", "onnxruntime": "fp32", "torch": "fp32"}
# Instruction sets with which OpenVINO's int8 kernels beat its fp32 and bf16 ones on this
# network: measured for avx2 and avx512_vnni (docs/benchmarks.md, "Speed" and "Speed as an
# AVX2-only CPU").
INT8_ISA = ("avx2", "avx512_vnni")
# With AMX, OpenVINO's bf16 beat its int8 instead (3.59 s against 4.80 s per case end to end,
# accurate mode 11.65 s against 12.86 s: docs/benchmarks.md, "Speed"): there bf16 is the default.
BF16_ISA = "amx_bf16"
_OV_TYPES = {"bf16": "bf16", "f32": "fp32", "f16": "fp16"}
# Whether a backend runs whole slices by default rather than each slice's brain window. PyTorch
# on the CPU keeps about 250 MB per new input shape (2.6 GB peak on a BraTS case, against 1.5 GB
# on whole slices): it is the reference and the GPU backend, not the fast CPU path.
WHOLE_SLICES = {"openvino": False, "onnxruntime": False, "torch": True}
# predict_labels(tumor_slices=True) first runs every TUMOR_STRIDE-th slice: tumor fewer slices
# thick than this, cut off from the rest, can go unseen. Then the slices up to TUMOR_REACH away
# from tumor found: postprocessing's closing (radius 1) bridges gaps of up to 2 slices, so
# tumor farther away stays cut off from what was found.
TUMOR_STRIDE = 4
TUMOR_REACH = 2


def cpu_count() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# oneDNN's cap on the instruction sets it uses (ONEDNN_MAX_CPU_ISA, e.g. AVX2, to run as an
# AVX2-only CPU would): OpenVINO's kernels obey it, its choice of precision does not (with a
# bf16 hint, compiling then fails), so the flags cpu_info reports obey it too. The value's
# flags dropped, by prefix.
_ISA_CAPS = {"SSE41": ("avx", "fma", "amx"), "AVX": ("avx2", "avx512", "fma", "amx"),
             "AVX2": ("avx512", "amx"), "AVX2_VNNI": ("avx512", "amx"),
             "AVX2_VNNI_2": ("avx512", "amx"), "AVX512_CORE": ("avx512_vnni", "avx512_bf16", "amx"),
             "AVX512_CORE_VNNI": ("avx512_bf16", "amx"), "AVX512_CORE_BF16": ("amx",)}


def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and instruction-set flags, from /proc/cpuinfo (``("", {})``
    where there is none to read), less those that ``ONEDNN_MAX_CPU_ISA`` caps."""
    name, flags = _proc_cpuinfo()
    dropped = _ISA_CAPS.get(os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper(), ())
    return name, frozenset(f for f in flags if not f.startswith(dropped))


def has_bf16() -> bool:
    """Whether this CPU computes in bf16 (AVX512-BF16 or AMX), as ``cpu_info`` reports it."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_info()[1])


@functools.cache
def _proc_cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "", frozenset()
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields.get("model name", ""), frozenset(fields.get("flags", "").split())


def choose_precision(name: str, weights: Path, device: str | None = None
                     ) -> tuple[str, str, Path | None]:
    """The precision backend ``name`` runs ``weights`` in when none is asked for, why, and
    for int8 the model file chosen.

    openvino on the CPU: bf16 where the CPU has ``BF16_ISA``; else int8 where it has one of
    ``INT8_ISA`` and an int8 model of the weights records that it kept every checked case's
    Dice within the tolerance of fp32 (``export.int8_that_keeps_labels``, made by
    ``api.quantize_int8``); else bf16, which OpenVINO computes in fp32 on CPUs without bf16.
    Other backends: ``DEFAULT_PRECISION``."""
    if name != "openvino" or (device or "cpu") != "cpu":
        return DEFAULT_PRECISION[name], f"the {name} backend's default", None
    flags = cpu_info()[1]
    if BF16_ISA in flags:
        return "bf16", (f"bf16: the CPU has {BF16_ISA}, with which OpenVINO computes this "
                        "network faster in bf16 than in int8"), None
    fast = [f for f in INT8_ISA if f in flags]
    found = int8_that_keeps_labels(weights) if fast else None
    if found is not None:
        path, check = found
        return "int8", (f"int8: the CPU has {', '.join(fast)}, and this int8 model kept Dice "
                        f"within {check.get('tolerance')} of fp32 on {check.get('cases')} "
                        f"labelled cases (largest change {check.get('largest_change')})"), path
    why = ("no int8 model of these weights that keeps the labels" if fast else
           f"the CPU has none of {', '.join(INT8_ISA)} for int8")
    if has_bf16():
        return "bf16", f"bf16: {why}; the CPU computes in bf16", None
    return "bf16", f"fp32: {why}; the CPU does not compute in bf16", None


class Backend:
    """A loaded network: ``backend(batch)`` → logits; ``predict(slices)`` and
    ``label_batches(batches)`` → labels. ``why``: why it runs in its ``precision``."""

    name = "?"
    device = "cpu"
    precision = "fp32"
    why = "asked for"
    batch_size = 8
    channels = 4  # the slices' channels: T1, T1ce, T2, FLAIR
    divisor = 32  # the slices' sides are multiples of it (the network's pooling)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def logit_batches(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Logits ``(N, K, H, W)`` float32 of each batch ``(N, C, H, W)`` float32 in turn;
        batches may differ in size and shape."""
        for batch in batches:
            yield self(np.ascontiguousarray(batch, dtype=np.float32))

    def label_batches(self, batches: Iterable[np.ndarray], threshold: float | None = None,
                      whole_tumor: bool = False) -> Iterator:
        """Labels ``(N, H, W)`` uint8 in 0/1/2/4 of each batch, as ``logit_batches``, by
        ``region_labels(threshold)``; with ``whole_tumor`` each a pair (labels, the whole
        tumor's probability ``(N, H, W)`` float32)."""
        return map(_labeller(threshold, whole_tumor), self.logit_batches(batches))

    def predict(self, slices: np.ndarray, batch_size: int | None = None,
                on_batch: Callable[[int], None] | None = None,
                threshold: float | None = None) -> np.ndarray:
        """Labels (Z', H, W) uint8 in 0/1/2/4 for slices (Z', C, H, W) float32, by
        ``region_labels(threshold)``, ``batch_size`` slices at a time (default: the backend's
        ``batch_size``)."""
        return predict_labels(self, slices, batch_size, on_batch, threshold=threshold)


class TorchBackend(Backend):
    """PyTorch eager; bf16 autocast with ``precision="bf16"``, the default on a CUDA device
    (``precision=None``: bf16 on CUDA, fp32 on the CPU; an explicit fp32 is honoured)."""

    name = "torch"

    def __init__(self, weights: Path, device: str | None = None, threads: int | None = None,
                 precision: str | None = None) -> None:
        try:
            import torch
        except ImportError:
            raise io.InputError("the torch backend needs PyTorch: pip install "
                                "'tiramisu-brats[torch]'") from None

        from tiramisu_brats.model import load_model

        self._torch = torch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(threads or cpu_count())
        self.device = device
        self.precision = precision or ("bf16" if device != "cpu" else "fp32")
        self.model = load_model(weights, device=device)
        if device != "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            with torch.autocast(x.device.type, dtype=torch.bfloat16,
                                enabled=self.precision == "bf16"):
                return self.model(x).float().cpu().numpy()


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU (or CUDA where its GPU build is installed)."""

    name = "onnxruntime"
    batch_size = 4  # 8 is as fast and takes 1.8x the memory (1.5 GB in all)

    def __init__(self, model: Path, device: str | None = None, threads: int | None = None,
                 precision: str = "fp32") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise io.InputError("the onnxruntime backend needs ONNX Runtime: pip install "
                                "'tiramisu-brats[onnx]'") from None

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_count()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.device = device or "cpu"
        providers = ["CPUExecutionProvider"]
        if self.device != "cpu":
            providers.insert(0, "CUDAExecutionProvider")
        self.precision = precision
        self.session = ort.InferenceSession(str(model), options, providers=providers)
        if self.session.get_providers()[0] == "CPUExecutionProvider" and self.device != "cpu":
            log.warning("ONNX Runtime has no %s here (its GPU build is not installed): it runs "
                        "on the CPU", self.device)
            self.device = "cpu"  # what the JSON reports is where it ran
        self._input = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: batch})[0]


class OpenVINOBackend(Backend):
    """OpenVINO; ``label_batches`` keeps one batch in flight per infer request.

    Compiled models are cached in ``cache_dir()/openvino``. ``fp32`` forces f32 arithmetic
    (OpenVINO would otherwise pick bf16 on CPUs with AVX512-BF16 or AMX); ``bf16`` asks for it,
    and so does ``int8`` for the layers its model keeps in floating point (faster; the labels
    are checked by ``api.quantize_int8`` on the CPU it runs on, and in docs/benchmarks.md).
    """

    name = "openvino"
    # One slice per request, a request per stream: on the default path (bf16, brain windows)
    # 4 % faster than 2 and 14 % faster than 4 (one BraTS case on 2 cores), in less memory.
    batch_size = 1
    HINT = "THROUGHPUT"  # one stream per core beats LATENCY's one stream on all cores

    def __init__(self, model: Path, device: str | None = None, threads: int | None = None,
                 precision: str = "fp32", hint: str | None = None) -> None:
        import openvino as ov

        self.device = device or "cpu"
        self.precision = precision
        core = ov.Core()
        blobs = cache_dir() / "openvino"
        try:
            blobs.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(blobs)})
        except OSError as err:
            log.info("no OpenVINO model cache (%s)", err)
        config = {"PERFORMANCE_HINT": hint or self.HINT,
                  "INFERENCE_PRECISION_HINT": "bf16" if precision in ("bf16", "int8") and (
                      self.device != "cpu" or has_bf16()) else "f32"}
        if self.device == "cpu":
            config["INFERENCE_NUM_THREADS"] = threads or cpu_count()
        self.compiled = core.compile_model(str(model), self.device.upper(), config)
        if precision != "int8":  # what OpenVINO computes in: bf16 only where the CPU has it
            used = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
            self.precision = _OV_TYPES.get(used, used)
        n = self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        # Plain requests, not AsyncInferQueue: exiting right after dropping a queue can abort
        # the process ("terminate called without an active exception", OpenVINO 2026.4).
        self.requests = [self.compiled.create_infer_request() for _ in range(n)]
        log.info("openvino %s %s: %s streams, %s threads, %d requests", model.name, precision,
                 self.compiled.get_property("NUM_STREAMS"),
                 self.compiled.get_property("INFERENCE_NUM_THREADS"), n)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.requests[0].infer({0: batch})[0].copy()

    def label_batches(self, batches: Iterable[np.ndarray], threshold: float | None = None,
                      whole_tumor: bool = False) -> Iterator:
        return self._pipelined(batches, _labeller(threshold, whole_tumor))

    def logit_batches(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        return self._pipelined(batches, np.copy)

    def _pipelined(self, batches: Iterable[np.ndarray],
                   take: Callable[[np.ndarray], np.ndarray]) -> Iterator[np.ndarray]:
        # One batch in flight per infer request (one per stream): the cores stay busy also
        # across batches of different shapes. ``take`` reads a request's output before the
        # request is reused.
        in_flight: deque = deque()

        def collect() -> np.ndarray:
            request, _ = in_flight.popleft()  # the batch rides along: its memory is shared
            request.wait()
            return take(request.get_output_tensor(0).data)

        try:
            for j, batch in enumerate(batches):
                if len(in_flight) == len(self.requests):
                    yield collect()
                request = self.requests[j % len(self.requests)]
                batch = np.ascontiguousarray(batch, dtype=np.float32)
                request.start_async({0: batch}, share_inputs=True)
                in_flight.append((request, batch))
            while in_flight:
                yield collect()
        finally:
            for request, _ in in_flight:
                request.wait()


def load_backend(name: str = DEFAULT_BACKEND, weights: Path | None = None, *,
                 threads: int | None = None, precision: str | None = None,
                 device: str | None = None, calibration: np.ndarray | None = None,
                 calibration_id: str | None = None) -> Backend:
    """Build the backend ``name`` (one of ``BACKENDS``) for the weights file ``weights``.

    ``precision``: ``fp32``, ``bf16`` (openvino, torch) or ``int8`` (openvino, onnxruntime;
    the int8 model ``export.model_file`` finds or quantizes on the ``calibration`` slices,
    recorded as ``calibration_id``: without them any int8 model of these weights, and
    ``export.CalibrationNeeded`` where there is none); default ``choose_precision``.
    The backend's ``precision`` says what it computes in. ``threads``: CPU threads, default
    all cores.
    """
    weights = Path(weights) if weights is not None else default_weights()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if precision is not None and precision not in SUPPORTED[name]:
        raise ValueError(f"precision {precision!r} is not available with the {name} backend "
                         f"(choose one of {', '.join(SUPPORTED[name])})")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: model weights not found")
    divisor = slice_divisor(weights)  # before any export: a network segment can use
    asked, why, model = precision, "asked for", None
    if precision is None:
        precision, why, model = choose_precision(name, weights, device)
    if name == "torch":
        backend: Backend = TorchBackend(weights, device=device, threads=threads, precision=asked)
    else:
        model = model or model_file(weights, "int8" if precision == "int8" else "fp32", name,
                                    calibration, calibration_id)
        cls = OpenVINOBackend if name == "openvino" else OnnxRuntimeBackend
        backend = cls(model, device=device, threads=threads, precision=precision)
    if asked is not None and backend.precision != asked:  # bf16 on a CPU without it
        why = f"{asked} asked for; this CPU computes the network in {backend.precision}"
        log.warning("%s", why)
    backend.why, backend.divisor = why, divisor
    return backend


def predict_labels(
    backend: Backend, slices: np.ndarray, batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    windows: Sequence[tuple[slice, slice] | None] | None = None, *, tumor_slices: bool = False,
    stats: dict[str, int] | None = None, threshold: float | None = None,
    whole_tumor: np.ndarray | None = None,
) -> np.ndarray:
    """Labels (Z', H, W) uint8 in 0/1/2/4 for slices (Z', C, H, W) float32, by
    ``region_labels(threshold)`` (``batch_size`` default: the backend's). ``whole_tumor``,
    if given, a (Z', H, W) float32 array, gets the whole tumor's probability
    (1 - p(background)) where the network ran; elsewhere it is left as it is.

    ``windows`` (one per slice, as ``preprocess.brain_windows``): run the network on these parts
    of the slices only, slices of one window size batched together; 0 outside them.

    ``tumor_slices``: run every ``TUMOR_STRIDE``-th slice, then, pass after pass, the slices
    up to ``TUMOR_REACH`` away from one in which the network found tumor, until every run of
    tumor slices has that many tumor-free slices run (or the volume's end) on each side. The
    other slices are left 0. What can be lost is tumor the network would find only in slices
    that lie wholly between two tumor-free coarse slices and more than ``TUMOR_REACH`` slices
    from all tumor found: a component fewer than ``TUMOR_STRIDE`` slices thick that even
    ``postprocess``'s closing leaves cut off from the rest, which it then drops unless it were
    a tenth the size of the main tumor (for a glioma, a pancake 3 mm thick). On the 27
    labelled BraTS cases this runs 75 % of the brain slices and gives the same postprocessed
    labels (docs/benchmarks.md).

    ``stats``, if given, gets ``run``: how many slices went through the network.
    """
    _check_slices(backend, slices, windows)
    out = np.zeros((slices.shape[0], *slices.shape[2:]), np.uint8)
    _passes(len(slices), tumor_slices, on_batch, {} if stats is None else stats,
            lambda todo: _run(backend, slices, todo, windows, out, batch_size, on_batch,
                              threshold=threshold, whole_tumor=whole_tumor),
            lambda k: out[k].any())
    return out


def _passes(n: int, tumor_slices: bool, on_batch: Callable[[int], None] | None, stats: dict,
            run: Callable[[list[int]], int], has_tumor: Callable[[int], bool]) -> None:
    """Run ``n`` slices by ``run(indices)`` (returns how many it ran): all of them, or with
    ``tumor_slices`` pass after pass as ``predict_labels`` says, ``has_tumor(k)`` telling
    whether slice k came out with tumor. Sets ``stats["run"]``."""
    todo = list(range(0, n, TUMOR_STRIDE)) if tumor_slices else list(range(n))
    done = np.zeros(n, bool)
    stats["run"] = 0
    while todo:
        stats["run"] += run(todo)
        done[todo] = True
        if not tumor_slices:
            break
        found = [k for k in todo if has_tumor(k)]
        todo = sorted({j for k in found for j in range(k - TUMOR_REACH, k + TUMOR_REACH + 1)
                       if 0 <= j < n and not done[j]})
    if on_batch and n - done.sum():
        on_batch(int(n - done.sum()))
    if tumor_slices:
        log.info("tumor slices: %d of %d slices run", stats["run"], n)


def predict_probabilities(
    backend: Backend, slices: np.ndarray, batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    windows: Sequence[tuple[slice, slice] | None] | None = None, *, tumor_slices: bool = False,
    stats: dict[str, int] | None = None, threshold: float | None = None,
) -> np.ndarray:
    """Softmax probabilities ``(Z', K, H, W)`` float32 of every slice of ``(Z', C, H, W)``;
    with ``windows`` (as in ``predict_labels``) the network runs inside them only and the
    rest is background with probability 1. ``tumor_slices``, ``stats``: as in
    ``predict_labels``, tumor by ``region_labels(threshold)``; the slices not run are
    background with probability 1."""
    _check_slices(backend, slices, windows)
    out = np.zeros((slices.shape[0], len(io.CLASS_TO_LABEL), *slices.shape[2:]), np.float32)
    out[:, 0] = 1
    _passes(len(slices), tumor_slices, on_batch, {} if stats is None else stats,
            lambda todo: _run(backend, slices, todo, windows, out, batch_size, on_batch,
                              softmax=True),
            lambda k: region_labels(out[k], threshold).any())
    return out


def _check_slices(backend: Backend, slices: np.ndarray,
                  windows: Sequence[tuple[slice, slice] | None] | None) -> None:
    """Refuse slices the network cannot take, before any runs (the ONNX backends would fail
    deep inside the graph)."""
    d, channels = backend.divisor, backend.channels
    if np.ndim(slices) != 4 or slices.shape[1] != channels or slices.shape[2] % d or \
            slices.shape[3] % d:
        raise ValueError(f"expected slices (N, {channels}, H, W) with H and W multiples of {d}, "
                         f"got shape {np.shape(slices)}")
    if windows is not None and len(windows) != len(slices):
        raise ValueError(f"{len(windows)} windows for {len(slices)} slices")


def region_labels(probs: np.ndarray, threshold: float | None = None, axis: int = 0
                  ) -> np.ndarray:
    """BraTS labels uint8 in 0/1/2/4 from softmax probabilities (or, with ``threshold``
    None, any scores) of the classes background, necrosis, edema, enhancing along ``axis``.

    ``threshold`` None: the argmax. Else the regions' probabilities, nested as the regions are:
    4 where P(ET) = p_enh > ``threshold``, else 1 where P(TC) = p_nec + p_enh > it, else 2
    where P(WT) = 1 - p_bg > it, else 0. Below 0.5 this finds more tumor than the argmax
    (which needs one class above all others): what the weights' ``decision`` chose on the
    validation split (docs/model-card.md)."""
    if threshold is None:
        return io.CLASS_TO_LABEL[probs.argmax(axis)]
    bg, nec, _, enh = np.moveaxis(probs, axis, 0)
    labels = np.zeros(bg.shape, np.uint8)
    labels[1 - bg > threshold] = 2
    labels[nec + enh > threshold] = 1
    labels[enh > threshold] = 4
    return labels


def _labeller(threshold: float | None, whole_tumor: bool = False) -> Callable:
    """Logits ``(N, K, H, W)`` → labels ``(N, H, W)`` by ``region_labels(threshold)``; with
    ``whole_tumor`` the pair (labels, 1 - p(background) ``(N, H, W)`` float32)."""
    if whole_tumor:
        def labels_and_whole_tumor(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            probs = _softmax(logits)
            return region_labels(probs, threshold, axis=1), 1 - probs[:, 0]
        return labels_and_whole_tumor
    if threshold is None:  # the argmax of the logits is that of the probabilities
        return lambda logits: io.CLASS_TO_LABEL[logits.argmax(1)]
    return lambda logits: region_labels(_softmax(logits), threshold, axis=1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 of ``(N, K, H, W)``, in float32."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


def _run(
    backend: Backend, slices: np.ndarray, indices: Sequence[int],
    windows: Sequence[tuple[slice, slice] | None] | None, out: np.ndarray,
    batch_size: int | None, on_batch: Callable[[int], None] | None, *, softmax: bool = False,
    threshold: float | None = None, whole_tumor: np.ndarray | None = None,
) -> int:
    """Write into ``out`` the labels by ``region_labels(threshold)`` (``softmax``: the
    probabilities, ``out`` (Z', K, H, W); else into ``whole_tumor`` (Z', H, W), if given, the
    whole tumor's probability) of the slices ``indices`` (in their windows, if given), slices
    of one size batched together, the largest first; returns how many were run (a slice
    without a window is not)."""
    batch_size = batch_size or backend.batch_size
    whole = (slice(None), slice(None))
    place = [whole] * len(slices) if windows is None else windows
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        if place[i] is None:
            if on_batch:
                on_batch(1)
            continue
        size = slices[i, 0, place[i][0], place[i][1]].shape
        by_size.setdefault(size, []).append(i)
    sizes = sorted(by_size, key=lambda size: size[0] * size[1], reverse=True)  # whole ones first
    chunks = [by_size[size][k : k + batch_size] for size in sizes
              for k in range(0, len(by_size[size]), batch_size)]
    batches = (np.stack([slices[i, :, place[i][0], place[i][1]] for i in chunk])
               for chunk in chunks)
    results = (map(_softmax, backend.logit_batches(batches)) if softmax
               else backend.label_batches(batches, threshold, whole_tumor is not None))
    for chunk, values in zip(chunks, results, strict=True):
        if whole_tumor is not None and not softmax:
            values, probs = values
            for i, p in zip(chunk, probs, strict=True):
                whole_tumor[i, place[i][0], place[i][1]] = p
        for i, value in zip(chunk, values, strict=True):
            out[i, ..., place[i][0], place[i][1]] = value
        if on_batch:
            on_batch(len(chunk))
    return sum(len(chunk) for chunk in chunks)
