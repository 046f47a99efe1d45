"""Score the inference recipes (views, postprocessing rules) and QC scores on labelled cases.

For each case the network's probabilities are computed once per view (axial, coronal,
sagittal; each also flipped left-right; and the three planes of the weights' partner where
accurate mode has one, ``export.partner``) with ``api.Segmenter.view_probabilities``, then every
combination of views is fused, postprocessed (with and without the rule that relabels a small
enhancing region as necrosis) and scored against the expert; per-region rules (``RULES``:
holes in the tumor core filled, small core or enhancing components dropped) on the labels by
each combination's decision (the weights' labelling rule). Also the QC score candidates:
the spread of the whole-tumor probability across views inside the predicted tumor.

Usage:
  python scripts/ablation.py --cases ID,ID,... [--model W] [--partner W2]
                             [--data-root ../shared/data] [--json OUT.json]
                             [--precision fp32|bf16|int8] [--view-margin N]
                             [--qc-threshold T]
Prints Markdown tables (per case and means).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.stats import spearmanr

from tiramisu_brats import api, io, metrics
from tiramisu_brats.data import labelled_cases
from tiramisu_brats.infer import region_labels
from tiramisu_brats.metrics import region_dice
from tiramisu_brats.postprocess import postprocess

# views as (plane, flipped, model): model 1 the partner (api.PARTNER_VIEWS)
VIEWS = [(p, f, 0) for p in ("axial", "coronal", "sagittal") for f in (False, True)]
COMBOS = {
    "axial (fast)": [("axial", False, 0)],
    "axial + flip": [("axial", False, 0), ("axial", True, 0)],
    "3 planes": [("axial", False, 0), ("coronal", False, 0), ("sagittal", False, 0)],
    "3 planes + flips": VIEWS,
}
FAST, ACCURATE = "axial (fast)", "3 planes + flips"  # ACCURATE: without a partner
MIN_ET = (0, 100, 250, 500)
KEEP = (0.5, 1.0)  # postprocess keeps components of this share of the largest (default 0.1)
REGION_T = (0.2, 0.25, 0.3, 0.35, 0.4, 0.5)  # on the region probabilities


def relabel_small_et(labels: np.ndarray, n: int) -> np.ndarray:
    if n and 0 < (labels == 4).sum() < n:
        labels = labels.copy()
        labels[labels == 4] = 1
    return labels


def fill_core(labels: np.ndarray, axes: tuple[int, ...] = ()) -> np.ndarray:
    """Holes of the tumor core (1, 4) relabelled necrosis: in 3-D, or in every slice of ``axes``."""
    core = np.isin(labels, (1, 4))
    filled = core
    for axis in axes:
        filled = filled | np.stack([ndimage.binary_fill_holes(s)
                                    for s in np.moveaxis(core, axis, 0)], axis)
    if not axes:
        filled = ndimage.binary_fill_holes(core)
    out = labels.copy()
    out[filled & ~core] = 1
    return out


def keep_components(labels: np.ndarray, region: tuple[int, ...], share: float,
                    to: int) -> np.ndarray:
    """Components (26-connected) of ``region`` below ``share`` of its largest relabelled ``to``."""
    comp, n = ndimage.label(np.isin(labels, region), np.ones((3, 3, 3), bool))
    if n <= 1:
        return labels
    sizes = np.bincount(comp.ravel())[1:]
    out = labels.copy()
    out[np.isin(comp, 1 + np.flatnonzero(sizes < share * sizes.max()))] = to
    return out


# per-region rules tried on the postprocessed labels (issue 13, item 9)
RULES = {
    "core holes filled (3-D)": fill_core,
    "core holes filled (slices of 3 planes)": lambda labels: fill_core(labels, (0, 1, 2)),
    "core: largest component (others edema)": lambda labels: keep_components(labels, (1, 4), 1, 2),
    "core: components >= 10 % of largest": lambda labels: keep_components(labels, (1, 4), .1, 2),
    "enhancing: largest component (others necrosis)":
        lambda labels: keep_components(labels, (4,), 1, 1),
    "enhancing: components >= 10 % of largest": lambda labels: keep_components(labels, (4,), .1, 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--partner", type=Path, default=None,
                        help="weights to fuse with the model's in accurate mode (default: its "
                             "partner beside it, export.partner, if any)")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--precision", default=None,
                        help="openvino's precision (default: segment's, infer.choose_precision)")
    parser.add_argument("--qc-threshold", type=float, default=None,
                        help="score the QC candidates inside the tumor of region_labels(T) "
                             "(default: the model's decision, export.decision)")
    parser.add_argument("--view-margin", type=int, default=api.VIEW_MARGIN,
                        help="accurate mode's margin around the first view's tumor box, for "
                             "its table as segment runs it (default: api.VIEW_MARGIN)")
    args = parser.parse_args()
    api.VIEW_MARGIN = args.view_margin
    try:  # e.g. no such --data-root, an unknown case
        folders = labelled_cases(args.data_root, args.cases)
    except io.InputError as err:
        parser.error(str(err))
    wanted = list(folders)
    seg = api.Segmenter(args.model, precision=args.precision)
    accurate = api.Segmenter(args.model, precision=args.precision, mode="accurate",  # tumor slices
                             partner=args.partner)
    print(f"precision {seg.backend.precision} ({seg.backend.why})", flush=True)
    combos, views, acc_name = dict(COMBOS), list(VIEWS), ACCURATE
    if accurate.partner is not None:
        acc_name = "3 planes + partner's 3 planes"
        combos[acc_name] = list(accurate.views)
        # the two models on axial slices: what fast mode would gain from the partner
        combos["axial + partner's axial"] = [("axial", False, 0), ("axial", False, 1)]
        views += [v for v in accurate.views if v[2]]
        print(f"partner {accurate.partner}: {accurate.partner_backend.precision}", flush=True)
    # the labelling rule and QC threshold of each mode: accurate's are the partner's, if any
    rules = {name: accurate if name == acc_name else seg for name in combos}
    qc_threshold = {name: r.threshold if args.qc_threshold is None else args.qc_threshold
                    for name, r in rules.items()}
    chosen = {name: "post" if r.threshold is None else f"post_regions_{r.threshold:g}"
              for name, r in rules.items()}
    # the weights' own thresholds too, which the tables read (chosen) and REGION_T may lack
    region_t = sorted({*REGION_T, *(r.threshold for r in (seg, accurate)
                                    if r.threshold is not None)})
    rows = []
    for case_id in wanted:
        files = io.find_case_files(folders[case_id])
        case = io.read_case(files, keep_dtype=True)
        ref = io.read_label_map(files.seg)[0]
        t0 = time.perf_counter()
        probs = {(p, f, m): accurate.view_probabilities(case.image, p, f, model=m)
                 for p, f, m in views}
        seconds = time.perf_counter() - t0
        row = {"case": case_id, "seconds_all_views": seconds}
        for name, combo in combos.items():
            fused = sum(probs[v] for v in combo) / len(combo)
            raw = io.CLASS_TO_LABEL[fused.argmax(0)]
            post = postprocess(raw)
            row[name] = {"raw": region_dice(raw, ref), "post": region_dice(post, ref),
                         **{f"post_min_et_{n}": region_dice(relabel_small_et(post, n), ref)
                            for n in MIN_ET if n},
                         **{f"post_keep_{k}": region_dice(postprocess(raw, keep_fraction=k), ref)
                            for k in KEEP},
                         **{f"post_regions_{t:g}": region_dice(
                             postprocess(region_labels(fused, t)), ref) for t in region_t}}
            decided = (post if rules[name].threshold is None
                       else postprocess(region_labels(fused, rules[name].threshold)))
            row[name].update({f"rule: {r}": region_dice(f(decided), ref) for r, f in RULES.items()})
            wt = np.stack([1 - probs[v][0] for v in combo])  # whole-tumor probability per view
            inside = postprocess(region_labels(fused, qc_threshold[name])) > 0
            row[name]["wt_ml"] = float(inside.sum() / 1000)
            row[name]["ref_wt_ml"] = float((ref > 0).sum() / 1000)
            if len(combo) > 1 and inside.any():
                row[name]["qc_spread"] = float(wt.std(0)[inside].mean())
                union = (wt > 0.5).any(0)
                row[name]["qc_spread_union"] = float(wt.std(0)[union].mean())
                row[name]["qc_volume_agreement"] = float(inside.sum() / max(union.sum(), 1))
                row[name]["qc_view_dice"] = float(np.mean([
                    metrics.Confusion.from_masks(w > 0.5, inside).dice for w in wt]))
            p = fused[1:].sum(0)[inside] if inside.any() else np.ones(1)
            row[name]["qc_mean_wt_prob"] = float(p.mean())
            ent = -(fused * np.log(np.clip(fused, 1e-6, 1))).sum(0)
            row[name]["qc_entropy"] = float(ent[inside].mean()) if inside.any() else 0.0
        t0 = time.perf_counter()
        near = accurate.segment(case.image)
        row["accurate_tumor_slices"] = {
            "dice": region_dice(near.labels, ref), "seconds": time.perf_counter() - t0,
            "run": near.slices["run"], "brain": near.slices["brain"],
            "voxels_unlike_every_slice": int(np.count_nonzero(
                near.labels != postprocess(region_labels(
                    sum(probs[v] for v in accurate.views) / len(accurate.views),
                    accurate.threshold))))}
        rows.append(row)
        print(f"{case_id}: {seconds:.1f} s for {len(views)} views; "
              + "; ".join(f"{n}: WT {row[n]['post']['WT']:.3f} TC {row[n]['post']['TC']:.3f} "
                          f"ET {row[n]['post']['ET']:.3f}" for n in combos), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": str(seg.weights), "sha256": seg.model_info()
                                         ["sha256"], "accurate": accurate.model_info(),
                                         "rows": rows}, indent=1))
    print("\n| recipe | stage | Dice WT | Dice TC | Dice ET | mean |")
    print("|---|---|---:|---:|---:|---:|")
    for name in combos:
        for stage in ("raw", "post", *(f"post_min_et_{n}" for n in MIN_ET if n),
                      *(f"post_keep_{k}" for k in KEEP),
                      *(f"post_regions_{t:g}" for t in region_t),
                      *(f"rule: {r}" for r in RULES)):
            m = {r: float(np.mean([row[name][stage][r] for row in rows]))
                 for r in ("WT", "TC", "ET")}
            print(f"| {name} | {stage} | {m['WT']:.3f} | {m['TC']:.3f} | {m['ET']:.3f} | "
                  f"{np.mean(list(m.values())):.3f} |")
    print(f"\n(rule: on the postprocessed labels by each row's decision, {chosen})")
    print(f"\nPer case, labels by each mode's decision (fast {chosen[FAST]}, accurate "
          f"{acc_name} {chosen[acc_name]}); QC inside the tumor of accurate's labels:")
    print("\n| case | fast: Dice WT / TC / ET | accurate: Dice WT / TC / ET | QC spread "
          "(accurate) | predicted / expert WT ml |")
    print("|---|---|---|---:|---|")
    for row in rows:
        fast, acc = row[FAST][chosen[FAST]], row[acc_name][chosen[acc_name]]
        print(f"| {row['case']} | " + " / ".join(f"{fast[r]:.3f}" for r in fast)
              + " | " + " / ".join(f"{acc[r]:.3f}" for r in acc)
              + f" | {row[acc_name].get('qc_spread', float('nan')):.3f} | "
              f"{row[acc_name]['wt_ml']:.1f} / {row[acc_name]['ref_wt_ml']:.1f} |")
    print("\n`--mode accurate` as segment runs it (the views after the first near its tumor, "
          f"VIEW_MARGIN {api.VIEW_MARGIN}) against every slice of every view, labels by "
          "accurate mode's decision:")
    print("\n| case | slices run / brain slices | seconds | voxels unlike every slice's | "
          "Dice WT / TC / ET |")
    print("|---|---|---:|---:|---|")
    for row in rows:
        a = row["accurate_tumor_slices"]
        print(f"| {row['case']} | {a['run']} / {a['brain']} | {a['seconds']:.1f} | "
              f"{a['voxels_unlike_every_slice']} | "
              + " / ".join(f"{a['dice'][r]:.3f}" for r in a["dice"]) + " |")
    near = [row["accurate_tumor_slices"] for row in rows]
    means = {r: np.mean([a["dice"][r] for a in near]) for r in near[0]["dice"]}
    every = {r: np.mean([row[acc_name][chosen[acc_name]][r] for row in rows]) for r in means}
    print("| mean (every slice of every view: "
          + " / ".join(f"{every[r]:.4f}" for r in every) + f", {np.mean(list(every.values())):.4f})"
          f" | {sum(a['run'] for a in near)} / {sum(a['brain'] for a in near)} | "
          f"{sum(a['seconds'] for a in near):.1f} | "
          f"{sum(a['voxels_unlike_every_slice'] for a in near)} | "
          + " / ".join(f"{means[r]:.4f}" for r in means)
          + f" ({np.mean(list(means.values())):.4f}) |")
    print("\nQC (Spearman with Dice WT / with mean Dice, labels by each mode's decision):")
    for name in combos:
        dwt = [row[name][chosen[name]]["WT"] for row in rows]
        dmean = [np.mean(list(row[name][chosen[name]].values())) for row in rows]
        for key in ("qc_spread", "qc_spread_union", "qc_volume_agreement", "qc_view_dice",
                    "qc_mean_wt_prob", "qc_entropy"):
            vals = [row[name].get(key) for row in rows]
            if None in vals:
                continue
            sign = -1 if key.startswith(("qc_spread", "qc_entropy")) else 1  # large: likely wrong
            print(f"  {name} {key}: {spearmanr(np.multiply(sign, vals), dwt)[0]:.2f} / "
                  f"{spearmanr(np.multiply(sign, vals), dmean)[0]:.2f}")


if __name__ == "__main__":
    main()
