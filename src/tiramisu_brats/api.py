"""The few calls users make: read a case, segment it, evaluate segmentations.

>>> from tiramisu_brats import api
>>> case = api.read_case("BraTS2021_00006/")            # (4, X, Y, Z) float32 + affine
>>> seg = api.segment(case.image)                        # labels (X, Y, Z) uint8, 0/1/2/4
>>> rows = api.evaluate("predictions/", "BraTS2021/", "report/")
>>> run = api.segment_cohort("BraTS2021/", "predictions/")  # every case; failures listed

The CLI is a thin layer over these.
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import logging
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tiramisu_brats import io
from tiramisu_brats.export import CalibrationNeeded, decision, default_weights, file_sha256
from tiramisu_brats.export import partner as find_partner
from tiramisu_brats.infer import (
    WHOLE_SLICES,
    load_backend,
    predict_labels,
    predict_probabilities,
    region_labels,
)
from tiramisu_brats.preprocess import (
    CROP,
    MARGIN,
    OBLIQUE_WARNING_DEG,
    PLANES,
    Geometry,
    Grid,
    box_slices,
    box_window,
    brain_windows,
    extract,
    from_plane,
    network_grid,
    plane_box,
    preprocess,
    to_input,
    to_network,
    to_plane,
    uncrop,
)

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
# metrics, postprocess and report (which import scipy.ndimage, 0.2 s) are imported where they
# are used: `segment` imports this module while the reading thread reads the first case, and
# the reading thread's preprocessing imports scipy in parallel.
# The views the network sees a case in, per mode: (plane, flipped left-right). "fast" is one
# axial pass; "accurate" averages the softmax probabilities of every view.
MODES: dict[str, tuple[tuple[str, bool], ...]] = {
    "fast": (("axial", False),),
    "accurate": tuple((plane, flip) for plane in PLANES for flip in (False, True)),
}
# Accurate mode of weights that have a partner (export.partner): the three planes of each of
# the two models, (plane, flipped, model) with model 1 the partner. On the validation split
# this beat the six views of the shipped model alone (docs/model-card.md, "Accurate mode").
PARTNER_VIEWS: tuple[tuple[str, bool, int], ...] = tuple(
    (plane, False, model) for model in (0, 1) for plane in PLANES)
# With tumor slices, the first view runs its slices near tumor (as fast mode does) and the views
# after it only the box of the tumor the first view found (after postprocessing), widened by
# VIEW_MARGIN voxels each way: the slices that cross it, each on one window around the box
# (grown as brain windows are); outside the box the first view's probabilities stand. On the
# 7 validation cases a margin of 4, 8 or 16 gave the same mean Dice as every slice of every
# view (within 0.001); 4 runs the fewest slices, on the smallest windows (docs/benchmarks.md,
# "Accurate mode's tumor slices").
VIEW_MARGIN = 4


def read_case(
    folder: PathLike | None = None, *, t1: PathLike | None = None, t1ce: PathLike | None = None,
    t2: PathLike | None = None, flair: PathLike | None = None,
) -> io.Case:
    """Read a case folder (any BraTS or nnU-Net layout) or four explicit files.

    Returns an ``io.Case`` with ``image`` (4, X, Y, Z) float32 in T1, T1ce, T2, FLAIR order.
    """
    files = _explicit_files(folder, (t1, t1ce, t2, flair))
    return io.read_case(files or io.find_case_files(folder))


def _explicit_files(folder: PathLike | None, explicit: tuple) -> io.CaseFiles | None:
    """The case of the four files ``explicit`` (t1, t1ce, t2, flair) where no ``folder`` is
    given, else None; raises where both or neither are, or files are missing."""
    if folder is not None:
        if any(explicit):
            raise ValueError("give a case folder or the four modality files, not both")
        return None
    if not all(explicit):
        missing = [m for m, p in zip(io.MODALITIES, explicit) if not p]
        raise ValueError("give a case folder or all four modality files; "
                         f"missing: {', '.join(missing)}")
    return io.case_files_from_paths(*explicit)


@dataclass(frozen=True)
class Segmentation:
    """``labels`` (X, Y, Z) uint8 0/1/2/4 after postprocessing (or raw when it was off),
    ``raw`` before postprocessing (0 in slices that ``tumor_slices`` left out), seconds per
    stage, and ``slices``: how many slices hold brain and how many of them were run (one
    view: its axial slices; several: summed over the views, each counting its plane's brain
    slices, so that ``run / brain`` is the share of the views' work done).
    ``qc``: the quality score, with several views (accurate mode) from how they
    disagree (``quality``), with one from the network's confidence (``confidence``); with
    several views ``uncertainty`` (X, Y, Z) float32, the standard deviation of the whole
    tumor's probability across them (with tumor slices, 0 outside the box around the tumor
    the first view found: the other views ran only there). ``tumor_slices``: whether the
    network ran only slices near tumor (else every brain slice)."""

    labels: np.ndarray
    raw: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    slices: dict[str, int] = field(default_factory=dict)
    uncertainty: np.ndarray | None = None
    qc: dict | None = None
    tumor_slices: bool = False


@dataclass(frozen=True)
class PreparedCase:
    """A case with the network's input made from it: ``image`` (4, X', Y', Z'), the case's
    dtype (a file's integer type, or float32; float32 where resampled), on the network's
    ``grid`` (``preprocess.network_grid``: the trained orientation, resampled as
    ``network_grid`` says unless ``resample`` was off), and its
    axial ``slices`` (Z', 4, H, W) float32 with their ``geometry``, as
    ``preprocess.preprocess(image, crop)``."""

    case: io.Case
    image: np.ndarray
    grid: Grid
    slices: np.ndarray
    geometry: Geometry
    crop: tuple[int, int]
    resample: bool = True


def prepare_case(case: io.Case, crop: tuple[int, int] = CROP, resample: bool = True
                 ) -> PreparedCase:
    """Bring a case onto the network's grid and preprocess it (e.g. in a reading thread, see
    ``segment_case``). ``resample=False`` keeps voxels that are not 1 mm as they are."""
    try:
        grid = network_grid(case.affine, case.shape, resample)
        image = to_network(case.image, grid)
        slices, geometry = preprocess(image, crop)
    except ValueError as err:  # the case's grid or content: name its file (the T1's affine)
        raise io.InputError(f"{case.files.images[0]}: {err}") from err
    return PreparedCase(case, image, grid, slices, geometry, crop, resample)


# QC: the spread (standard deviation across the views) of the whole tumor's probability,
# averaged inside the predicted tumor, ranked the validation cases by Dice best of the
# candidates tried (docs/model-card.md, "Quality score"); a case is flagged for review above
# QC_SPREAD_REVIEW, the threshold chosen on the validation split for argmax labels; weights
# that record another decision rule record the threshold chosen with it (export.decision).
QC_SPREAD_REVIEW = 0.048
# One view (fast mode) has no spread: its QC is the whole tumor's mean probability inside the
# predicted tumor, which ranked the validation cases by Dice WT next best (docs/model-card.md);
# a case is flagged below QC_CONFIDENCE_REVIEW, chosen on the validation split for the
# shipped weights (weights may record their own, ``qc_confidence_review``).
QC_CONFIDENCE_REVIEW = 0.916


def _qc(values: np.ndarray, labels: np.ndarray, key: str,
        judge: Callable[[float], tuple[float, bool, str]]) -> dict:
    """The QC of one case: the mean of ``values`` (X, Y, Z) inside the predicted tumor
    (``labels`` > 0) under ``key``, and the score, review flag and words ``judge`` gives it;
    no tumor found is score 0 and a review."""
    values, labels = np.asarray(values), np.asarray(labels)
    if values.shape != labels.shape:
        raise ValueError(f"the {key} map {values.shape} and the labels {labels.shape} differ "
                         "in shape")
    tumor = labels > 0
    if not tumor.any():
        return {"score": 0.0, "review": True, key: None,
                "why": "no tumor found: check that the case holds none"}
    value = float(values[tumor].mean())
    score, review, why = judge(value)
    return {"score": round(float(np.clip(score, 0, 1)), 4), "review": bool(review),
            key: round(value, 4), "why": why}


def quality(spread: np.ndarray, labels: np.ndarray, review_above: float = QC_SPREAD_REVIEW
            ) -> dict:
    """The quality score of one case from ``spread`` (X, Y, Z), the standard deviation of the
    whole-tumor probability across views, and the predicted ``labels`` (X, Y, Z).

    ``score`` in [0, 1], higher = more likely right: 1 - mean spread / (2 * ``review_above``),
    so that ``review`` (score below 0.5) is a spread above that threshold; no tumor found is
    score 0 and a review.
    """
    def judge(value: float) -> tuple[float, bool, str]:
        review = value > review_above
        where = (f", above the review threshold {review_above:g}" if review else
                 f"; review above {review_above:g}")
        return (1 - value / (2 * review_above), review,
                f"the views {'disagree' if review else 'agree'} on the whole tumor (mean spread "
                f"{value:.3f} inside it{where})")
    return _qc(spread, labels, "spread", judge)


def confidence(whole_tumor: np.ndarray, labels: np.ndarray,
               review_below: float = QC_CONFIDENCE_REVIEW) -> dict:
    """The quality score of one case seen once (one view), from ``whole_tumor`` (X, Y, Z), the
    whole tumor's probability, and the predicted ``labels`` (X, Y, Z).

    ``score`` in [0, 1], higher = more likely right: 0.5 + (mean probability inside the
    tumor - ``review_below``) / (2 * (1 - ``review_below``)), so that ``review`` (score below
    0.5) is a mean below that threshold; no tumor found is score 0 and a review.
    """
    def judge(value: float) -> tuple[float, bool, str]:
        review = value < review_below
        where = (f", below the review threshold {review_below:g}" if review else
                 f"; review below {review_below:g}")
        return (0.5 + (value - review_below) / (2 * (1 - review_below)), review,
                f"the network is {'unsure' if review else 'sure'} of the whole tumor (mean "
                f"probability {value:.3f} inside it{where})")
    return _qc(whole_tumor, labels, "confidence", judge)


def _volumes_ml(labels: np.ndarray, spacing) -> dict[str, float]:
    from tiramisu_brats.metrics import volumes_ml

    # to 0.0001 ml (a tenth of a 1 mm voxel): the JSON then shows no float noise (11.607, not
    # 11.607000000000001)
    return {key: round(value, 4) for key, value in volumes_ml(labels, spacing).items()}


def _postprocess(labels: np.ndarray) -> np.ndarray:
    """``postprocess.postprocess`` with its defaults (imported on first use)."""
    from tiramisu_brats.postprocess import postprocess as run

    return run(labels)


def _load_backend(name: str, weights: Path, options: dict):
    """``infer.load_backend``; where no int8 model of the weights exists yet, one made on
    synthetic slices."""
    try:
        return load_backend(name, weights, **options)
    except CalibrationNeeded:
        from tiramisu_brats.synthetic import SYNTHETIC_CALIBRATION, calibration_slices

        backend = load_backend(name, weights, **options, calibration=calibration_slices(),
                               calibration_id=SYNTHETIC_CALIBRATION)
        backend.why = ("int8 asked for, with no int8 model of these weights at hand: quantized "
                       "on synthetic slices, its labels not checked against fp32's (quantizing "
                       "on labelled cases checks them)")
        log.warning("%s: %s", weights.name, backend.why)
        return backend


def grid_info(grid: Grid, case_id: str = "") -> dict:
    """What the per-case JSON records of the input's grid; logs what a user should know."""
    spacing = "x".join(f"{z:g}" for z in grid.spacing)
    if grid.oblique_deg > OBLIQUE_WARNING_DEG:
        log.warning("%s: the image axes are %.1f degrees off the scanner axes; the network "
                    "sees slices tilted that much (trained on axis-aligned BraTS images)",
                    case_id, grid.oblique_deg)
    elif grid.oblique_deg > 0.5:
        log.info("%s: image axes %.1f degrees off the scanner axes", case_id, grid.oblique_deg)
    seen = grid.network_spacing()
    seen_text = "x".join(f"{z:.3g}" for z in seen)
    if grid.resampled:
        log.info("%s: voxels of %s mm resampled to %s mm for the network", case_id, spacing,
                 seen_text)
    if grid.unlike_training():
        log.warning("%s: the network sees voxels of %s mm (the input's %s mm; trained on 1 mm "
                    "images)", case_id, seen_text, spacing)
    return {"axes": "".join(grid.axes), "oblique_deg": grid.oblique_deg,
            "resampled_to_1mm": grid.resampled, "network_shape": list(grid.network_shape),
            "network_spacing_mm": [round(z, 4) for z in seen]}


class Segmenter:
    """A loaded model and backend, reused across cases."""

    def __init__(
        self, model: PathLike | None = None, backend: str = "openvino", *,
        batch_size: int | None = None, threads: int | None = None, precision: str | None = None,
        device: str | None = None, crop: tuple[int, int] = CROP, postprocess: bool = True,
        whole_slices: bool | None = None, tumor_slices: bool | None = None,
        mode: str = "fast", resample: bool = True, partner: PathLike | None = None,
    ) -> None:
        """``whole_slices``: run the network on whole slices, else on each slice's brain window
        (``preprocess.brain_windows``); default: the backend's (``infer.WHOLE_SLICES``).
        ``tumor_slices``: run only the slices near tumor (``infer.predict_labels``), which can lose
        only tumor under ``infer.TUMOR_STRIDE`` slices thick cut off from the rest (the
        postprocessed labels of the 27 labelled cases stay as they are; the raw ones do not);
        default: with ``postprocess``. ``segment_case(save_raw=True)`` runs every slice regardless,
        and so does fast mode on resampled voxels (its probabilities are brought back before
        the labels; ``model.tumor_slices`` in the JSON says which ran). ``mode``: one of ``MODES``;
        ``accurate`` averages the probabilities of every view (``views``: with a partner model, the
        three planes of each model, ``PARTNER_VIEWS``, labelled by the partner's decision), with
        ``tumor_slices`` those of the views after the first only near the tumor the first found
        (``VIEW_MARGIN``). ``partner``: the weights accurate mode fuses with the model's; default
        the partner beside them (``export.partner``), if any. ``resample``: bring images that are
        not 1 mm to 1 mm for the network, but for in-plane axes of 1 to
        ``preprocess.KEEP_IN_PLANE_MM`` mm (``segment_case``, and ``segment`` given an
        affine)."""
        _check_mode(mode)
        self.mode = mode
        self.resample = resample
        self.weights = Path(model) if model is not None else default_weights()
        options = dict(threads=threads, precision=precision, device=device)
        self.backend = _load_backend(backend, self.weights, options)
        self._sha256 = file_sha256(self.weights)  # of the weights just loaded, once per run
        # views as (plane, flipped, model): model 0 the weights, 1 their partner
        self.views = tuple((plane, flip, 0) for plane, flip in MODES[mode])
        if mode != "accurate":
            partner = None
        elif partner is None:
            partner = find_partner(self.weights, self._sha256)
        self.partner = None if partner is None else Path(partner)
        self.partner_backend = None
        if self.partner is not None:
            self.partner_backend = _load_backend(backend, self.partner, options)
            self._partner_sha256 = file_sha256(self.partner)
            self.views = PARTNER_VIEWS
        rule = decision(self.partner or self.weights)  # accurate mode's rule is the partner's
        self.threshold = rule.get("region_threshold")
        self.qc_review = rule.get("qc_spread_review", QC_SPREAD_REVIEW)
        self.qc_confidence = rule.get("qc_confidence_review", QC_CONFIDENCE_REVIEW)
        # whether the QC threshold this mode uses was chosen for these weights (their
        # decision, or the defaults, chosen for the shipped weights) or is borrowed
        key = "qc_spread_review" if len(self.views) > 1 else "qc_confidence_review"
        shipped = default_weights()
        self.qc_own = key in rule or (self.weights.resolve() == shipped.resolve()
                                      or self._sha256 == file_sha256(shipped))
        self.batch_size = batch_size
        self.crop = crop
        self.postprocess = postprocess
        if whole_slices is None:
            whole_slices = WHOLE_SLICES[backend]
        self.margin = None if whole_slices else MARGIN
        self.tumor_slices = postprocess if tumor_slices is None else tumor_slices

    def model_info(self) -> dict:
        """What the per-case JSON records about the model (and its partner, if used)."""
        extra = {} if self.partner is None else {"partner": {
            "weights": str(self.partner), "sha256": self._partner_sha256,
            "precision": self.partner_backend.precision,
            "precision_why": self.partner_backend.why}}
        return {"weights": str(self.weights), "sha256": self._sha256,
                "backend": self.backend.name, "device": self.backend.device,
                "precision": self.backend.precision, "precision_why": self.backend.why,
                "brain_window_margin": self.margin,
                "tumor_slices": self.tumor_slices, "mode": self.mode,
                "labels_by": ("argmax" if self.threshold is None else
                              f"region probabilities > {self.threshold:g}"),
                "qc_threshold_chosen_for": ("these weights" if self.qc_own else
                                            "the shipped weights (these record none)"),
                "views": [f"{plane}{' flipped' if flip else ''}{' (partner)' if model else ''}"
                          for plane, flip, model in self.views], **extra}

    def segment(
        self, image: np.ndarray, on_batch: Callable[[int], None] | None = None, *,
        all_slices: bool = False, affine: np.ndarray | None = None,
    ) -> Segmentation:
        """Segment one case: ``image`` (4, X, Y, Z) → labels (X, Y, Z) uint8 in 0/1/2/4.

        ``affine`` (4, 4), the image's voxel-to-world matrix: the image is brought to the
        orientation the model was trained in (and resampled, unless ``resample`` is off) and
        the labels back onto its grid. Without it the image is taken as it is (BraTS
        orientation, 1 mm). ``all_slices``: run every brain slice even with ``tumor_slices``
        (a complete ``raw``). NaN and Inf voxels count as 0 (with a warning), as when read
        from a file (``io.read_case``)."""
        image = np.asarray(image)  # a list, a CPU tensor
        if image.dtype.kind not in "iuf":
            raise ValueError(f"expected a real-valued image (integers or floats), got dtype "
                             f"{image.dtype}")
        if image.ndim != 4 or image.shape[0] != 4:
            raise ValueError(f"expected an image (4, X, Y, Z), got shape {image.shape}")
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            image = io.zero_nonfinite(image.copy(), "the image")  # the caller's stays as it is
        if affine is not None:
            grid = network_grid(affine, image.shape[1:], self.resample)
            return self._segment_grid(to_network(image, grid), grid, on_batch, all_slices)
        if self.mode != "fast":
            return self._segment_views(image, on_batch, all_slices=all_slices)
        t0 = time.perf_counter()
        slices, geometry = preprocess(image, self.crop)
        return self._segment(slices, geometry, on_batch, all_slices,
                             time.perf_counter() - t0)

    def view_probabilities(
        self, image: np.ndarray, plane: str = "axial", flip: bool = False,
        on_batch: Callable[[int], None] | None = None, stats: dict | None = None, *,
        box: tuple[slice, slice, slice] | None = None, model: int = 0,
        prepared: dict | None = None, tumor_slices: bool = False,
    ) -> np.ndarray:
        """The network's softmax probabilities ``(K, X, Y, Z)`` float32 for ``image``
        ``(4, X, Y, Z)`` seen along ``plane``, flipped left-right first with ``flip`` (and the
        result flipped back), every brain slice run (but see ``box``, ``tumor_slices``);
        background 1 outside the crop window.
        ``model`` 1: the partner's network (``partner``; accurate mode only).
        ``tumor_slices``: run only the slices near tumor, as ``infer.predict_labels`` (by the
        labelling rule, ``threshold``), the others background with probability 1.

        ``box`` (slices of X, Y, Z): only the probabilities inside it, ``(K, *box shape)``,
        from this view's slices that cross it (with brain windows, each on one window around
        the box, grown as brain windows are; the preprocessing, z-scores included, is still
        that of the whole image). ``stats``, if given, gets ``preprocess`` and ``infer``
        seconds, ``brain`` slices and ``run`` slices added to what it holds. ``prepared``, if
        given, keeps each (plane, flip)'s preprocessed slices for the next call on the same
        image that asks for them (the views of two models).
        """
        t0 = time.perf_counter()
        if prepared is not None and (plane, flip) in prepared:
            slices, geometry = prepared[plane, flip]
        else:
            view = image[:, ::-1] if flip else image  # BraTS: X runs left-right
            slices, geometry = preprocess(to_plane(view, plane), self.crop)
            if prepared is not None:
                prepared[plane, flip] = slices, geometry
        seen = None  # the box as this view's slices see it
        if box is not None:
            if flip:
                width = image.shape[1]
                box = (slice(width - box[0].stop, width - box[0].start), *box[1:])
            seen = plane_box(box, plane)
            slices = slices[box_slices(geometry, seen)]  # the slices that cross the box
        if self.margin is None:
            windows = None
        elif seen is None:
            windows = brain_windows(slices, self.margin)
        else:  # the box is one rectangle in every slice: one window around it
            windows = [box_window(geometry, seen, self.margin)] * len(slices)
        t1 = time.perf_counter()
        network = self.partner_backend if model else self.backend
        if network is None:
            raise ValueError(f"{self.weights}: no partner model loaded (mode {self.mode!r})")
        ran: dict[str, int] = {}
        probs = predict_probabilities(network, slices, self.batch_size, on_batch, windows,
                                      tumor_slices=tumor_slices, stats=ran,
                                      threshold=self.threshold)
        probs[:, 0] -= 1  # uncrop pads with 0: background is then 1 outside the crop window
        volume = from_plane(uncrop(probs, geometry, seen), plane)
        volume[0] += 1
        if stats is not None:
            for key, value in (("preprocess", t1 - t0), ("infer", time.perf_counter() - t1),
                               ("brain", geometry.n_slices), ("run", ran["run"])):
                stats[key] = stats.get(key, 0) + value
        return volume[:, ::-1] if flip else volume

    def _tumor_box(self, probs: np.ndarray) -> tuple[slice, slice, slice] | None:
        """The box of the postprocessed tumor in ``probs`` (K, X, Y, Z), widened by
        ``VIEW_MARGIN``; None where there is none."""
        from tiramisu_brats.postprocess import bounding_box

        tumor = _postprocess(region_labels(probs, self.threshold)) > 0
        return bounding_box(tumor, VIEW_MARGIN) if tumor.any() else None

    def _segment_views(
        self, image: np.ndarray, on_batch: Callable[[int], None] | None,
        back: Grid | None = None, all_slices: bool = False,
        axial: tuple[np.ndarray, Geometry] | None = None,
    ) -> Segmentation:
        """Every view of ``self.views``: the mean of their softmax
        probabilities, labelled by ``region_labels`` with ``self.threshold`` (the partner's
        rule where the weights have one). With tumor
        slices (not ``all_slices``) the first view runs its tumor slices and the views after
        it near its tumor only (``VIEW_MARGIN``); where it found none, each later view runs its
        own tumor slices (a tumor-free case then costs the coarse passes). With ``back``,
        the probabilities are brought linearly to the input grid of ``back`` (a resampled one)
        before the labels and postprocessing there: on the validation cases resampled to
        0.5 x 0.5 x 1 and 1 x 1 x 3 mm slightly better than the labels by nearest neighbour
        (docs/model-card.md). ``axial``: ``preprocess(image, self.crop)``, if made already.
        """
        stats: dict = {}
        views = self.views
        # the two models' views of a plane share its preprocessing, held until the last asks
        last = {(plane, flip): k for k, (plane, flip, _) in enumerate(views)}
        prepared: dict = {} if axial is None else {("axial", False): axial}
        near = self.tumor_slices and not all_slices and len(views) > 1
        first = box = None
        for k, (plane, flip, model) in enumerate(views):
            volume = self.view_probabilities(image, plane, flip, on_batch, stats, box=box,
                                             model=model, prepared=prepared,
                                             tumor_slices=near and (k == 0 or box is None))
            if last[plane, flip] == k:
                del prepared[plane, flip]
            if first is None:
                # the views after the first see only the box (all of the volume without one);
                # outside it every view is the first, and the views agree
                first = volume
                box = self._tumor_box(volume) if near else None
                where = (slice(None), *(box or ()))
                fused = np.array(volume[where]) if box else volume
                wt = 1 - fused[0]  # the whole tumor's probability in this view
                wt_sum, wt_squares = wt, wt * wt
            else:
                fused += volume
                wt = 1 - volume[0]
                wt_sum += wt
                wt_squares += wt * wt
        t2 = time.perf_counter()
        fused /= len(views)
        mean = wt_sum / len(views)
        several = len(views) > 1  # one view: nothing to compare it with
        spread = np.zeros(image.shape[1:], np.float32)
        spread[where[1:]] = np.sqrt(np.clip(wt_squares / len(views) - mean * mean, 0, None))
        if box:
            first[where] = fused
            fused = first
        if back is not None:
            fused, spread = to_input(fused, back, linear=True), to_input(spread, back, True)
        raw = region_labels(fused, self.threshold)
        labels = _postprocess(raw) if self.postprocess else raw
        timings = {"preprocess": stats["preprocess"], "infer": stats["infer"],
                   "postprocess": time.perf_counter() - t2}
        return Segmentation(labels, raw, timings, {"brain": stats["brain"],
                                                   "run": stats["run"]},
                            uncertainty=spread if several else None,
                            qc=quality(spread, labels, self.qc_review) if several else
                            confidence(1 - fused[0], labels, self.qc_confidence),
                            tumor_slices=near)

    def _segment_grid(
        self, image: np.ndarray, grid: Grid, on_batch: Callable[[int], None] | None,
        all_slices: bool, prepared: tuple[np.ndarray, Geometry] | None = None,
        preprocess_s: float = 0.0,
    ) -> Segmentation:
        """Segment ``image`` on the network's ``grid``; everything returned is on the input
        grid. ``prepared``: ``image``'s axial slices and geometry, if made already (in
        ``preprocess_s`` seconds). A resampled grid gets the probabilities brought back
        before the labels are decided (``_segment_views``), in either mode."""
        if self.mode == "fast" and not grid.resampled:
            if prepared is None:
                t0 = time.perf_counter()
                prepared = preprocess(image, self.crop)
                preprocess_s += time.perf_counter() - t0
            seg = self._segment(*prepared, on_batch, all_slices, preprocess_s)
        else:
            seg = self._segment_views(image, on_batch, back=grid if grid.resampled else None,
                                      all_slices=all_slices, axial=prepared)
            seg.timings["preprocess"] += preprocess_s
        if grid.resampled:  # already on the input grid
            return seg
        spread = None if seg.uncertainty is None else to_input(seg.uncertainty, grid)
        return Segmentation(to_input(seg.labels, grid), to_input(seg.raw, grid), seg.timings,
                            seg.slices, uncertainty=spread, qc=seg.qc,
                            tumor_slices=seg.tumor_slices)

    def _segment(
        self, slices: np.ndarray, geometry: Geometry, on_batch: Callable[[int], None] | None,
        all_slices: bool, preprocess_s: float,
    ) -> Segmentation:
        t1 = time.perf_counter()
        windows = None if self.margin is None else brain_windows(slices, self.margin)
        tumor_slices = self.tumor_slices and not all_slices
        stats: dict[str, int] = {}
        whole_tumor = np.zeros((len(slices), *slices.shape[2:]), np.float32)
        raw = uncrop(predict_labels(self.backend, slices, self.batch_size, on_batch, windows,
                                    tumor_slices=tumor_slices, stats=stats,
                                    threshold=self.threshold, whole_tumor=whole_tumor),
                     geometry)
        t2 = time.perf_counter()
        labels = _postprocess(raw) if self.postprocess else raw
        # on the slices: the labels cut out cost 6 ms, the probabilities put back 38 ms
        qc = confidence(whole_tumor, extract(labels, geometry), self.qc_confidence)
        t3 = time.perf_counter()
        return Segmentation(labels, raw, {"preprocess": preprocess_s, "infer": t2 - t1,
                                          "postprocess": t3 - t2},
                            {"brain": len(slices), "run": stats["run"]}, qc=qc,
                            tumor_slices=tumor_slices)

    def segment_case(
        self, files: io.CaseFiles | PathLike, output: PathLike, *, convention: str = "brats",
        overwrite: bool = False, save_raw: bool = False, uncertainty: bool = False,
        on_batch: Callable[[int], None] | None = None,
        read: Callable[[io.CaseFiles], io.Case | PreparedCase] | None = None,
        picture: PathLike | None = None,
    ) -> dict:
        """Read, segment and write one case (``files``, or its folder: ``io.find_case_files``);
        returns the summary also written as JSON.

        ``picture``: also write this PNG, the three planes through the tumor with the labels
        over FLAIR and T1ce (``report.planes_png``), in the trained orientation.

        Writes ``output`` (a .nii.gz label map on the input's grid), ``<output stem>.json``
        (volumes in ml, model, timings; the quality score ``qc``), with
        ``save_raw`` ``<output stem>_raw.nii.gz`` and with ``uncertainty`` (a mode of several
        views) ``<output stem>_uncertainty.nii.gz``: the spread of the whole tumor's
        probability across the views, float32 on the input's grid (0 where the views were not
        all run: with tumor slices, outside the first view's tumor box). With ``overwrite`` over an
        earlier run's ``output`` (its JSON there), that run's ``_raw`` or ``_uncertainty`` map
        which this run does not make is removed: it belongs to the labels replaced.
        ``read``: how the case is read (default ``io.read_case``, keeping the files' integer
        type), e.g. ``io.ReadAhead.read`` (then the ``load`` time is the wait for it); it may
        return the case already prepared (``prepare_case``), e.g. in the reading thread, and
        then ``preprocess`` takes no time here.
        """
        output = Path(output)
        if not isinstance(files, io.CaseFiles):  # a case folder
            files = io.find_case_files(files)
        # Checked before the (long) inference, as is the output folder below.
        io.check_convention(convention)
        if io.nifti_stem(output.name) is None:
            raise ValueError(f"{output}: a label map must end in .nii.gz or .nii")
        _, sidecar, raw_path, spread_path = _case_outputs(output, True, True)
        if uncertainty:
            _check_uncertainty(self.mode)
        inputs = {Path(p).resolve() for p in (*files.images, files.seg) if p is not None}
        for target in (output, sidecar, raw_path, spread_path):
            if target.resolve() in inputs:
                raise io.InputError(f"{target}: the output would overwrite an input file")
        # atomic_write checks again when writing.
        if not output.parent.is_dir():
            raise io.InputError(f"{output}: output folder {output.parent} does not exist")
        if not os.access(output.parent, os.W_OK | os.X_OK):
            raise io.InputError(f"{output}: output folder {output.parent} is not writable")
        if not overwrite:
            for target in (*_case_outputs(output, save_raw, uncertainty),
                           *((Path(picture),) if picture is not None else ())):
                if target.exists():
                    raise FileExistsError(f"{target}: exists (and overwriting was not asked "
                                          "for)")
        t0 = time.perf_counter()
        case = read(files) if read else io.read_case(files, keep_dtype=True)
        t1 = time.perf_counter()
        prepared_s = 0.0
        if not (isinstance(case, PreparedCase) and case.crop == self.crop
                and case.resample == self.resample):
            case = prepare_case(case.case if isinstance(case, PreparedCase) else case,
                                self.crop, self.resample)
            prepared_s = time.perf_counter() - t1
        grid = case.grid
        seg = self._segment_grid(case.image, grid, on_batch, save_raw,
                                 (case.slices, case.geometry), prepared_s)
        case, labels, raw, spread = case.case, seg.labels, seg.raw, seg.uncertainty
        t2 = time.perf_counter()
        # this label map's earlier run, replaced: asked now, not before the inference, so that
        # a run that finished meanwhile (another process, the same output) counts
        rerun = overwrite and sidecar.exists()
        io.write_label_map(output, labels, case.header, case.affine, convention=convention,
                           overwrite=overwrite)
        if save_raw:
            io.write_label_map(raw_path, raw, case.header, case.affine,
                               convention=convention, overwrite=overwrite)
        if uncertainty:
            io.write_float_map(spread_path, spread, case.header,
                               case.affine, overwrite=overwrite)
        if rerun:
            # an earlier run's maps beside this label map belong to its old labels (evaluate
            # would score a _raw map with the new ones); one with its own JSON is another
            # run's label map, named like them
            for stale, written in ((raw_path, save_raw), (spread_path, uncertainty)):
                if (not written and stale.exists()
                        and not summary_path(stale).exists()):
                    stale.unlink()
                    log.info("%s: removed (an earlier run's, not made this time)", stale)
        enhancing = 3 if convention == "brats2023" else 4
        if picture is not None:
            from tiramisu_brats.report import planes_png

            image, (shown,), spacing = _as_shown(case, labels)
            planes_png(image[3], image[1], shown, picture, case.case_id, spacing,
                       enhancing=enhancing)
        t3 = time.perf_counter()
        timings = {"load": t1 - t0, **seg.timings, "save": t3 - t2}
        timings["total"] = sum(timings.values())
        summary = {
            "case": case.case_id,
            "label_map": output.name,
            "inputs": [str(Path(p).resolve()) for p in files.images],
            "label_convention": convention,
            "labels": {"necrosis": 1, "edema": 2, "enhancing": enhancing},
            "volumes_ml": _volumes_ml(labels, case.spacing),
            "postprocessed": self.postprocess,
            "shape": list(case.shape),
            "spacing_mm": list(case.spacing),
            "grid": grid_info(grid, case.case_id),
            "mode": self.mode,
            "model": {**self.model_info(), "tumor_slices": seg.tumor_slices},
            "slices": seg.slices,
            **({"qc": seg.qc} if seg.qc is not None else {}),
            "timings_s": timings,
        }
        io.atomic_write_text(sidecar, json.dumps(summary, indent=2), overwrite=True)
        return summary


def segment(image: np.ndarray, model: PathLike | None = None, backend: str = "openvino",
            affine: np.ndarray | None = None, **options: Any) -> Segmentation:
    """Segment one image (4, X, Y, Z) with a fresh ``Segmenter`` (see its options);
    ``affine`` (4, 4): as ``Segmenter.segment`` (without it, BraTS orientation and 1 mm)."""
    return Segmenter(model, backend, **options).segment(image, affine=affine)


# int8 becomes the default only where it moves no case's Dice (WT, TC, ET) against the expert
# by more than this from fp32's (issue: "Dice within 0.01 of fp32 on every labelled case").
INT8_TOLERANCE = 0.01
# Slices tumor must cover (in the expert's labels) for accuracy control to validate on them.
_VALIDATION_TUMOR_PIXELS = 50


def quantize_int8(
    data: PathLike | Sequence[PathLike], model: PathLike | None = None, *,
    holdout: Sequence[str] = (), tolerance: float = INT8_TOLERANCE, max_drop: float = 0.001,
    calibration_size: int = 300, validation_size: int = 120, seed: int = 0,
    on_case: Callable[[str], None] | None = None,
) -> dict:
    """Make the int8 OpenVINO model of ``model``'s weights (default: the shipped ones) from
    the labelled cases in the folder(s) ``data``, and check that it keeps their labels.

    Calibration on ``calibration_size`` axial slices (every third slice of each case, drawn by
    ``seed``), accuracy control on ``validation_size`` other slices with tumor in the expert's
    labels (``export.quantize``, ``max_drop``), both from the cases not in ``holdout``. Then
    every labelled case is segmented in fast mode in fp32 and in int8: the model is kept as
    the default where the CPU favours int8 (``infer.choose_precision``) only if no case's Dice
    against the expert (WT, TC, ET) moved by more than ``tolerance``. The model is written
    where ``export.model_file`` finds it (beside the weights, else in the cache), its record
    holding the check (``labels_check``). ``on_case`` is called with each case id as it is
    read or checked.

    Returns ``{"path", "check", "cases"}``, ``cases`` one row per case: ``case``,
    ``holdout``, ``fp32`` and ``int8`` Dice (WT, TC, ET), ``change`` (the largest of the 3).
    """
    import copy
    import hashlib

    from tiramisu_brats import export, metrics
    from tiramisu_brats.infer import OpenVINOBackend

    if not tolerance >= 0:  # NaN too
        raise ValueError(f"tolerance {tolerance}: a change of Dice must be 0 or more")
    weights = Path(model) if model is not None else default_weights()
    export.require_nncf(weights)  # before the cases are read
    folders = [Path(data)] if isinstance(data, (str, os.PathLike)) else [Path(d) for d in data]
    # A folder of images that is not a complete case raises what it lacks: left out, it would
    # quietly shrink what the int8 model is calibrated and checked on.
    files = [f for f in (io.find_case_files(c) for d in folders
                         for c in io.find_cases(d, incomplete=True)) if f.seg is not None]
    if not files:
        raise io.InputError(f"no labelled cases in {', '.join(map(str, folders))}")
    ids = [f.case_id for f in files]
    unknown = sorted(set(holdout) - set(ids))
    if unknown:
        raise io.InputError(f"held-out cases not among the labelled ones: {', '.join(unknown)}")
    if set(ids) <= set(holdout):
        raise io.InputError(f"all {len(ids)} labelled cases are held out: no case is left to "
                            "calibrate on")
    calibration, validation = [], []
    for f in files:
        if f.case_id in holdout:
            continue
        if on_case is not None:
            on_case(f.case_id)
        prepared = prepare_case(io.read_case(f))
        expert = to_network(io.read_label_map(f.seg)[0], prepared.grid)
        tumor = np.count_nonzero(extract(expert, prepared.geometry), axis=(1, 2))
        # A brain larger than CROP has larger slices; the middle CROP of them stacks with the
        # others (the network is convolutional: the same activations, nearly)
        h, w = prepared.slices.shape[-2:]
        middle = (..., slice((h - CROP[0]) // 2, (h - CROP[0]) // 2 + CROP[0]),
                  slice((w - CROP[1]) // 2, (w - CROP[1]) // 2 + CROP[1]))
        calibration.append(prepared.slices[::3][middle])
        validation.append(prepared.slices[1::3][tumor[1::3] >= _VALIDATION_TUMOR_PIXELS][middle])
    rng = np.random.default_rng(seed)
    pool, candidates = np.concatenate(calibration), np.concatenate(validation)
    calibration = pool[rng.permutation(len(pool))[:calibration_size]]
    validation = candidates[rng.permutation(len(candidates))[:validation_size]]
    used = sorted(set(ids) - set(holdout))
    used_hash = hashlib.sha256(",".join(used).encode()).hexdigest()[:12]
    calibration_id = (f"cases:{len(used)}:{used_hash}:every 3rd axial slice:"
                      f"{len(calibration)}:seed {seed}")
    sha = file_sha256(weights)
    path = export.quantize(export.model_file(weights), export.made_file(weights, "int8", sha=sha),
                           calibration, calibration_id, validation, max_drop)
    reference = Segmenter(weights, "openvino", precision="fp32")
    quantized = copy.copy(reference)  # the same settings, this int8 model (not another found)
    quantized.backend = OpenVINOBackend(path, precision="int8")
    quantized.backend.divisor = reference.backend.divisor  # the same network's
    rows = []
    for f in files:
        if on_case is not None:
            on_case(f.case_id)
        case, expert = io.read_case(f), io.read_label_map(f.seg)[0]
        row: dict = {"case": f.case_id, "holdout": f.case_id in holdout}
        for key, segmenter in (("fp32", reference), ("int8", quantized)):
            labels = segmenter.segment(case.image, affine=case.affine).labels
            row[key] = list(metrics.region_dice(labels, expert).values())
        row["change"] = max(abs(a - b) for a, b in zip(row["fp32"], row["int8"]))
        rows.append(row)
    worst = max(rows, key=lambda r: r["change"])
    check = {"kept": worst["change"] <= tolerance, "cases": len(rows),
             "largest_change": round(worst["change"], 4), "worst_case": worst["case"],
             "tolerance": tolerance, "reference": "openvino fp32, fast mode",
             "held_out": sorted(holdout)}
    export.record_check(path, check)
    log.info("int8 %s: largest Dice change %.4f on %s", "keeps the labels" if check["kept"]
             else "does not keep the labels", worst["change"], worst["case"])
    return {"path": path, "check": check, "cases": rows}


def label_stem(path: PathLike) -> str:
    """A label file's name without ``.nii``/``.nii.gz``."""
    name = Path(path).name
    return io.nifti_stem(name) or name


def summary_path(label_map: PathLike) -> Path:
    """The JSON summary ``segment`` writes beside ``label_map`` (``<stem>.json``)."""
    return Path(label_map).with_name(label_stem(label_map) + ".json")


def one_line(err: BaseException) -> str:
    """An error as one line naming the file: ``OSError``s as ``<file>: <problem>``; an error
    other than ``ValueError`` and ``OSError`` (unexpected) with its type's name."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err)
        if not isinstance(err, (ValueError, OSError)):  # unexpected: say what it was
            text = f"{type(err).__name__}: {text}"
    return " ".join(text.split()) or type(err).__name__


@dataclass(frozen=True)
class CohortRun:
    """What ``segment_cohort`` did. ``results``: the summary of each case segmented (as
    ``Segmenter.segment_case`` returns it), in the order they were done; ``failures``:
    ``(case, reason)`` of each case of a folder of cases that failed, in the folder's order
    (``case`` is the folder's name when its files were not found); ``cohort``: whether the
    input was a folder of cases; ``failures_csv``: the list of failures written (a folder of
    cases with failures), else None; ``segmenter``: the model used (None where every case
    was skipped as done before and none was given); ``skipped``: the summary
    of each case left as an earlier run finished it (``skip_existing``), as that run wrote it,
    in the folder's order."""

    results: list[dict]
    failures: list[tuple[str, str]]
    cohort: bool
    failures_csv: Path | None
    segmenter: Segmenter | None
    skipped: list[dict] = field(default_factory=list)


# What ``segment_cohort`` tells ``on_event(kind, case_id, value)``: cases found incomplete
# while planning fail first, then the model, then the cases one by one.
COHORT_EVENTS = {
    "model": "the model is loaded (value: the Segmenter; case_id '')",
    "cases": "a folder of cases: segmenting begins (value: the number of cases to segment)",
    "case": "a case begins (value: its label map's path)",
    "slices": "slices of the case went through the network (value: how many)",
    "wrote": "a case is done (value: its label map's path)",
    "failed": "a case of a folder of cases failed (value: the reason, one line)",
}


def segment_cohort(
    input: PathLike | None, output: PathLike, *, t1: PathLike | None = None,
    t1ce: PathLike | None = None, t2: PathLike | None = None, flair: PathLike | None = None,
    model: PathLike | None = None, backend: str = "openvino", precision: str | None = None,
    mode: str = "fast", resample: bool = True, postprocess: bool = True,
    whole_slices: bool | None = None, tumor_slices: bool | None = None,
    batch_size: int | None = None, threads: int | None = None, convention: str = "brats",
    save_raw: bool = False, uncertainty: bool = False, overwrite: bool = False,
    skip_existing: bool = False, shard: tuple[int, int] | None = None,
    segmenter: Segmenter | None = None,
    on_event: Callable[[str, str, object], None] | None = None,
) -> CohortRun:
    """Segment a case folder, a folder of case folders, or four files (``t1`` .. ``flair``,
    with ``input`` None) into label maps (``Segmenter.segment_case``: beside each its JSON).

    One case: ``output`` is its .nii.gz; any error is raised. A folder of cases: ``output`` is
    a folder (made), with ``<case id>.nii.gz`` for each case; a case that fails (its files
    incomplete, unreadable, a case id found twice, ...) is reported and the others go on:
    the list is written to ``output/failures.csv`` (case, reason), which a run without
    failures removes. ``shard=(i, n)``: of the sorted case folders only every ``n``-th from
    the ``i``-th (``n`` jobs with ``i = 0 .. n-1`` cover the folder once), its list of
    failures ``failures-shard-<i>-of-<n>.csv``. ``skip_existing``: cases whose outputs an
    earlier run wrote completely are left as they are (those it left incomplete are redone;
    those made in another mode or label convention are named in a warning).
    Without it (nor ``overwrite``), a folder of cases where any case's outputs, or the folder's
    index or list of failures, already exist is refused before anything is read or written.

    The model: ``segmenter``, or one made from ``model`` .. ``threads`` (see ``Segmenter``)
    while the first case is read. ``convention``, ``save_raw``, ``uncertainty`` and
    ``overwrite``: as ``Segmenter.segment_case``. Cases are read and preprocessed in a
    background thread one case ahead. ``on_event(kind, case_id, value)``: progress, kinds
    as ``COHORT_EVENTS`` says. Nothing is printed.
    """
    io.check_convention(convention)
    if overwrite and skip_existing:
        raise ValueError("replacing existing outputs and skipping them were both asked for")
    if segmenter is None:
        _check_mode(mode)
    mode = segmenter.mode if segmenter else mode
    if uncertainty:  # checked before any case, as each case would fail alike
        _check_uncertainty(mode)
    output = Path(output)
    jobs, cohort = _cohort_jobs(input, output, (t1, t1ce, t2, flair), shard)
    emit = on_event or (lambda kind, case_id, value: None)
    failures: list[tuple[int, str, str]] = []  # (job number, case, reason)

    def failed(k: int, name: str, err: Exception) -> None:
        log.debug("%s failed", name, exc_info=True)
        failures.append((k, name, one_line(err)))
        emit("failed", name, failures[-1][2])

    plan, skipped = _plan_cases(jobs, output, overwrite, skip_existing, save_raw,
                                uncertainty, failed if cohort else None)
    if cohort and not (overwrite or skip_existing):
        _refuse_existing(output, plan, save_raw, uncertainty, shard)
    crop, resample = (CROP, resample) if segmenter is None else (segmenter.crop,
                                                                  segmenter.resample)
    results: list[dict] = []
    sources: dict[str, tuple[io.CaseFiles, Path]] = {}
    # The first case is read and preprocessed while the model and the libraries it needs load.
    with io.ReadAhead([files for _, files, _, _ in plan],
                      read=lambda f: _read_prepared(f, crop, resample)) as reader:
        if segmenter is None and plan:  # every case done before: no model to load
            segmenter = Segmenter(model, backend, batch_size=batch_size, threads=threads,
                                  precision=precision, postprocess=postprocess,
                                  whole_slices=whole_slices, mode=mode, resample=resample,
                                  tumor_slices=tumor_slices)
        if segmenter is not None:
            emit("model", "", segmenter)
        if cohort:  # only now: a bad model or option leaves no output folder behind
            output.mkdir(parents=True, exist_ok=True)
            emit("cases", "", len(plan))
        for k, files, target, replace in plan:
            emit("case", files.case_id, target)
            try:
                results.append(segmenter.segment_case(
                    files, target, convention=convention, overwrite=replace, save_raw=save_raw,
                    uncertainty=uncertainty, read=reader.read,
                    on_batch=lambda n, case_id=files.case_id: emit("slices", case_id, n),
                    picture=_planes_picture(target) if cohort else None))
                sources[files.case_id] = (files, target)
            except Exception as err:  # in a folder of cases, any failure of one is reported
                if not cohort:
                    raise
                failed(k, files.case_id, err)
            else:
                emit("wrote", files.case_id, target)
    failures.sort()
    csv_path = _write_failures(output, failures, shard) if cohort else None
    # Cases an earlier run finished keep their row in the index, from the summary it wrote.
    earlier = [_earlier_summary(files, target) for files, target in skipped]
    # summaries from before the mode was recorded are fast mode's (the only one then)
    other = [e["case"] for e in earlier if e.get("mode", "fast") != mode
             or e.get("label_convention", convention) != convention]
    if other:
        log.warning("%d case(s) skipped as done before were segmented in another mode or label "
                    "convention than asked now (their JSON says which): %s", len(other),
                    io.names_text(other))
    if cohort and (results or failures or skipped):
        sources.update((files.case_id, (files, target)) for files, target in skipped)
        _cohort_index(output, results + earlier, failures, sources, shard)
    return CohortRun(results, [(name, reason) for _, name, reason in failures], cohort,
                     csv_path, segmenter, earlier)


def _refuse_existing(output: Path, plan: list, save_raw: bool, uncertainty: bool,
                     shard: tuple[int, int] | None) -> None:
    """Raise ``FileExistsError`` if a folder of cases would replace what an earlier run wrote
    there (a case's outputs, the folder's index or list of failures)."""
    done = [files.case_id for _, files, target, _ in plan
            if any(p.exists() for p in (*_case_outputs(target, save_raw, uncertainty),
                                        _planes_picture(target)))]
    kept = [name for name in (_shard_file("index.html", shard), _shard_file("failures.csv", shard))
            if (output / name).exists()]
    if done or kept:
        what = (f"{len(done)} of the {len(plan)} cases already have outputs there "
                f"({io.names_text(done, 5)})"
                if done else f"an earlier run's {' and '.join(kept)} is there")
        raise FileExistsError(f"{output}: {what}, and neither replacing nor skipping them "
                              "was asked for; nothing was written")


# The maps segment writes beside a label map <case>.nii.gz: <case>_raw.nii.gz (before
# postprocessing) and <case>_uncertainty.nii.gz.
_COMPANIONS = ("_raw", "_uncertainty")


def _planes_picture(target: Path) -> Path:
    """The picture of a case's three planes that a folder of cases gets beside its label map."""
    return target.with_name(label_stem(target) + "_planes.png")


def _shard_file(name: str, shard: tuple[int, int] | None) -> str:
    """A folder of cases' ``index.html`` or ``failures.csv``, or a shard's own of it
    (``index-shard-<i>-of-<n>.html``)."""
    if shard is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}-shard-{shard[0]}-of-{shard[1]}.{ext}"


def _earlier_summary(files: io.CaseFiles, target: Path) -> dict:
    """The summary an earlier run wrote beside ``target`` (a skipped case), or a stand-in
    that says it could not be read."""
    try:
        summary = _read_summary(target)
        if not isinstance(summary.get("volumes_ml"), dict):
            raise ValueError("not the summary segment writes")
        return {**summary, "case": files.case_id}
    except (OSError, ValueError) as err:
        return {"case": files.case_id, "volumes_ml": {},
                "qc": {"review": True, "why": f"done before; {summary_path(target).name} "
                                              f"unreadable: {one_line(err)}"}}


def _cohort_index(output: Path, results: list[dict], failures: list,
                  sources: dict[str, tuple[io.CaseFiles, Path]],
                  shard: tuple[int, int] | None) -> Path:
    """``output/index.html`` (one per shard): a row per case (volumes, QC, the planes
    picture, how to view it), cases to review first; failed cases too, with the reason."""
    from tiramisu_brats.report import write_index_html

    rows = []
    for summary in results:
        files, target = sources[summary["case"]]
        volumes, qc = summary["volumes_ml"], summary.get("qc") or {}
        rows.append({
            "case": summary["case"], "review": qc.get("review"), "qc_score": qc.get("score"),
            "qc_why": qc.get("why"),
            **{f"{r}_ml": volumes.get(f"{r}_ml") for r in ("WT", "TC", "ET")},
            "image": _planes_picture(target).name,
            "link": f"view/{io.safe_case_id(summary['case'])}/",
            "command": _view_command(files.images[0].parent, target)})
    rows += [{"case": name, "review": True, "qc_why": f"failed: {reason}"}
             for _, name, reason in failures]
    name = _shard_file("index.html", shard)
    return write_index_html(output, rows, f"tiramisu-brats segment: {output.name}", name=name)


def _cohort_jobs(
    input: PathLike | None, output: Path, explicit: tuple, shard: tuple[int, int] | None,
) -> tuple[list[tuple[Path | io.CaseFiles, Path | None, bool]], bool]:
    """What ``segment_cohort`` is to segment: ``(case folder or files, output or None for
    one in the output folder, whether it is this shard's)`` for each case (a shard's job
    lists the other shards' folders too, so that a case id found twice is found across
    shards), and whether it is a folder of cases."""
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard {shard[0]} of {shard[1]}: expected i of n with 0 <= i < n")
    files = _explicit_files(input, explicit)
    if files is not None:
        jobs: list = [(files, output, True)]
        cohort = False
    else:
        input = Path(input)
        if not input.exists():
            raise io.InputError(f"{input}: no such file or folder")
        cohort = not io.is_case_folder(input)
        if cohort:
            # Subfolders with images that are not complete cases are reported as failures.
            # The output folder may lie among the cases: its label maps are not a case.
            out = output.resolve()
            folders = [f for f in io.find_cases(input, incomplete=True)
                       if f.resolve() != out or io.is_case_folder(f)]
            # sorted folders: the same split in every job
            jobs = [(f, None, shard is None or k % shard[1] == shard[0])
                    for k, f in enumerate(folders)]
            if output.exists() and not output.is_dir():
                raise io.InputError(f"{output}: not a folder (the output for a folder of "
                                    "cases is a folder)")
            existing = next(p for p in (output, *output.absolute().parents) if p.exists())
            if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
                raise io.InputError(f"{output}: {existing} is not writable" if existing != output
                                    else f"{output}: output folder is not writable")
            if not output.exists() and io.nifti_stem(output.name) is not None:
                raise io.InputError(f"{output}: named like a label map, but the output for a "
                                    f"folder of cases is a folder ({input} holds no case "
                                    "itself)")
        else:
            jobs = [(io.find_case_files(input), output, True)]
    if not cohort and shard is not None:
        raise ValueError(f"a shard is a part of a folder of cases; "
                         f"{input if input is not None else 'the four files'} is one case")
    if not cohort and io.nifti_stem(output.name) is None:
        raise ValueError(f"{output}: the output of one case must end in .nii.gz or .nii")
    if not cohort and output.is_dir():
        raise io.InputError(f"{output}: a folder; the output of one case is a label map file")
    if not cohort and output.parent != Path() and not output.parent.is_dir():
        problem = "not a folder" if output.parent.exists() else "output folder does not exist"
        raise io.InputError(f"{output.parent}: {problem}")
    return jobs, cohort


def _plan_cases(jobs: list, output: Path, overwrite: bool, skip_existing: bool,
                save_raw: bool, uncertainty: bool,
                failed: Callable[[int, str, Exception], None] | None,
                ) -> tuple[list[tuple[int, io.CaseFiles, Path, bool]],
                           list[tuple[io.CaseFiles, Path]]]:
    """From file names only, what to do for each of this shard's cases: ``(job number, files,
    label map, overwrite)``, and the cases skipped as finished ``(files, label map)``; a case
    that cannot be done goes to ``failed`` (without it, is raised)."""
    sources: dict[str, Path] = {}
    plan, skipped = [], []
    for k, (job, target, mine) in enumerate(jobs):
        name = job.name if isinstance(job, Path) else job.case_id
        try:
            if not mine:  # another shard's: only its case id counts here
                with contextlib.suppress(io.InputError):
                    sources.setdefault(io.find_case_files(job).case_id, job)
                continue
            files = io.find_case_files(job) if isinstance(job, Path) else job
            if target is None:
                if files.case_id.endswith(_COMPANIONS):  # evaluate would never score it
                    raise io.InputError(
                        f"{job}: case id {files.case_id!r} ends like a map segment writes "
                        f"beside a label map ({', '.join(_COMPANIONS)}): its label map would "
                        "be taken for another case's")
                target = output / f"{io.safe_case_id(files.case_id)}.nii.gz"
                if files.case_id in sources:
                    raise io.InputError(f"{job}: case id {files.case_id!r} is also the one "
                                        f"of {sources[files.case_id]}")
                sources[files.case_id] = job
            replace = overwrite
            if skip_existing:
                if _finished(target, save_raw, uncertainty):
                    skipped.append((files, target))
                    continue
                # what a stopped run (or the user) left of the case, the label map among it
                # or not: redone
                replace = any(p.exists() for p in (*_case_outputs(target, True, True),
                                                   _planes_picture(target)))
            plan.append((k, files, target, replace))
        except Exception as err:
            if failed is None:
                raise
            failed(k, name, err)
    return plan, skipped


def _case_outputs(target: Path, save_raw: bool, uncertainty: bool = False) -> list[Path]:
    """What ``Segmenter.segment_case`` writes for the label map ``target``."""
    stem = label_stem(target)
    return [target, summary_path(target),
            *([target.with_name(stem + "_raw.nii.gz")] if save_raw else []),
            *([target.with_name(stem + "_uncertainty.nii.gz")] if uncertainty else [])]


def _check_mode(mode: str) -> None:
    """Refuse a mode not in ``MODES``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")


def _check_uncertainty(mode: str) -> None:
    """An uncertainty map is the views' disagreement: refused for a mode of one view (a
    partner model's views replace the flips, as many); an unknown mode is left to
    ``_check_mode``."""
    if len(MODES.get(mode, ())) == 1:
        raise ValueError(f"an uncertainty map needs several views; mode {mode!r} has one "
                         "(mode 'accurate' has six)")


def _finished(target: Path, save_raw: bool, uncertainty: bool) -> bool:
    """Whether an earlier run wrote every output of a case asked for now: the JSON summary is
    written last, so a label map without it is what a killed run left and is redone."""
    return all(p.exists() for p in _case_outputs(target, save_raw, uncertainty))


def _read_prepared(files: io.CaseFiles, crop: tuple[int, int], resample: bool
                   ) -> PreparedCase:
    """Read a case and preprocess it: what ``segment_cohort`` does in its reading thread."""
    return prepare_case(io.read_case(files, keep_dtype=True), crop, resample)


def _write_failures(output: Path, failures: list[tuple[int, str, str]],
                    shard: tuple[int, int] | None) -> Path | None:
    """Write the failures of a folder of cases (one list per shard) to ``output``, or remove
    the list an earlier run left when there are none; returns the list's path if written."""
    name = _shard_file("failures.csv", shard)
    path = output / name
    if not failures:  # a resumed run that succeeded: the last run's list no longer holds
        path.unlink(missing_ok=True)
        return None
    buf = _io.StringIO()
    csv.writer(buf).writerows([("case", "reason"), *(row[1:] for row in failures)])
    io.atomic_write_text(path, buf.getvalue())
    return path


def _label_id(path: Path) -> str:
    stem = label_stem(path)
    for suffix in ("_seg", "-seg"):
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


@dataclass(frozen=True)
class LabelSource:
    """A label map to evaluate, with the case's images when known (for overlays)."""

    case_id: str
    path: Path
    raw: Path | None = None
    images: io.CaseFiles | None = None


def find_label_maps(root: PathLike) -> dict[str, LabelSource]:
    """Label maps by case id: a file, a case folder (its ``_seg``), a folder of label files
    (``<case>.nii.gz``; a file's or a folder's ``<case>_raw.nii.gz`` is kept as the map before
    postprocessing, ``<case>_uncertainty.nii.gz`` left out), or a folder of case folders."""
    root = Path(root)
    if root.is_file():
        raw = root.with_name(label_stem(root) + "_raw.nii.gz")
        return {_label_id(root): LabelSource(_label_id(root), root,
                                             raw=raw if raw.is_file() else None)}
    if not root.is_dir():
        raise io.InputError(f"{root}: no such file or folder")
    case_folder = io.is_case_folder(root)
    if case_folder:
        folders = [root]
    else:
        folders = [p for p in sorted(root.iterdir()) if p.is_dir() and io.is_case_folder(p)]
    found: dict[str, LabelSource] = {}

    def add(source: LabelSource) -> None:  # a case id twice: the later (a file) is used
        if source.case_id in found:
            log.warning("%s: case %s is also %s; %s is used", root, source.case_id,
                        found[source.case_id].path, source.path)
        found[source.case_id] = source

    for folder in folders:
        files = io.find_case_files(folder)
        if files.seg is not None:
            add(LabelSource(files.case_id, files.seg, images=files))
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    raws = {label_stem(p)[:-4]: p for p in files if label_stem(p).endswith("_raw")}
    for p in files:
        stem = label_stem(p)
        # segment's other maps beside the label maps: before postprocessing, and the views'
        # disagreement
        companion = stem.endswith(_COMPANIONS)
        if stem != p.name and not companion and not case_folder:
            add(LabelSource(_label_id(p), p, raw=raws.get(stem)))
    if not found:
        raise io.InputError(f"{root}: no label maps found (.nii/.nii.gz or case folders)")
    return found


def evaluate(
    pred: PathLike, ref: PathLike, report_dir: PathLike | None = None, *,
    overlays: bool = True, overwrite: bool = False,
    on_case: Callable[[str], None] | None = None,
) -> list[dict]:
    """Score predicted label maps against the expert's; returns one row per case.

    ``pred`` and ``ref`` are each a label file or a folder (cases matched by id; one file
    against a single case is paired whatever their names; either label convention). With
    ``report_dir``: metrics.csv, summary.json, box plots and overlays.
    """
    from tiramisu_brats import metrics, report

    preds, refs = find_label_maps(pred), find_label_maps(ref)
    ref_ids = {case_id: case_id for case_id in refs}
    if Path(pred).is_file() and len(refs) == 1:  # one file against one case: paired whatever
        (p,), (r,) = preds.values(), refs.values()  # their names
        refs = {p.case_id: LabelSource(p.case_id, r.path, images=r.images)}
        ref_ids = {p.case_id: r.case_id}
    common = sorted(set(preds) & set(refs))
    if not common:
        raise io.InputError(f"{pred}: no case matches a reference in {ref} "
                            f"(predictions: {sorted(preds)[:5]}, references: {sorted(refs)[:5]})")
    for unmatched, what in ((set(refs) - set(preds), "reference case(s) have no prediction"),
                            (set(preds) - set(refs), "prediction(s) have no reference")):
        if unmatched:
            log.warning("%d %s, not scored: %s", len(unmatched), what,
                        io.names_text(sorted(unmatched)))
    if all(preds[c].images is not None for c in common):
        log.warning("%s: the predictions are experts' segmentations of case folders (the "
                    "predicted label maps come first, the references second)", pred)
    summaries = {case_id: _summary_beside(preds[case_id].path) for case_id in common}
    for case_id in common:
        p, r = preds[case_id], refs[case_id]
        if p.path.resolve() == r.path.resolve():
            raise io.InputError(f"{p.path}: the prediction and the reference are the same file")
        made = summaries[case_id].get("case")
        if isinstance(made, str) and made != ref_ids[case_id]:
            log.warning("%s: segmented from case %s (its JSON summary), scored against the "
                        "reference of %s (%s)", p.path, made, ref_ids[case_id], r.path)
    if report_dir is not None:
        report_dir = Path(report_dir)
        _check_report_dir(report_dir, overwrite, [Path(pred), Path(ref)])
    rows, raw_rows = [], []
    for case_id in common:
        p, r = preds[case_id], refs[case_id]
        ref_labels, ref_affine, ref_header = io.read_label_map(r.path)
        spacing = io.header_spacing(ref_header)
        stages = [(p.path, rows)] + ([(p.raw, raw_rows)] if p.raw is not None else [])
        for path, out in stages:
            labels, affine, _ = io.read_label_map(path)
            if labels.shape != ref_labels.shape:
                raise io.InputError(f"{path}: shape {labels.shape} differs from the "
                                    f"reference's {ref_labels.shape} ({r.path})")
            same_grid = bool(np.allclose(affine, ref_affine, atol=io.AFFINE_ATOL))
            if not same_grid:
                log.warning("%s: affine differs from the reference %s", path, r.path)
            out.append({"case": case_id, **metrics.evaluate_case(labels, ref_labels, spacing),
                        "affine_matches": same_grid})
        if on_case:
            on_case(case_id)
    if raw_rows and len(raw_rows) != len(rows):
        log.warning("only some predictions have a _raw map; box plots show the final maps only")
        raw_rows = []
    if report_dir is None:
        return rows
    # Every input was read and checked above: only now is anything written.
    report_dir.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, str] = {}  # case -> its overlay's file name, this run's only
    for case_id in common if overlays else ():
        p, r = preds[case_id], refs[case_id]
        if r.images is None:
            continue
        try:
            image, (pred_labels, ref_labels), spacing = _as_shown(
                io.read_case(r.images), io.read_label_map(p.path)[0],
                io.read_label_map(r.path)[0])
            pictures[case_id] = report.overlay_png(
                image[3], image[1], pred_labels, ref_labels,
                report_dir / f"overlay_{io.safe_case_id(case_id)}.png", case_id, spacing).name
        except ValueError as err:  # the metrics stand without the picture
            log.warning("%s: no overlay: %s", case_id, err)
    written = report.write_report(
        report_dir, rows, raw_rows=raw_rows or None,
        extra_summary={"predictions": str(Path(pred).absolute()),
                       "references": str(Path(ref).absolute())})
    report.write_index_html(report_dir, [_report_row(row, preds[row["case"]],
                                                     refs[row["case"]], pictures.get(row["case"]),
                                                     summaries[row["case"]])
                                         for row in rows],
                            f"tiramisu-brats evaluate: {Path(pred).name} against "
                            f"{Path(ref).name}", files=[p.name for p in written])
    # A replaced report's overlays and table before postprocessing that this run did not make
    # would read as this run's.
    made = {p.name for p in written} | set(pictures.values())
    for stale in [*report_dir.glob("overlay_*.png"), report_dir / "metrics_raw.csv"]:
        if stale.name not in made and stale.is_file():
            stale.unlink()
            log.info("%s: removed, from the report this one replaces", stale)
    return rows


def _as_shown(case: io.Case, *maps: np.ndarray
              ) -> tuple[np.ndarray, list[np.ndarray], tuple[float, float, float]]:
    """``case``'s image (4, X, Y, Z) and label ``maps`` (X, Y, Z) flipped and permuted to the
    BraTS orientation the pictures show (``report``), no resampling, and their voxel size."""
    view = network_grid(case.affine, case.shape, resample=False)
    return (to_network(case.image, view), [to_network(m, view) for m in maps],
            view.oriented_spacing())


def _view_command(case: Path, labels: Path) -> str:
    """The command that opens ``labels`` over the case folder ``case``, from any folder."""
    return f"tiramisu-brats view {shlex.quote(str(case.absolute()))} " \
           f"{shlex.quote(str(labels.absolute()))}"


def _read_summary(label_map: Path) -> dict:
    """The JSON summary ``segment`` wrote beside ``label_map``; ``OSError`` where there is
    none, ``ValueError`` where the file is not JSON of an object."""
    summary = json.loads(summary_path(label_map).read_text())
    if not isinstance(summary, dict):
        raise ValueError("not the summary segment writes")
    return summary


def _summary_beside(label_map: Path) -> dict:
    """``_read_summary``, or ``{}`` where there is none (or the file is not one)."""
    try:
        return _read_summary(label_map)
    except (OSError, ValueError):
        return {}


def _report_row(row: dict, pred: LabelSource, ref: LabelSource, overlay: str | None,
                summary: dict) -> dict:
    """A row of evaluate's index.html: the metrics, the prediction's QC (from ``summary``,
    the JSON ``segment`` wrote beside it, if any), the ``overlay`` (its file name, where this
    run made one) and how to view the case."""
    out = {**row, **{f"{r}_ml": row[f"volume_pred_{r}_ml"] for r in ("WT", "TC", "ET")}}
    qc = summary.get("qc") if isinstance(summary.get("qc"), dict) else {}
    out.update({"review": qc.get("review"), "qc_score": qc.get("score"), "qc_why": qc.get("why")})
    if overlay is not None:
        out["image"] = overlay
    if ref.images is not None:
        out["command"] = _view_command(ref.images.images[0].parent, pred.path)
    return out


def _check_report_dir(report_dir: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse a report folder that is an input, is a file, lies below a file, or is not empty
    (without ``overwrite``), before any work is done."""
    resolved = report_dir.resolve()
    for path in inputs:
        if resolved == path.resolve():
            raise io.InputError(f"{report_dir}: the report folder is an input ({path})")
    if report_dir.exists():
        if not report_dir.is_dir():
            raise io.InputError(f"{report_dir}: not a folder")
        if any(report_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"{report_dir}: not empty (and overwriting was not asked for)")
        return
    existing = next(p for p in report_dir.parents if p.exists())
    if not existing.is_dir():
        raise io.InputError(f"{report_dir}: {existing} is not a folder")
