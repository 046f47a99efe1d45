"""Pack a training cache small enough to travel to a GPU machine (at most 64 MiB there).

Keeps every tumor slice and every ``--stride``-th slice without tumor, then writes
``OUT.tar.xz``. Usage: python scripts/gpu/pack_cache.py CACHE_DIR OUT_DIR [--stride 2]
"""

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

from tiramisu_brats.data import cache_paths, open_cache

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("cache", type=Path)
parser.add_argument("out", type=Path)
parser.add_argument("--stride", type=int, default=2)
args = parser.parse_args()

if args.out.exists():
    shutil.rmtree(args.out)
args.out.mkdir(parents=True)
for case in open_cache(args.cache):
    tumor = np.zeros(len(case.classes), bool)
    tumor[case.tumor_slices] = True
    keep = tumor | (np.arange(len(tumor)) % args.stride == 0)
    images, classes = cache_paths(args.out, case.case_id, case.plane)
    np.save(images, np.asarray(case.images)[keep])
    np.save(classes, np.asarray(case.classes)[keep])
    meta = json.loads((args.cache / f"{case.case_id}.json").read_text())
    meta["packed_stride"] = args.stride
    (args.out / f"{case.case_id}.json").write_text(json.dumps(meta))
    print(case.case_id, case.plane, int(keep.sum()), "of", len(keep), "slices")
subprocess.run(f"tar cf - -C {args.out.parent} {args.out.name} | xz -T2 -6 > {args.out}.tar.xz",
               shell=True, check=True)
print(f"{args.out}.tar.xz", Path(f"{args.out}.tar.xz").stat().st_size / 2**20, "MiB")
