"""Fewer window sizes: the seconds of the default path's network pass against ``SHAPE_COST``.

Run from anywhere: ``python benchmarks/window_sizes.py [--cases DIR ...] [--costs 0,...]
[--runs 3]``. For each case and each value of ``preprocess.brain_windows``'s ``shape_cost``
(``whole``: whole slices, one size) a fresh process reads the case, builds the default
``Segmenter`` and times its first ``infer.predict_labels`` over the brain windows with tumor
slices, as ``segment`` runs it once per case: the runtime meets every window size for the
first time there (OpenVINO prepares its kernels per input shape); then the same pass again, in
the same process. Runs go in rounds (every case and cost once per round); the table gives the
median. Prints a markdown table; docs/benchmarks.md "Fewer window sizes" holds one.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CASES = [DATA / "brats-labeled" / "BraTS2021_00006", DATA / "brats-labeled" / "BraTS2021_00014",
         DATA / "brats-labeled-extra" / "Brats18_CBICA_AOP_1",
         DATA / "brats-labeled" / "Brats18_TCIA02_606_1"]


def child(case: Path, cost: str) -> None:
    """One measurement, printed as JSON: sizes, window pixels, slices run, seconds of the
    first and the second pass."""
    from tiramisu_brats import infer, io, preprocess
    from tiramisu_brats.api import Segmenter

    image = io.read_case(io.find_case_files(case)).image
    backend = Segmenter().backend
    slices, _ = preprocess.preprocess(image)
    if cost == "whole":
        full = (slice(0, slices.shape[2]), slice(0, slices.shape[3]))
        windows = [full if w else None for w in preprocess.brain_windows(slices)]
    else:
        windows = preprocess.brain_windows(slices, shape_cost=int(cost))
    sizes = {(w[0].stop - w[0].start, w[1].stop - w[1].start) for w in windows if w}
    stats: dict[str, int] = {}
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        infer.predict_labels(backend, slices, windows=windows, tumor_slices=True, stats=stats)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds[0], "again": seconds[1], "sizes": len(sizes),
                      "pixels": sum((w[0].stop - w[0].start) * (w[1].stop - w[1].start)
                                    for w in windows if w), "run": stats["run"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, nargs="+", default=CASES)
    parser.add_argument("--costs", default="0,30000,60000,120000,whole")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return
    from speed import cpu_name  # benchmarks/speed.py, beside this file

    from tiramisu_brats import infer
    from tiramisu_brats.preprocess import SHAPE_COST

    costs = args.costs.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    for i in range(args.runs):
        for case in args.cases:
            for cost in costs:
                cmd = [sys.executable, __file__, "--child", str(case), str(cost)]
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                except subprocess.CalledProcessError as err:  # its stderr says why
                    sys.stderr.write(err.stderr)
                    sys.exit(f"failed ({err.returncode}): {shlex.join(cmd)}")
                runs.setdefault((case.name, cost), []).append(json.loads(out.splitlines()[-1]))
                print(f"round {i + 1}, {case.name}, cost {cost}: "
                      f"{runs[case.name, cost][-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
    command = shlex.join(["python", "benchmarks/window_sizes.py", *sys.argv[1:]])
    print(f"`{command}`: CPU {cpu_name()}, {infer.cpu_count()} cores; default `SHAPE_COST` "
          f"{SHAPE_COST}; "
          f"median of {args.runs} fresh processes per cell: seconds of the first network pass "
          "over the case / of the same pass again in the same process (distinct window sizes, "
          "window megapixels over the brain slices). `whole`: whole 192 x 160 slices.\n")
    print("| case | slices run | " + " | ".join(
        "whole slices" if c == "whole" else f"shape_cost {c}" for c in costs) + " |")
    print("|---|---:|" + "---:|" * len(costs))
    means = {c: [] for c in costs}
    for case in args.cases:
        cells = []
        for cost in costs:
            done = runs[case.name, cost]
            seconds = statistics.median(r["seconds"] for r in done)
            again = statistics.median(r["again"] for r in done)
            means[cost].append((seconds, again))
            cells.append(f"{seconds:.2f} / {again:.2f} ({done[0]['sizes']}, "
                         f"{done[0]['pixels'] / 1e6:.2f})")
        print(f"| {case.name} | {runs[case.name, costs[0]][0]['run']} | " + " | ".join(cells)
              + " |")
    print("| mean | | " + " | ".join(
        " / ".join(f"{statistics.mean(m[k] for m in means[c]):.2f}" for k in (0, 1))
        for c in costs) + " |")


if __name__ == "__main__":
    main()
