"""CPU inference: seconds per patient, stages, memory and Dice for every backend and precision.

Run from anywhere: ``python benchmarks/speed.py [--case DIR] [--runs 3] [--model PATH]
[--threads N] [--configs BACKEND:PRECISION[:whole][:all][:accurate],...]``.
Each measured run is a fresh ``tiramisu-brats segment CASE -o OUT --overwrite --no-progress
--backend B [--precision P] --whole-slices|--brain-windows --all-slices|--tumor-slices``
process (interpreter start and imports included); one unmeasured run per configuration first
makes its cached files (ONNX export, int8 model, OpenVINO compiled model), which a user pays
once. The measured runs go in rounds, one of every configuration per round, so that the
machine's drift weighs on all alike; the table gives the median and each run. Stage seconds come
from the JSON the command writes beside the label map, peak memory from the child's rusage.
The reference is PyTorch eager in fp32 on every whole slice (the paper's pipeline), run in the
same benchmark: the speed-up of every configuration is against it, and so is its Dice: against
the reference's label map (agreement) and, when the case has an expert segmentation, the change
of its Dice against the expert's.

``--accuracy-cases FOLDER [FOLDER ...]`` adds, in process, the Dice against the expert of the
reference and of the faster paths on every labelled case there: the default must stay within
0.01 of the reference on every case.

``--cohort FOLDER`` adds one default ``segment`` process over a folder of cases: seconds per
case, cores kept busy, and how long each case waited for its reading.

``--demo`` adds, in rounds as above, ``tiramisu-brats demo`` against ``segment`` of the
synthetic case the demo writes and of ``--case`` (a real case of the same size): the seconds
the demo spends segmenting must be those of ``segment``.

``--no-speed`` skips the per-configuration runs (and leaves the "Speed" subsection as it is):
with one or more of ``--cohort``, ``--demo`` and ``--accuracy-cases``.

Writes the section "CPU inference" of docs/benchmarks.md (its subsections "Speed", "Cohort",
"Demo" and "Reduced precision on every labelled case" are each replaced by a new run of their
kind).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from tiramisu_brats import export, infer, io, metrics
from tiramisu_brats.api import label_stem

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASE = ROOT.parent / "shared" / "data" / "brats-labeled" / "BraTS2021_00006"
DOC = ROOT / "docs" / "benchmarks.md"
# (backend, precision, whole slices, tumor slices, mode): precision None is the backend's
# default. The reference, PyTorch eager in fp32 on every whole slice, is what the paper's
# pipeline did.
Config = tuple[str, "str | None", bool, bool, str]
REFERENCE: Config = ("torch", "fp32", True, False, "fast")
DEFAULT: Config = (infer.DEFAULT_BACKEND, None, False, True, "fast")
ACCURATE: Config = (infer.DEFAULT_BACKEND, None, False, True, "accurate")
CONFIGS: list[Config] = [REFERENCE, ("torch", "bf16", True, False, "fast"),
                         ("openvino", "fp32", True, False, "fast"),
                         ("openvino", "bf16", True, False, "fast"),
                         ("openvino", "bf16", False, False, "fast"), DEFAULT,
                         ("openvino", "int8", False, True, "fast"),
                         ("onnxruntime", "fp32", False, True, "fast"),
                         ("onnxruntime", "int8", False, True, "fast"), ACCURATE]
ACCURACY_CONFIGS: list[Config] = [REFERENCE, ("openvino", "fp32", False, True, "fast"),
                                  DEFAULT]
ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
STAGES = ("load", "preprocess", "infer", "postprocess", "save")
INTRO = ("Seconds per patient on the CPU for each inference backend and precision, written by "
         "`benchmarks/speed.py` (see its docstring for what is measured).")


def cpu_name() -> str:
    """The CPU's model and which of the instruction sets in ``ISA`` it has."""
    name, flags = infer.cpu_info()
    name = name or platform.processor() or "unknown CPU"
    has = [f for f in ISA if f in flags]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    capped = f", capped by ONEDNN_MAX_CPU_ISA={cap}" if cap else ""
    return f"{name} with {', '.join(has) or 'none'} (of {', '.join(ISA)}{capped})"


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def segment_command() -> list[str]:
    script = Path(sys.executable).with_name("tiramisu-brats")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tiramisu_brats"]


def run_child(cmd: list[str], log: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of one child process.

    Byte code is cached (in a folder beside ``log``) even where ``PYTHONDONTWRITEBYTECODE`` is
    set, as for an installed package (pip compiles it): the warm-up run writes it.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(log.with_name("pycache"))
    start = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{log.read_text()[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def label(config: Config) -> str:
    backend, precision, whole, tumor, mode = config
    text = f"{backend} {precision or 'default precision'}"
    text += ", whole slices" if whole else ", brain windows"
    if mode == "fast":
        text += ", tumor slices" if tumor else ", all slices"
    else:
        text = (f"`--mode {mode}`: {text}, six views (`api.Segmenter.views`), "
                + ("the views after the first near its tumor" if tumor else "every slice"))
    return text + (" (**default**)" if config == DEFAULT else "")


def segment_options(config: Config) -> list[str]:
    backend, precision, whole, tumor, mode = config
    return ["--backend", backend, *(["--precision", precision] if precision else []),
            "--whole-slices" if whole else "--brain-windows",
            "--tumor-slices" if tumor else "--all-slices", "--mode", mode]


def dices(a: np.ndarray, b: np.ndarray) -> list[float]:
    return list(metrics.region_dice(a, b).values())


def measure(args: argparse.Namespace, weights: Path, tmp: Path) -> list[dict]:
    """Each configuration's runs, taken in rounds (one run of each configuration per round),
    so that the shared cores' drift over the benchmark weighs on every configuration alike."""
    files = io.find_case_files(args.case)
    commands = []
    for k, config in enumerate(args.configs):
        out = tmp / f"{k}.nii.gz"
        cmd = [*segment_command(), "segment", str(args.case), "-o", str(out), "--overwrite",
               "--no-progress", *segment_options(config), "--model", str(weights)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        commands.append((config, out, cmd))
        print(f"{label(config)}: warm-up", file=sys.stderr, flush=True)
        run_child(cmd, tmp / "log.txt")
    runs: list[list[dict]] = [[] for _ in commands]
    for i in range(args.runs):
        for (config, out, cmd), done in zip(commands, runs):
            wall, cpu, rss = run_child(cmd, tmp / "log.txt")
            stages = json.loads(out.with_name(label_stem(out) + ".json").read_text())["timings_s"]
            done.append({"wall": wall, "cpu": cpu, "rss": rss, **stages})
            print(f"  round {i + 1}, {label(config)}: {wall:.1f} s, infer {stages['infer']:.1f} s,"
                  f" load average {load_average()}", file=sys.stderr, flush=True)
    rows = []
    for (config, out, _), done in zip(commands, runs):
        row = {k: statistics.median(r[k] for r in done) for k in done[0]}
        row["rss"] = max(r["rss"] for r in done)
        row["walls"] = [r["wall"] for r in done]
        summary = json.loads(out.with_name(label_stem(out) + ".json").read_text())
        rows.append({"config": config, "computed_in": summary["model"]["precision"],
                     "why": summary["model"].get("precision_why"),
                     "slices": summary["slices"]["brain"], "run": summary["slices"]["run"],
                     "labels": io.read_label_map(out)[0], **row})
    reference = next(r for r in rows if r["config"] == REFERENCE)
    expert = io.read_label_map(files.seg)[0] if files.seg is not None else None
    for row in rows:
        row["speedup"] = reference["wall"] / row["wall"]
        row["agreement"] = min(dices(row["labels"], reference["labels"]))
        if expert is not None:
            row["delta_dice"] = max(abs(a - b) for a, b in zip(
                dices(row["labels"], expert), dices(reference["labels"], expert)))
    return rows


def accuracy(folders: list[Path], weights: Path) -> list[dict]:
    """Dice against the expert of the reference and each faster path, on every labelled case."""
    from tiramisu_brats.api import Segmenter

    configs = ACCURACY_CONFIGS
    segmenters = {c: Segmenter(weights, c[0], precision=c[1], whole_slices=c[2],
                               tumor_slices=c[3], mode=c[4]) for c in configs}
    rows = []
    for case in (c for folder in folders for c in io.find_cases(folder)):
        files = io.find_case_files(case)
        if files.seg is None:
            continue
        image, expert = io.read_case(files).image, io.read_label_map(files.seg)[0]
        row = {"case": files.case_id}
        for config, segmenter in segmenters.items():
            seg = segmenter.segment(image)
            row[config] = dices(seg.labels, expert)
            if config == DEFAULT:  # what tumor slices left out, and what that changed
                every = segmenter.segment(image, all_slices=True)
                row["slices"] = (seg.slices["run"], seg.slices["brain"],
                                 int(np.count_nonzero(seg.labels != every.labels)))
        print(f"{files.case_id}: " + ", ".join(
            f"{label(c)} " + "/".join(f"{d:.3f}" for d in row[c]) for c in configs),
            file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def cohort(args: argparse.Namespace, weights: Path, tmp: Path) -> dict:
    """One default ``segment`` process over a folder of cases: seconds per case, and how long
    each case waited for its reading (read ahead while the case before it was segmented)."""
    out = tmp / "cohort"
    cmd = [*segment_command(), "segment", str(args.cohort), "-o", str(out), "--no-progress",
           "--model", str(weights), *(["--threads", str(args.threads)] if args.threads else [])]
    print(f"cohort {args.cohort}", file=sys.stderr, flush=True)
    wall, cpu, rss = run_child(cmd, tmp / "log.txt")
    summaries = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    loads = [s["timings_s"]["load"] for s in summaries]
    return {"cases": len(summaries), "wall": wall, "cpu": cpu, "rss": rss,
            "first_load": summaries[0]["timings_s"]["load"] if summaries else None,
            "median_load": statistics.median(loads) if loads else None,
            "median_total": statistics.median(s["timings_s"]["total"] for s in summaries)}


def cohort_markdown(row: dict, args: argparse.Namespace, weights_note: str) -> str:
    return "\n".join([
        f"`{args.command}` on {datetime.date.today()}: one `tiramisu-brats segment "
        f"{args.cohort.name} -o OUT` process (default backend and precision), {weights_note}.",
        "",
        f"- CPU: {cpu_name()}, {infer.cpu_count()} cores available to the process "
        f"(load average {load_average()} after).",
        f"- {row['cases']} cases in {row['wall']:.1f} s: **{row['wall'] / row['cases']:.2f} s "
        f"per case** including start-up, {row['cpu'] / row['wall']:.2f} cores busy on average "
        f"(CPU {row['cpu']:.0f} s), peak RSS {row['rss']:.0f} MiB.",
        f"- Waiting for a case's reading (the JSON's `load`): median {row['median_load']:.2f} s "
        f"per case (each case is read while the one before it is segmented); the median case "
        f"took {row['median_total']:.2f} s from reading to saving.",
    ]) + "\n"


def demo(args: argparse.Namespace, weights: Path, tmp: Path) -> list[dict]:
    """``demo`` (all of it: writing the synthetic case, segmenting, the report) and ``segment``
    of that synthetic case and of ``args.case``, each a fresh process, default options."""
    import shutil

    log = tmp / "log.txt"
    model = ["--model", str(weights), *(["--threads", str(args.threads)] if args.threads else [])]
    out = tmp / "demo"
    demo_cmd = [*segment_command(), "demo", "-o", str(out), "--overwrite", "--no-progress", *model]
    print("demo: warm-up", file=sys.stderr, flush=True)
    run_child(demo_cmd, log)
    synthetic = shutil.copytree(out / "input" / "synthetic-000", tmp / "synthetic-000")
    jobs = [("`tiramisu-brats demo`", demo_cmd, out / "synthetic-000.json")]
    for name, case in (("synthetic-000", synthetic), (args.case.name, args.case)):
        target = tmp / f"{name}.nii.gz"
        cmd = [*segment_command(), "segment", str(case), "-o", str(target), "--overwrite",
               "--no-progress", *model]
        run_child(cmd, log)
        jobs.append((f"`tiramisu-brats segment` {name}", cmd, target.with_name(name + ".json")))
    runs: list[list[tuple[float, float]]] = [[] for _ in jobs]
    for i in range(args.runs):
        for (name, cmd, summary), done in zip(jobs, runs):
            wall = run_child(cmd, log)[0]
            done.append((wall, json.loads(summary.read_text())["timings_s"]["total"]))
            print(f"  round {i + 1}, {name}: {wall:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for (name, _, summary), done in zip(jobs, runs):
        info = json.loads(summary.read_text())
        rows.append({"command": name, "wall": statistics.median(w for w, _ in done),
                     "walls": [w for w, _ in done],
                     "segmenting": statistics.median(t for _, t in done),
                     "shape": "x".join(map(str, info["shape"])),
                     "run": info["slices"]["run"], "brain": info["slices"]["brain"]})
    return rows


def demo_markdown(rows: list[dict], args: argparse.Namespace, weights_note: str) -> str:
    lines = [
        f"`{args.command}` on {datetime.date.today()}: each command a fresh process with the "
        f"default options, {weights_note}; median of {args.runs} runs after one warm-up run "
        "each, taken in rounds. The demo writes the synthetic case first and a report after "
        "segmenting (end to end counts them); segmenting: reading to saving, from the JSON "
        "beside the label map.",
        "",
        f"- CPU: {cpu_name()}, {infer.cpu_count()} cores available to the process "
        f"(load average {load_average()} after).",
        "",
        "| command | case shape | brain slices | slices run | segmenting (s) | "
        "end to end (s) | each run (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['command']} | {r['shape']} | {r['brain']} | {r['run']} | "
                     f"{fmt(r['segmenting'])} | {fmt(r['wall'])} | "
                     + " / ".join(fmt(w, 1) for w in r["walls"]) + " |")
    return "\n".join(lines) + "\n"


def fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def int8_note(args: argparse.Namespace) -> str:
    """Which int8 model the runs used: the weights' own (its record), else one made on
    synthetic slices."""
    found = export.int8_that_keeps_labels(args.weights)
    if found is None:
        return "int8 (where run) quantized on synthetic slices, not the default"
    check = found[1]
    return (f"int8: the weights' model made by `tiramisu-brats quantize` (its record: largest "
            f"Dice change {check['largest_change']} from fp32 on {check['cases']} labelled "
            "cases)")


def speed_markdown(rows: list[dict], args: argparse.Namespace, weights_note: str) -> str:
    has_expert = "delta_dice" in rows[0]
    header = ["configuration", "computed in", "end to end (s)", "each run (s)", "CPU (s)",
              "speed-up vs PyTorch eager",
              *(f"{s} (s)" for s in STAGES), "slices run", "brain slices per infer s",
              "peak RSS (MiB)",
              "Dice vs PyTorch eager (min WT/TC/ET)",
              *(["max abs Dice change vs expert"] if has_expert else [])]
    lines = [
        f"`{args.command}` on {datetime.date.today()}: case {args.case.name} "
        f"({rows[0]['slices']} brain slices of 192 x 160), {weights_note}; median of "
        f"{args.runs} runs after one warm-up run per configuration, taken in rounds (one run "
        "of every configuration per round, so that a slow spell of the machine does not fall "
        "on one configuration alone). PyTorch eager: "
        f"{label(REFERENCE)}, as the reference pipeline.",
        "",
        f"- CPU: {cpu_name()}, {infer.cpu_count()} cores available to the process "
        f"(load average {args.load_before} before, {load_average()} after: other jobs may "
        "share the cores; CPU seconds are less sensitive to that than wall seconds).",
        f"- Python {platform.python_version()}, " + ", ".join(
            f"{p} {version(p)}" for p in ("openvino", "onnxruntime", "torch", "nncf")) + ".",
        "- End to end: one `tiramisu-brats segment` process, interpreter start and imports "
        f"included; stages from the JSON it writes; peak RSS of the process; {int8_note(args)}. "
        "Whole slices: 192 x 160; brain windows: each slice's brain "
        "bounding box + 8 px, rounded up to multiples of 32 (sizes few slices share grown "
        "to a larger one in use, `preprocess.SHAPE_COST`). All slices: every brain slice; "
        "tumor slices: every fourth one, then those next to tumor until each run of tumor "
        "slices ends (`infer.predict_labels`), so brain slices per infer second count slices "
        "not run as well.",
        *(f"- Default precision here: {r['why']}." for r in rows if r["config"] == DEFAULT),
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|" + "---:|" * (len(header) - 2),
    ]
    for r in rows:
        cells = [label(r["config"]), r["computed_in"], fmt(r["wall"]),
                 " / ".join(fmt(w, 1) for w in r["walls"]), fmt(r["cpu"], 1),
                 fmt(r["speedup"], 1) + "x", *(fmt(r[s]) for s in STAGES), str(r["run"]),
                 fmt(r["slices"] / r["infer"], 1), f"{r['rss']:.0f}", fmt(r["agreement"], 4)]
        if has_expert:
            cells.append(fmt(r["delta_dice"], 4))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_markdown(rows: list[dict], args: argparse.Namespace, weights_note: str) -> str:
    configs = [c for c in rows[0] if c not in ("case", "slices")]
    run = sum(r["slices"][0] for r in rows)
    brain = sum(r["slices"][1] for r in rows)
    lines = [
        f"`{args.command}` on {datetime.date.today()}: {len(rows)} labelled cases of "
        f"{', '.join(map(str, args.accuracy_cases))}, {weights_note}; {int8_note(args)}; "
        f"CPU: {cpu_name()}. Dice against the expert, WT / TC / ET; "
        f"for each faster path the largest change from PyTorch eager ({label(REFERENCE)}), "
        "either way. The default must stay within 0.01 on every case. Last column: slices "
        "the default ran of the brain slices, and voxels of its label map that differ from "
        "the same path on all slices.",
        "",
        f"Tumor slices ran {run} of {brain} brain slices ({run / brain:.0%}); "
        f"{sum(r['slices'][2] > 0 for r in rows)} of {len(rows)} label maps changed by it.",
        "",
        "| case | " + " | ".join(label(c) for c in configs) + " | default: slices run, "
        "voxels changed |",
        "|---|" + "---|" * (len(configs) + 1),
    ]
    worst = dict.fromkeys(configs[1:], 0.0)
    for row in rows:
        for c in configs[1:]:
            worst[c] = max(worst[c], *(abs(f - d) for f, d in zip(row[configs[0]], row[c])))
        run_, brain_, changed = row["slices"]
        lines.append(f"| {row['case']} | " + " | ".join(
            " / ".join(f"{d:.3f}" for d in row[c]) for c in configs)
            + f" | {run_} of {brain_}, {changed} |")
    lines.append("| **largest change** | | " + " | ".join(
        f"**{worst[c]:.4f}**" for c in configs[1:]) + " | |")
    return "\n".join(lines) + "\n"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def section_span(text: str, title: str, level: int) -> tuple[int, int] | None:
    """Where the markdown section ``title`` (header ``level``) runs, up to the next header of
    that level or above."""
    found = re.search(rf"^{'#' * level} {re.escape(title)}\n.*?(?=^#{{1,{level}}} |\Z)", text,
                      re.M | re.S)
    return found.span() if found else None


def put_section(text: str, title: str, body: str, level: int) -> str:
    """``text`` with the section ``title`` replaced by ``body``, or appended."""
    block = f"{'#' * level} {title}\n\n{body.strip()}\n\n"
    span = section_span(text, title, level)
    if span is None:
        return text.rstrip() + "\n\n" + block
    return text[: span[0]] + block + text[span[1] :]


def write_doc(subsection: str, body: str) -> None:
    """Replace ``subsection`` of "CPU inference" in docs/benchmarks.md, nothing else."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if section_span(text, "CPU inference", 2) is None:
        text = put_section(text, "CPU inference", INTRO, 2)
    start, end = section_span(text, "CPU inference", 2)
    text = text[:start] + put_section(text[start:end], subsection, body, 3) + text[end:]
    io.atomic_write_text(DOC, text.rstrip() + "\n")
    print(f"wrote {subsection!r} in {DOC}", file=sys.stderr)


def parse_configs(text: str) -> list[Config]:
    configs = []
    for item in text.split(","):
        error = argparse.ArgumentTypeError(
            f"{item}: not backend:precision[:whole][:all][:accurate]")
        if ":" not in item:
            raise error
        backend, precision, *flags = item.split(":")
        if (not set(flags) <= {"whole", "all", "accurate"}
                or len(set(flags)) < len(flags)
                or backend not in infer.SUPPORTED
                or precision not in (*infer.SUPPORTED[backend], "default")):
            raise error
        configs.append((backend, None if precision == "default" else precision,
                        "whole" in flags, "all" not in flags,
                        "accurate" if "accurate" in flags else "fast"))
    return [REFERENCE] + [c for c in configs if c != REFERENCE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", type=Path, help="weights (default: the shipped model)")
    parser.add_argument("--threads", type=int, help="passed on to segment (default: all cores)")
    parser.add_argument("--configs", type=parse_configs, default=CONFIGS, help=(
        "backend:precision[:whole][:all][:accurate], comma-separated, e.g. "
        "openvino:default,torch:bf16:whole:all (whole slices rather than brain windows, all "
        "slices rather than tumor slices, --mode accurate; torch:fp32:whole:all, the "
        "reference, is always run)"))
    parser.add_argument("--accuracy-cases", type=Path, nargs="+",
                        help="folders of labelled cases")
    parser.add_argument("--cohort", type=Path, help="folder of cases: seconds per case")
    parser.add_argument("--demo", action="store_true", help=(
        "tiramisu-brats demo against segment of its synthetic case and of --case"))
    parser.add_argument("--no-speed", action="store_true", help=(
        "skip the per-configuration runs (only --cohort, --demo and --accuracy-cases)"))
    args = parser.parse_args()
    if args.no_speed and not (args.cohort or args.demo or args.accuracy_cases):
        parser.error("--no-speed leaves nothing to run: add --cohort, --demo or "
                     "--accuracy-cases")
    args.command = shlex.join(["python", "benchmarks/speed.py", *sys.argv[1:]])
    args.load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = args.model or export.default_weights()
        if args.model is None and not weights.is_file():
            import torch

            from tiramisu_brats.model import REFERENCE, Tiramisu, save_weights

            torch.manual_seed(0)
            weights = save_weights(Tiramisu(REFERENCE), tmp / "random.safetensors")
            note = ("**random-init weights** (the shipped model was not found): speeds hold, "
                    "Dice columns mean nothing")
        else:
            note = f"weights {weights.name} (sha256 {export.file_sha256(weights)[:12]})"
        args.weights = weights
        if not args.no_speed:
            rows = measure(args, weights, tmp)
            write_doc("Speed", speed_markdown(rows, args, note))
        if args.cohort:
            write_doc("Cohort", cohort_markdown(cohort(args, weights, tmp), args, note))
        if args.demo:
            write_doc("Demo", demo_markdown(demo(args, weights, tmp), args, note))
        if args.accuracy_cases:
            write_doc("Reduced precision on every labelled case",
                      accuracy_markdown(accuracy(args.accuracy_cases, weights), args, note))


if __name__ == "__main__":
    main()
