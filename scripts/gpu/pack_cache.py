"""Pack labelled cases small enough to travel to a GPU machine (64 MiB a call, code included).

Each case becomes ``<case>.npz.xz``: its volume in the network's orientation, z-scored over the
brain and quantized as the training cache is (``data.quantize``), cut to the box holding brain
and tumor, stored as differences along Z (xz packs those about 17% smaller), with its labels.
Cases are dealt into folders ``OUT/part<i>`` of at most ``--part-mib`` MiB, one folder a call.
On the GPU machine ``unpack_cache.py`` builds the three planes' training cache from them with
``data.cache_volume``; the slices are z-scored again from the decoded volume, which moves 2-3 %
of the codes by 1-3 quantization steps (of 1/16 standard deviation); the classes are exact.
The 27 labelled cases pack to 78 MiB (1.9-3.5 MiB a case), in two calls' worth of parts.

Usage: python scripts/gpu/pack_cache.py OUT DATA_DIR [DATA_DIR ...] [--part-mib 40]
       [--workers 2]
"""

import argparse
import io as _io
import lzma
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from tiramisu_brats import io
from tiramisu_brats.data import find_training_cases, quantize, read_network_case
from tiramisu_brats.preprocess import brain_mask, zscore


def pack(folder: Path) -> tuple[str, bytes]:
    files = io.find_case_files(folder)
    image, labels = read_network_case(files)
    # Z-scored as `preprocess` does it, over each modality's nonzero voxels: (Z, C, X, Y) order
    z = zscore(image.transpose(3, 0, 1, 2)).transpose(1, 2, 3, 0)
    keep = brain_mask(image) | (labels > 0)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(keep))
    codes = quantize(z)[(slice(None), *box)]
    buf = _io.BytesIO()
    np.savez(buf, codes_dz=np.diff(codes, axis=3, prepend=np.uint8(0)),
             labels=np.asarray(labels, np.uint8)[box])
    return io.safe_case_id(files.case_id), lzma.compress(buf.getvalue(), preset=6)


def packed_only(out: Path) -> bool:
    """Whether ``out`` holds nothing but what this script writes (part*/ of *.npz.xz)."""
    return out.is_dir() and all(
        d.is_dir() and not d.is_symlink() and d.name.startswith("part")
        and all(f.is_file() and not f.is_symlink() and f.name.endswith(".npz.xz")
                for f in d.iterdir())
        for d in out.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("data", type=Path, nargs="+")
    parser.add_argument("--part-mib", type=float, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    try:
        cases = find_training_cases(args.data)
    except io.InputError as err:
        parser.error(str(err))
    # OUT is replaced whole, so only an earlier run's output may be deleted
    if args.out.exists() or args.out.is_symlink():
        if args.out.is_symlink() or not packed_only(args.out):
            parser.error(f"{args.out}: exists and is not what pack_cache writes (part*/ folders "
                         "of *.npz.xz only): name a new or empty folder")
        shutil.rmtree(args.out)
    part, size = 0, 0.0
    with ProcessPoolExecutor(args.workers) as pool:
        for case_id, blob in pool.map(pack, cases.values()):
            mib = len(blob) / 2**20
            if size and size + mib > args.part_mib:
                part, size = part + 1, 0.0
            size += mib
            folder = args.out / f"part{part}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{case_id}.npz.xz").write_bytes(blob)
            print(f"{case_id}: {mib:.2f} MiB -> part{part} ({size:.1f} MiB)", flush=True)


if __name__ == "__main__":
    main()
