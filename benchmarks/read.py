"""Reading a case: ``io.read_case`` (each gzipped file decompressed straight into place, one
thread per modality) against nibabel's own reader (``np.asanyarray(img.dataobj)``, also one
thread per modality), the hand-written path that issue #17 asked to weigh.

Run from the repository: ``python benchmarks/read.py [FOLDER ...] [--rounds 3]`` (default: the
labelled cases of ``../shared/data``). Both readers run in rounds, one of each per case per
round, so that drift weighs on both alike; the figures are medians over cases and rounds, and
the arrays are checked to be identical. Prints a Markdown table to paste into
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from speed import cpu_name, load_average

from tiramisu_brats import io

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def nibabel_read(files: io.CaseFiles) -> np.ndarray:
    """``(4, X, Y, Z)`` in the stored dtype, as ``read_case(keep_dtype=True)`` gives BraTS."""
    images = [nib.load(p) for p in files.images]
    out = np.empty((4, *images[0].shape[:3]), images[0].get_data_dtype().newbyteorder("="))

    def one(i: int) -> None:
        out[i] = np.asanyarray(images[i].dataobj).reshape(out.shape[1:])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(4)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path,
                        default=[DATA / "brats-labeled", DATA / "brats-labeled-extra"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = [io.find_case_files(c) for f in args.folders for c in io.find_cases(f)]
    readers = {"io.read_case (streaming)": lambda f: io.read_case(f, keep_dtype=True).image,
               "nibabel": nibabel_read}
    times: dict[str, list[float]] = {name: [] for name in readers}
    for files in cases:
        a, b = (read(files) for read in readers.values())
        if not np.array_equal(a, b):
            raise SystemExit(f"{files.case_id}: the readers disagree")
    for _ in range(args.rounds):
        for files in cases:
            for name, read in readers.items():
                start = time.perf_counter()
                read(files)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["nibabel"])
    print(f"- CPU: {cpu_name()}; load average {load_average()} after.")
    print(f"- {len(cases)} cases, {args.rounds} rounds; identical arrays from both readers.\n")
    print("| reader | median s per case | max s | speed-up vs nibabel |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {max(ts):.3f} | "
              f"{base / statistics.median(ts):.2f}x |")


if __name__ == "__main__":
    main()
