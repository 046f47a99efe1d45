"""Build the training cache (three planes) from folders written by ``pack_cache.py``.

Usage: python scripts/gpu/unpack_cache.py CACHE_DIR PACKED_DIR [PACKED_DIR ...]
"""

import argparse
import hashlib
import io as _io
import lzma
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from tiramisu_brats.data import cache_volume, dequantize


def unpack(args: tuple[Path, Path]) -> str:
    path, cache_dir = args
    blob = path.read_bytes()
    arrays = np.load(_io.BytesIO(lzma.decompress(blob)))
    codes = np.cumsum(arrays["codes_dz"], axis=3, dtype=np.uint8)  # wraps as the diff did
    case_id = path.name.removesuffix(".npz.xz")
    cache_volume(case_id, dequantize(codes), arrays["labels"], cache_dir,
                 "packed:" + hashlib.sha256(blob).hexdigest()[:16])
    return case_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cache", type=Path)
    parser.add_argument("packed", type=Path, nargs="+")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    jobs = [(p, args.cache) for d in args.packed for p in sorted(d.glob("*.npz.xz"))]
    with ProcessPoolExecutor(args.workers) as pool:
        for case_id in pool.map(unpack, jobs):
            print("cached", case_id, flush=True)


if __name__ == "__main__":
    main()
