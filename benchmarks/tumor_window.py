"""Fast mode's later tumor passes on one window around the tumor found so far (issue #15, item 3),
against each slice's brain window: seconds of ``infer.predict_labels`` in process and how the
postprocessed labels change, on every labelled case.

Usage: python benchmarks/tumor_window.py MARGIN[,MARGIN...] [FOLDER ...]
(default folders: ../shared/data/brats-labeled and brats-labeled-extra). Each margin is
``infer.predict_labels``'s ``tumor_margin``: pixels added on every side of the tumor's bounding
box before the window is grown to multiples of 32.
"""

import sys
import time

from tiramisu_brats import api, infer, io
from tiramisu_brats.data import find_training_cases
from tiramisu_brats.metrics import region_dice
from tiramisu_brats.postprocess import postprocess
from tiramisu_brats.preprocess import brain_windows, to_network, uncrop

margins = [int(m) for m in sys.argv[1].split(",")]
folders = sys.argv[2:] or ["../shared/data/brats-labeled", "../shared/data/brats-labeled-extra"]
seg = api.Segmenter(None)
model, flags = infer.cpu_info()
isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
       if f in flags]
print(f"precision {seg.backend.precision} ({seg.backend.why}); CPU {model} with "
      f"{', '.join(isa)}", flush=True)
totals = {m: [0, 0.0] for m in [None, *margins]}
worst = dict.fromkeys(margins, 0.0)
for folder in find_training_cases(folders):
    files = io.find_case_files(folder)
    prep = api.prepare_case(io.read_case(files))
    ref = to_network(io.read_label_map(files.seg)[0], prep.grid)
    windows = brain_windows(prep.slices, seg.margin)
    runs = {}
    for m in [None, *margins]:
        stats: dict = {}
        t0 = time.perf_counter()
        raw = infer.predict_labels(seg.backend, prep.slices, windows=windows, tumor_slices=True,
                                   stats=stats, threshold=seg.threshold, tumor_margin=m)
        seconds = time.perf_counter() - t0
        runs[m] = postprocess(uncrop(raw, prep.geometry)), seconds
        totals[m][0] += stats["run"]
        totals[m][1] += seconds
    base = region_dice(runs[None][0], ref)
    line = f"{files.case_id}: brain windows {runs[None][1]:.2f} s"
    for m in margins:
        dice = region_dice(runs[m][0], ref)
        change = max(abs(dice[r] - base[r]) for r in base)
        worst[m] = max(worst[m], change)
        line += (f" | margin {m}: {runs[m][1]:.2f} s, {(runs[m][0] != runs[None][0]).sum()} "
                 f"voxels differ, largest Dice change {change:.4f}")
    print(line, flush=True)
for m, (slices, seconds) in totals.items():
    label = "brain windows" if m is None else f"margin {m}"
    change = "" if m is None else f", largest Dice change {worst[m]:.4f}"
    print(f"{label}: {slices} slices run, {seconds:.1f} s{change}")
