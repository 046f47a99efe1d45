"""Build the training cache (three planes) from folders written by ``pack_cache.py``.

Usage: python scripts/gpu/unpack_cache.py CACHE_DIR PACKED_DIR [PACKED_DIR ...] [--workers 8]
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
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("packed", type=Path, nargs="+")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    # a wrong or empty PACKED would otherwise leave a cache short of its cases, silently
    for d in args.packed:
        if not d.is_dir():
            parser.error(f"{d}: not a folder")
        if not any(d.glob("*.npz.xz")):
            parser.error(f"{d}: holds no *.npz.xz (pack_cache.py's part<i> folders hold them)")
    args.cache.mkdir(parents=True, exist_ok=True)
    jobs = [(p, args.cache) for d in args.packed for p in sorted(d.glob("*.npz.xz"))]
    with ProcessPoolExecutor(args.workers) as pool:
        for case_id in pool.map(unpack, jobs):
            print("cached", case_id, flush=True)


if __name__ == "__main__":
    main()
