"""Cohort memory: does one ``tiramisu-brats segment COHORT -o OUT`` process keep a flat RSS?

Builds a cohort of ``--cases`` N cases (default 40) from the real cases in
``../shared/data/brats-labeled``, repeated under new ids: every case is a real folder of
symlinks, named for the new id, to the files of a real case (nothing is copied). Then runs ONE
``tiramisu-brats segment COHORT -o OUT --no-progress`` process, samples its resident set size
(psutil when installed, else ``VmRSS`` of ``/proc/PID/status``) every ``--interval`` seconds,
and follows the progress in OUT (a case is finished when its ``<id>.json`` summary appears: it
is written last). Reports the peak RSS after 5, 10, 20 and 40 cases (those <= N), the peak
within each stretch and a least-squares slope of the per-case peak over the cases, and writes
them to ``docs/benchmarks.md``, section "Cohort memory" (only that section is replaced).

    python benchmarks/cohort_memory.py                 # 40 cases, shipped model: long on CPU
    python benchmarks/cohort_memory.py --cases 10      # fewer cases
    python benchmarks/cohort_memory.py --tiny-model    # a tiny random network: fast; the
                                                       # per-case data path is what could leak
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "brats-labeled"
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Cohort memory"
MILESTONES = (5, 10, 20, 40)
MIB = 1024 * 1024


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes, or None once it has exited."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def build_cohort(data: Path, cohort: Path, n: int) -> list[tuple[str, str]]:
    """``n`` case folders in ``cohort``, ``case000`` .. , each of symlinks to the images of a
    real case (cycling through them); returns (new id, source id) pairs."""
    from tiramisu_brats import io

    sources = [io.find_case_files(f) for f in io.find_cases(data)]
    made = []
    for i in range(n):
        src = sources[i % len(sources)]
        new_id = f"case{i:03d}"
        folder = cohort / new_id
        folder.mkdir(parents=True)
        for image in src.images:  # the segmentation is not needed
            name = image.name
            assert name.startswith(src.case_id), name
            (folder / (new_id + name[len(src.case_id) :])).symlink_to(image.resolve())
        made.append((new_id, src.case_id))
    return made


def tiny_model(path: Path) -> Path:
    import torch

    from tiramisu_brats.model import Tiramisu, TiramisuConfig, save_weights

    torch.manual_seed(0)
    config = TiramisuConfig(first_conv=8, down_blocks=(2, 2), bottleneck=2, up_blocks=(2, 2),
                            growth_rate=4)
    return save_weights(Tiramisu(config).eval(), path)


def run(cohort: Path, out: Path, model: Path | None, interval: float, log_path: Path,
        backend: str):
    """Run the segmentation; returns samples (seconds, rss bytes, cases finished), the
    finish time of each case, the exit status and the wall time."""
    cmd = [sys.executable, "-m", "tiramisu_brats", "segment", str(cohort), "-o", str(out),
           "--backend", backend, "--no-progress"]
    if model is not None:
        cmd += ["--model", str(model)]
    print("running:", " ".join(cmd), flush=True)
    samples: list[tuple[float, int, int]] = []
    finished: dict[str, float] = {}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while True:
            t = time.perf_counter() - start
            for p in out.glob("case*.json") if out.is_dir() else ():
                if p.stem not in finished:
                    finished[p.stem] = t
                    print(f"  {len(finished):3d} cases done at {t:7.1f} s", flush=True)
            rss = rss_bytes(proc.pid)
            if proc.poll() is not None:
                break
            if rss is not None:
                samples.append((t, rss, len(finished)))
            time.sleep(interval)
    for p in out.glob("case*.json"):
        finished.setdefault(p.stem, time.perf_counter() - start)
    return samples, finished, proc.returncode, time.perf_counter() - start


def analyse(samples, n_done: int) -> tuple[list[dict], list[float]]:
    """Per milestone: peak RSS up to it and within the stretch before it; and the peak RSS
    while each case ran (MiB, indexed by the case being processed)."""
    per_case: list[float] = [0.0] * n_done
    for _, rss, done in samples:
        if done < n_done:
            per_case[done] = max(per_case[done], rss / MIB)
    rows, prev = [], 0
    for k in (m for m in MILESTONES if m <= n_done):
        upto = [rss for _, rss, done in samples if done < k]
        stretch = [rss for _, rss, done in samples if prev <= done < k]
        at = [t for t, _, done in samples if done < k]
        rows.append({"cases": k, "seconds": max(at) if at else float("nan"),
                     "peak_mib": max(upto) / MIB if upto else float("nan"),
                     "stretch": f"{prev + 1}-{k}",
                     "stretch_peak_mib": max(stretch) / MIB if stretch else float("nan")})
        prev = k
    return rows, per_case


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) / 1024**2
    except (OSError, StopIteration):
        mem = float("nan")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, load average "
            f"{load:.1f} at the start")


INTRO = (
    "One `tiramisu-brats segment COHORT -o OUT --no-progress` process over a cohort of real "
    "cases (those of `../shared/data/brats-labeled`, images only, repeated under new ids "
    "through folders of symlinks), its RSS sampled over time; written by "
    "`benchmarks/cohort_memory.py` (one subsection per model and cohort size, replaced by a "
    "new run of the same kind). The question: does RSS grow with the number of cases? The "
    "first cases warm up torch's and the memory allocator's caches, so judge by the slope over "
    "the second half of the run and by the same real case one pass later."
)


def run_block(args, cohort_ids, model_kind, model_desc, samples, finished, code, wall) -> str:
    """The subsection of one run: ``### <model kind>, <N> cases``."""
    n_done = len(finished)
    rows, per_case = analyse(samples, n_done)
    n_sources = len({src for _, src in cohort_ids})
    case_seconds = sorted(finished.values())
    per = [b - a for a, b in zip([0.0, *case_seconds], case_seconds, strict=False)]
    command = f"python benchmarks/cohort_memory.py --cases {args.cases}" + (
        " --tiny-model" if args.tiny_model else "") + (
        f" --model {args.model}" if args.model and not args.tiny_model else "") + (
        f" --backend {args.backend}" if args.backend != "openvino" else "")
    lines = [
        f"### {model_kind}, {len(cohort_ids)} cases",
        "",
        f"`{command}` on {dt.date.today().isoformat()}: {len(cohort_ids)} cases made from "
        f"{n_source_text(n_sources)}; RSS sampled every {args.interval:g} s "
        f"({'psutil' if _has_psutil() else '/proc/PID/status VmRSS'}).",
        "",
        f"- Machine: {getattr(args, 'machine', None) or machine()}; CPU inference ({args.backend} "
        "backend).",
        f"- Model: {model_desc}.",
        f"- Result: exit status {code}, {n_done} of {len(cohort_ids)} cases segmented in "
        f"{wall:.0f} s ({(sum(per[1:]) / max(len(per) - 1, 1)):.1f} s per case after the first,"
        f" first case {per[0] if per else float('nan'):.1f} s including start-up).",
        "",
    ]
    if rows:
        lines += [
            "| cases done | at (s) | peak RSS so far (MiB) | cases in stretch | peak RSS in "
            "stretch (MiB) |",
            "|---:|---:|---:|---:|---:|",
            *(f"| {r['cases']} | {r['seconds']:.0f} | {r['peak_mib']:.0f} | {r['stretch']} | "
              f"{r['stretch_peak_mib']:.0f} |" for r in rows),
            "",
        ]
    lines += analysis_lines(per_case, n_sources)
    if args.cases < 40:
        lines += ["", f"Run with `--cases {args.cases}`, fewer than the default 40."]
    return "\n".join(lines) + "\n"


def _slope(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (NaN with fewer than 2 points)."""
    if len(xs) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)


def analysis_lines(per_case: list[float], n_sources: int) -> list[str]:
    """What the per-case peaks say: all of them, slopes over cases 2-N and over the second
    half, and (when the real cases repeat) the same source case one pass later."""
    n = len(per_case)
    lines = [f"Peak RSS while each case ran (MiB, case 1 to {n}): "
             + ", ".join(f"{v:.0f}" for v in per_case) + ".", ""]
    if n < 3:
        return [*lines, "Too few cases for a trend."]
    all_slope = _slope(list(range(2, n + 1)), per_case[1:])
    half = n // 2 + 1
    late = _slope(list(range(half, n + 1)), per_case[half - 1 :]) if n >= 10 else all_slope
    lines.append(f"Least-squares slope of the per-case peak: **{all_slope:+.2f} MiB per case** "
                 f"over cases 2-{n}" + (f", **{late:+.2f} MiB per case** over cases {half}-{n}"
                                        if n >= 10 else "") + ".")
    passes = []
    for k in range(1, (n - 1) // n_sources + 1):
        diffs = [per_case[i] - per_case[i - n_sources]
                 for i in range(k * n_sources, min((k + 1) * n_sources, n))]
        passes.append(f"pass {k} to {k + 1}: {sum(diffs) / len(diffs):+.0f} MiB on average over "
                      f"{len(diffs)} case{'s' if len(diffs) > 1 else ''}")
    if passes:
        lines.append(f"The cohort cycles through the {n_source_text(n_sources)}; the same real "
                     f"case one pass later peaks at: {'; '.join(passes)}.")
    if n < 20:
        verdict = (f"**too short to judge alone**: with fewer than 20 cases the warm-up of the "
                   f"first cases (torch and allocator caches) dominates; the slope over cases "
                   f"{half}-{n} is {late:+.2f} MiB per case")
    elif abs(late) < 1.5:
        verdict = ("**flat**: after the first cases (torch and allocator warm-up) RSS does not "
                   "grow with the number of cases" if all_slope >= 1.5 else
                   "**flat**: RSS does not grow with the number of cases")
    else:
        verdict = "**growing** with the number of cases: look for a leak"
    lines += ["", f"Verdict: {verdict}."]
    return lines


def n_source_text(n: int) -> str:
    return f"{n} real case{'s' if n != 1 else ''}"


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def write_section(doc: Path, block: str) -> None:
    """Put ``block`` (a ``### `` subsection) into the "Cohort memory" section of ``doc``,
    replacing the subsection of the same heading; the rest of the file is left as it is."""
    from tiramisu_brats import io

    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    found = pattern.search(old)
    blocks: dict[str, str] = {}
    if found:
        for part in re.split(r"(?m)^(?=### )", found.group(0))[1:]:
            blocks[part.splitlines()[0]] = part.strip("\n") + "\n"
    blocks[block.splitlines()[0]] = block
    text = SECTION + "\n\n" + INTRO + "\n\n" + "\n".join(blocks.values())
    if found:
        new = old[: found.start()] + text + "\n" + old[found.end():]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    io.atomic_write_text(doc, new.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=40, help="cohort size (default 40)")
    parser.add_argument("--data", type=Path, default=DATA, help="folder of real case folders")
    parser.add_argument("--model", type=Path, help="weights (default: the shipped model)")
    parser.add_argument("--tiny-model", action="store_true",
                        help="use a tiny random network instead (fast)")
    parser.add_argument("--interval", type=float, default=0.2, help="RSS sampling period (s)")
    parser.add_argument("--backend", default="openvino",
                        help="segment's backend (default openvino, segment's own default)")
    parser.add_argument("--workdir", type=Path, help="where to build the cohort (default: tmp)")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file to update")
    parser.add_argument("--no-doc", action="store_true", help="print the section only")
    args = parser.parse_args()
    if args.cases < 1:
        parser.error("--cases must be >= 1")
    if not args.data.is_dir():
        print(f"{args.data}: real data not found", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "src"))  # this checkout's package, for the helpers above
    work = Path(tempfile.mkdtemp(prefix="cohort-memory-", dir=args.workdir))
    try:
        cohort_ids = build_cohort(args.data, work / "cohort", args.cases)
        from tiramisu_brats.export import default_weights

        model = args.model
        if args.tiny_model:
            model = tiny_model(work / "tiny.safetensors")
            model_kind = "Tiny random model"
            model_desc = ("a tiny random Tiramisu (first_conv 8, blocks (2, 2), growth 4): "
                          "fast, and the per-case data path (read, preprocess, postprocess, "
                          "write) is what could leak")
        else:
            weights = model or default_weights()
            if not weights.is_file():
                print(f"{weights}: no weights; pass --model or --tiny-model", file=sys.stderr)
                return 2
            digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
            shown = weights.relative_to(REPO) if weights.is_relative_to(REPO) else weights
            model_kind = "Shipped model" if model is None else f"Model {weights.name}"
            model_desc = f"`{shown}` (sha256 {digest}…)"
        args.machine = machine()  # the load average before the run
        samples, finished, code, wall = run(work / "cohort", work / "out", model,
                                            args.interval, work / "segment.log", args.backend)
        if code != 0:
            print((work / "segment.log").read_text()[-3000:], file=sys.stderr)
        text = run_block(args, cohort_ids, model_kind, model_desc, samples, finished, code,
                         wall)
        print(text)
        if not args.no_doc:
            write_section(args.doc, text)
            print(f"wrote {text.splitlines()[0]!r} in section {SECTION!r} of {args.doc}")
        return 0 if code == 0 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
