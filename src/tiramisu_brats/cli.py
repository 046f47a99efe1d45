"""The ``tiramisu-brats`` command: a thin layer over ``api``, ``train`` and ``report``."""

from __future__ import annotations

import os

# Before NumPy and SciPy load OpenBLAS: no command here calls BLAS (OpenVINO, PyTorch and ONNX
# Runtime bring their own threads), and each OpenBLAS would start a thread per core that spins
# for a while after import, taking the CPU that reading the case and loading the model need
# (0.25 s of CPU at every start on 2 cores). A user's own setting stands.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from tiramisu_brats import __version__, io

if TYPE_CHECKING:
    from tiramisu_brats.train import FolderRun

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="Brain tumor segmentation in multi-modal MRI with a 2D FC-DenseNet.")
# Long lines are not cut at the terminal's width: a log file or a pipe gets each message whole
# (grep "failed" finds the case and its reason on one line).
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

STAGES = ("load", "preprocess", "infer", "postprocess", "save")
INPUT_HELP = (
    "A case folder or a folder of case folders. Layouts: BraTS 2017-2021 (`<case>_t1`, "
    "`_t1ce`, `_t2`, `_flair`), BraTS 2023 (`<case>-t1n`, `-t1c`, `-t2w`, `-t2f`), nnU-Net "
    "(`<case>_0000`..`_0003` in the order T1, T1ce, T2, FLAIR); .nii or .nii.gz."
)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as an error and return the exit (status ``code``) to raise."""
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code)


@contextmanager
def user_errors(exists: str = "pass --overwrite to replace it") -> Iterator[None]:
    """Turn the errors a user can cause into one line and exit status 2; ``exists``: what to
    do about an output that exists already."""
    try:
        yield
    except FileExistsError as err:  # the library says what is wrong; the CLI says which flag
        from tiramisu_brats.api import one_line

        raise fail(f"{one_line(err)}; {exists}") from None
    except (ValueError, OSError) as err:
        from tiramisu_brats.api import one_line

        raise fail(one_line(err)) from None


class Bars(Progress):
    """Progress bars on stderr, shown from the first bar added on: nothing at all (not even
    the blank line a stopped display leaves off a terminal) where none is added, such as
    before the model is loaded or in a torchrun process other than rank 0."""

    def __enter__(self) -> Bars:
        return self

    def add_task(self, *args, **kwargs) -> TaskID:
        self.start()
        return super().add_task(*args, **kwargs)

    def stop(self) -> None:
        if self.live.is_started:
            super().stop()


def progress_bar(enabled: bool) -> Bars:
    """The commands' bars (on stderr, gone when done); ``enabled`` False: none shown."""
    return Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=console, disable=not enabled, transient=True)


# The last model ``segment`` loaded, held past the command's return (and replaced by the next):
# freeing an OpenVINO model takes 0.1 s, which ``run`` skips by exiting at once.
_last_model: list = []


def run() -> None:
    """The ``tiramisu-brats`` console command: ``app``, then, once every output is written and
    flushed, an immediate exit. The interpreter's own teardown (unloading OpenVINO and its
    thread pools) would add about 0.2 s to every ``segment`` of one case (measured on 2 cores:
    0.20 s against 0.04 s; a whole run takes 5-6 s), freeing the model another 0.1 s.
    ``train`` (data loader workers, process groups) exits the normal way."""
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command == "train":
        app()
        return
    try:
        app()
        code = 0
    except SystemExit as done:
        if done.code is not None and not isinstance(done.code, int):
            raise  # a message to print: the normal way
        code = done.code or 0
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if version:
        out.print(__version__)
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        raise typer.BadParameter("missing command (see --help)")


def _timing_table(rows: list[dict]) -> Table:
    # segment reads and preprocesses each case in a thread ahead of the network: that work
    # shows under load (the wait for it), not preprocess
    ahead = all(r["timings_s"]["preprocess"] == 0 for r in rows)
    stages = [s for s in STAGES if not (ahead and s == "preprocess")]
    table = Table(title="seconds per stage")
    for col in ("case", *stages, "total"):
        name = "load + preprocess" if ahead and col == "load" else col
        table.add_column(name, justify="left" if col == "case" else "right")
    for r in rows:
        t = r["timings_s"]
        table.add_row(r["case"], *(f"{t[s]:.2f}" for s in (*stages, "total")))
    return table


class SegmentProgress:
    """``segment``'s view of ``api.segment_cohort``'s events: a bar of cases (a folder of
    cases), one of slices for the case being done, a line for each case written or failed;
    the model is kept in ``_last_model``."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.cases: TaskID | None = None
        self.slices: TaskID | None = None
        self.written = 0

    def __call__(self, kind: str, case_id: str, value: Any) -> None:
        """One event of ``api.COHORT_EVENTS``."""
        if kind == "model":
            _last_model[:] = [value]
        elif kind == "cases":
            self.cases = self.bar.add_task("cases", total=value)
        elif kind == "case":
            self.slices = self.bar.add_task(f"{case_id}", total=None)
        elif kind == "slices" and self.slices is not None:
            self.bar.advance(self.slices, value)
        elif kind in ("wrote", "failed"):
            if kind == "wrote":
                self.written += 1
                console.print(f"wrote {value}", highlight=False)
            else:
                console.print(f"[red]failed[/red] {escape(case_id)}: {escape(value)}",
                              highlight=False)
            if self.slices is not None:  # the end of the case begun (not a failure before)
                self.bar.remove_task(self.slices)
                self.slices = None
                if self.cases is not None:
                    self.bar.advance(self.cases)


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``--shard I/N`` as ``(I, N)``."""
    if shard is None:
        return None
    parts = [p.strip() for p in shard.split("/")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or (
            int(parts[0]) >= int(parts[1])):
        raise ValueError(f"--shard {shard}: expected I/N with 0 <= I < N, such as 0/4")
    return int(parts[0]), int(parts[1])


SEGMENT_EXAMPLES = """Examples:

- `tiramisu-brats segment CASE_DIR -o seg.nii.gz`: one case, fast mode.
- `tiramisu-brats segment CASES_DIR -o out --mode accurate`: every case of a folder, with
  `out/index.html` listing them (cases to review first).
- `tiramisu-brats segment --t1 a.nii.gz --t1ce b.nii.gz --t2 c.nii.gz --flair d.nii.gz -o
  seg.nii.gz`: four files.
- `tiramisu-brats -v segment ...`: log details (`-v` goes before the command).
"""


@app.command(epilog=SEGMENT_EXAMPLES)
def segment(
    input: Annotated[Path | None, typer.Argument(help=INPUT_HELP)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help=(
        "Output .nii.gz for one case; a folder for a folder of cases."))] = ...,
    t1: Annotated[Path | None, typer.Option(help="T1 file (instead of INPUT).")] = None,
    t1ce: Annotated[Path | None, typer.Option(help="T1ce file.")] = None,
    t2: Annotated[Path | None, typer.Option(help="T2 file.")] = None,
    flair: Annotated[Path | None, typer.Option(help="FLAIR file.")] = None,
    model: Annotated[Path | None, typer.Option(help="Weights (.safetensors); default: the "
                                                       "shipped model.")] = None,
    backend: Annotated[str, typer.Option(help=(
        "Inference backend: openvino (fastest on CPU), onnxruntime (needs "
        "tiramisu-brats\\[onnx]), or torch (use it on a CUDA GPU; needs "
        "tiramisu-brats\\[torch])."))] = "openvino",
    precision: Annotated[str | None, typer.Option(help=(
        "fp32; bf16 (openvino, torch); int8 (openvino, onnxruntime; the weights' int8 "
        "model, else one quantized once with NNCF: needs tiramisu-brats\\[int8]). Default "
        "with openvino: bf16 on CPUs with AMX; else int8 where the weights' int8 model kept "
        "the labels (tiramisu-brats quantize) and the CPU has AVX2 or AVX512-VNNI; else bf16 "
        "(fp32 on CPUs without bf16 arithmetic); fp32 with the others. The JSON says which, "
        "and why."),
        show_default=False)] = None,
    label_convention: Annotated[str, typer.Option(help=(
        "brats: 0/1/2/4 (2017-2021); brats2023: 0/1/2/3."))] = "brats",
    mode: Annotated[str, typer.Option(help=(
        "fast: one axial pass (seconds); accurate: the mean of the probabilities of several "
        "views: axial, coronal and sagittal slices of the model and of its partner model "
        "where the weights have one (the shipped weights do), else of the model alone, each "
        "plane also flipped left-right (with tumor slices, the views after the first near "
        "its tumor only; slower, more accurate: docs/model-card.md)."))] = "fast",
    resample: Annotated[bool, typer.Option(help=(
        "Resample images that are not 1 mm to 1 mm for the network, but for in-plane voxels "
        "of 1 to 1.5 mm, kept (the label map is written on the input's grid all the "
        "same)."))] = True,
    postprocess: Annotated[bool, typer.Option(help=(
        "Closing, then tumor components under 10 % of the largest one dropped."))] = True,
    whole_slices: Annotated[bool | None, typer.Option(
        "--whole-slices/--brain-windows", show_default=False, help=(
            "Run the network on whole 192 x 160 slices, or on each slice's brain window "
            "(faster, labels within 0.01 Dice). Default: brain windows, whole slices with "
            "torch."))] = None,
    all_slices: Annotated[bool | None, typer.Option(
        "--all-slices/--tumor-slices", show_default=False, help=(
            "Run the network on every brain slice, or on every fourth one and then only "
            "those next to tumor, until each run of tumor slices ends (faster; loses only tumor "
            "under 4 slices thick cut off from the rest); in accurate mode, every slice of "
            "every view or the first view's tumor slices, then those near the tumor it found. "
            "Default: tumor slices, "
            "every slice with --no-postprocess; --save-raw runs every slice, and so does fast "
            "mode on resampled voxels."))] = None,
    save_raw: Annotated[bool, typer.Option(help=(
        "Also write `<name>_raw.nii.gz`, before postprocessing."))] = False,
    uncertainty: Annotated[bool, typer.Option(help=(
        "Also write `<name>_uncertainty.nii.gz`: how much the views disagree on the whole "
        "tumor, voxel by voxel (float32; needs --mode accurate; with tumor slices, 0 outside "
        "the box around the tumor the first view found, where the other views did not run: "
        "--all-slices compares every voxel)."))] = False,
    overwrite: Annotated[bool, typer.Option(help=(
        "Replace existing outputs (and remove the replaced run's `_raw` or `_uncertainty` "
        "map where this run makes none)."))] = False,
    skip_existing: Annotated[bool, typer.Option(help=(
        "Leave cases whose outputs an earlier run finished as they are (in a folder of "
        "cases, the others are segmented; those made in another mode or label convention are "
        "named). Not with --overwrite."))] = False,
    batch_size: Annotated[int | None, typer.Option(min=1, help=(
        "Slices per batch; default: the backend's (openvino 1, onnxruntime 4, torch 8)."))] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads.")] = None,
    shard: Annotated[str | None, typer.Option(help=(
        "I/N: of a folder of cases, only every N-th (in sorted order) from the I-th, 0-based: "
        "N jobs I = 0..N-1 cover the folder once, with no overlap."))] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Segment a case (or a folder of cases) into a tumor label map NIfTI."""
    from tiramisu_brats import api

    events = None
    try:
        with user_errors("pass --overwrite to replace, or --skip-existing to leave finished "
                         "cases as they are"), progress_bar(progress) as bar:
            events = SegmentProgress(bar)
            run = api.segment_cohort(
                input, output, t1=t1, t1ce=t1ce, t2=t2, flair=flair, model=model,
                backend=backend, precision=precision, mode=mode, resample=resample,
                postprocess=postprocess, whole_slices=whole_slices,
                tumor_slices=None if all_slices is None else not all_slices,
                batch_size=batch_size, threads=threads, convention=label_convention,
                save_raw=save_raw, uncertainty=uncertainty, overwrite=overwrite,
                skip_existing=skip_existing, shard=parse_shard(shard), on_event=events)
    except KeyboardInterrupt:
        if events is not None and events.cases is not None:  # a folder of cases was begun
            console.print(f"interrupted: {events.written} case(s) finished in {output}; "
                          "--skip-existing goes on with the others (a case without its JSON "
                          "summary is done again)", highlight=False)
        else:
            console.print(f"interrupted: {output} not finished", highlight=False)
        raise typer.Exit(130) from None
    if run.results:
        console.print(_timing_table(run.results))
    # cases finished by an earlier run count as that run judged them
    review = [r["case"] for r in (*run.results, *run.skipped) if r.get("qc", {}).get("review")]
    if run.cohort:
        skipped = f"{len(run.skipped)} skipped (done before), " if run.skipped else ""
        console.print(f"{len(run.results)} segmented, {skipped}{len(run.failures)} failed"
                      + (f"; {len(review)} to review (QC): {', '.join(review[:10])}"
                         f"{' ...' if len(review) > 10 else ''}" if review else ""),
                      highlight=False)
    elif run.results and "qc" in run.results[0]:
        console.print(_qc_line(run.results[0]["qc"]), highlight=False)
    elif run.skipped:
        console.print(f"{output}: left as it was (an earlier run finished "
                      f"{run.skipped[0]['case']})",
                      highlight=False)
    if run.failures_csv is not None:
        console.print(f"failed cases and reasons: {run.failures_csv}", highlight=False)
        raise typer.Exit(1)


def _qc_line(qc: dict) -> str:
    """One case's quality score in words (``api.quality`` or ``api.confidence``)."""
    return f"quality score {qc['score']:.2f}{', to review' if qc['review'] else ''}: {qc['why']}"


EVALUATE_EXAMPLES = """Examples:

- `tiramisu-brats evaluate out CASES_DIR -o report`: the label maps `segment` wrote into
  `out` for the cases of `CASES_DIR` against the experts' `_seg` files; `report/index.html`,
  `metrics.csv`.
- `tiramisu-brats evaluate seg.nii.gz CASE_DIR -o report`: one label map against the case's
  `_seg` file.
"""


@app.command(epilog=EVALUATE_EXAMPLES)
def evaluate(
    pred: Annotated[Path, typer.Argument(help="Predicted label map, or a folder of them.")],
    ref: Annotated[Path, typer.Argument(help=(
        "Expert label map, or a folder (of label maps or of case folders with _seg)."))],
    output: Annotated[Path, typer.Option("--output", "-o", help="Report folder.")] = ...,
    overlays: Annotated[bool, typer.Option(help="Overlay PNGs (when images are found).")] = True,
    overwrite: Annotated[bool, typer.Option(help=(
        "Replace an existing report (its overlays and metrics_raw.csv that this run does not "
        "make are removed; other files stay)."))] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Score predictions against expert segmentations: Dice, sensitivity, specificity, HD95."""
    from tiramisu_brats.api import evaluate as run_evaluate
    from tiramisu_brats.report import summarize

    with user_errors(), progress_bar(progress) as bar:
        task = bar.add_task("evaluating", total=None)
        rows = run_evaluate(pred, ref, output, overlays=overlays, overwrite=overwrite,
                            on_case=lambda _: bar.advance(task))
    stats = summarize(rows)
    table = Table(title=f"{len(rows)} case(s), mean (median)")
    table.add_column("region")
    for m in ("dice", "sensitivity", "specificity", "hd95 (mm)"):
        table.add_column(m, justify="right")
    for region in ("WT", "TC", "ET"):
        table.add_row(region, *(f"{stats[f'{m}_{region}']['mean']:.3f} "
                                f"({stats[f'{m}_{region}']['median']:.3f})"
                                for m in ("dice", "sensitivity", "specificity", "hd95")))
    out.print(table)
    console.print(f"report in {output}", highlight=False)


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for everything.")] = Path(
        "tiramisu-demo"),
    case: Annotated[Path | None, typer.Option(help=(
        "Run on this real case folder instead of the synthetic one."))] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the synthetic case.")] = 0,
    model: Annotated[Path | None, typer.Option(help="Weights; default: shipped.")] = None,
    backend: Annotated[str, typer.Option(help="Inference backend.")] = "openvino",
    save_raw: Annotated[bool, typer.Option(help=(
        "Also write the map before postprocessing, for box plots before and after it in the "
        "report (runs the network on every slice: slower than segment)."))] = False,
    overwrite: Annotated[bool, typer.Option(help=(
        "Write into a folder that is not empty: this run's label map, JSON and report "
        "replace those there; other files stay."))] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """The whole job on an embedded default: a synthetic case in, labels and report out.
    The case is segmented exactly as ``segment`` does it."""
    from tiramisu_brats.api import evaluate as run_evaluate
    from tiramisu_brats.api import segment_cohort, summary_path
    from tiramisu_brats.synthetic import make_case, write_case

    start = time.perf_counter()
    with user_errors("give another -o, or pass --overwrite to replace it"):
        if output.exists() and not output.is_dir():
            raise io.InputError(f"{output}: not a folder (the demo writes a folder)")
        if case is not None:  # checked before anything is written
            if case.is_dir() and not io.is_case_folder(case) and io.find_cases(case):
                raise io.InputError(f"{case}: a folder of cases; the demo runs one case "
                                    "(segment runs a folder)")
            files = io.find_case_files(case)
        if output.exists() and any(output.iterdir()) and not overwrite:
            raise FileExistsError(f"{output}: not empty")
        output.mkdir(parents=True, exist_ok=True)
        if case is None:
            synthetic = make_case(seed=seed, case_id=f"synthetic-{seed:03d}")
            case = write_case(synthetic, output / "input")
            console.print(f"synthetic case written to {case}", highlight=False)
            files = io.find_case_files(case)
        label_path = output / f"{io.safe_case_id(files.case_id)}.nii.gz"
        with progress_bar(progress) as bar:
            summary, = segment_cohort(case, label_path, model=model, backend=backend,
                                      save_raw=save_raw, overwrite=True,
                                      on_event=SegmentProgress(bar)).results
        console.print(_timing_table([summary]))
        vols = summary["volumes_ml"]
        out.print(f"tumor volumes (ml): whole {vols['WT_ml']:.1f}, core {vols['TC_ml']:.1f}, "
                  f"enhancing {vols['ET_ml']:.1f}, necrosis {vols['necrosis_ml']:.1f}, "
                  f"edema {vols['edema_ml']:.1f}", highlight=False)
        out.print(_qc_line(summary["qc"]), highlight=False)
        if files.seg is not None:
            # this label map alone: an earlier demo's in the folder are not this run's
            rows = run_evaluate(label_path, case, output / "report", overwrite=True)
            row = rows[0]
            out.print(f"Dice against the known tumor: WT {row['dice_WT']:.3f}, "
                      f"TC {row['dice_TC']:.3f}, ET {row['dice_ET']:.3f}", highlight=False)
    out.print(f"label map: {label_path}\nsummary:   {summary_path(label_path)}",
              highlight=False)
    if files.seg is not None:
        raw = ", metrics_raw.csv" if save_raw else ""
        out.print(f"report:    {output / 'report'} (index.html, metrics.csv{raw}, summary.json, "
                  f"boxplots.png, overlay_*.png)", highlight=False)
    console.print(f"done in {time.perf_counter() - start:.1f} s", highlight=False)


@app.command()
def quantize(
    data: Annotated[list[Path], typer.Argument(help=(
        "Folders of labelled cases (with expert segmentations): calibration, and the check."))],
    model: Annotated[Path | None, typer.Option(help="Weights; default: shipped.")] = None,
    holdout: Annotated[str | None, typer.Option(help=(
        "Comma-separated case ids not to calibrate on (still checked)."))] = None,
    tolerance: Annotated[float, typer.Option(help=(
        "Largest change of any case's Dice (WT, TC, ET) from fp32 for int8 to be the "
        "default."))] = 0.01,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
) -> None:
    """Make the int8 model of the weights (OpenVINO, NNCF with accuracy control; replaces an
    earlier int8 model of the same weights) and check it on every labelled case: where no
    case's Dice moves by more than the tolerance, segment uses it by default on CPUs with
    AVX2 or AVX512-VNNI and without AMX (where bf16 is faster). Needs tiramisu-brats\\[int8];
    40 to 70 min on 2 cores."""
    from tiramisu_brats.api import quantize_int8

    held = [c.strip() for c in (holdout or "").split(",") if c.strip()]
    with user_errors(), progress_bar(progress) as bar:
        task = bar.add_task("reading, then checking cases", total=None)
        result = quantize_int8(data, model, holdout=held, tolerance=tolerance,
                               on_case=lambda _: bar.advance(task))
    table = Table(title="Dice against the expert, WT / TC / ET (fast mode)")
    for column in ("case", "fp32", "int8", "largest change"):
        table.add_column(column, justify="left" if column == "case" else "right",
                         no_wrap=column == "case")
    for row in result["cases"]:
        table.add_row(row["case"] + (" (held out)" if row["holdout"] else ""),
                      *(" / ".join(f"{d:.3f}" for d in row[k]) for k in ("fp32", "int8")),
                      f"{row['change']:.4f}")
    out.print(table)
    check = result["check"]
    verdict = ("keeps the labels: the default on CPUs with AVX2 or AVX512-VNNI, without AMX"
               if check["kept"] else "does not keep the labels: not the default "
               "(--precision int8 still runs it)")
    out.print(f"int8 model {result['path']}: largest change {check['largest_change']:.4f} on "
              f"{check['worst_case']} (tolerance {tolerance}): {verdict}", highlight=False)


def parse_fold(fold: str | None) -> tuple[int, int] | None:
    """``--fold I/K`` as ``(I, K)``."""
    if not fold:
        return None
    parts = fold.split("/")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise io.InputError(f"fold {fold!r}: expected I/K, e.g. 0/5")
    return int(parts[0]), int(parts[1])


class TrainProgress:
    """``train``'s view of a run (rank 0's): what it trains on, a bar of the epoch's steps."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task: TaskID | None = None
        self.epochs = 0
        self.steps = 0  # taken in this command

    def start(self, run: FolderRun) -> None:
        """Training begins: say on what, and start the bar of steps."""
        for task in self.bar.task_ids:  # caching is done
            self.bar.remove_task(task)
        config, world = run.config, run.world
        console.print(f"training on {len(config.train_cases)} cases "
                      f"({', '.join(config.planes)}), validating on "
                      f"{len(run.val_set)}: {', '.join(config.val_cases) or '-'}"
                      + (f"; {world.size} processes" if world.size > 1 else ""),
                      highlight=False)
        self.epochs = config.epochs
        self.task = self.bar.add_task("starting", total=config.steps_per_epoch)

    def step(self, epoch: int, step: int, value: float) -> None:
        """Step ``step`` (0-based) of ``epoch`` is done, with loss ``value``."""
        self.steps += 1
        if self.task is not None:
            self.bar.update(self.task, completed=step + 1,
                            description=f"epoch {epoch}/{self.epochs} loss {value:.3f}")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option ``name`` was given (command line or environment), not defaulted."""
    source = ctx.get_parameter_source(name)  # compared by name: click's or Typer's own enum
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


TRAIN_EXAMPLES = """Examples:

- `tiramisu-brats train CASES_DIR -o run --val-fraction 0.2`: from scratch, with the
  defaults (the reference's loss and optimizer, axial slices), a fifth of the cases held out.
- `tiramisu-brats train CASES_DIR -o run --init WEIGHTS --val-cases A,B,C --planes
  axial,coronal,sagittal --loss dice_ce --batch-size 32 --patch 192 160 --epochs 1
  --steps-per-epoch 150 --seed 1`: the shipped model's epoch as a CPU runs it (its GPU run
  also had a cosine schedule over 8 minutes: docs/model-card.md, "Recipe").
- `tiramisu-brats train CASES_DIR -o run --resume --epochs 5`: go on with a run.
"""


@app.command(epilog=TRAIN_EXAMPLES)
def train(
    ctx: typer.Context,
    data: Annotated[list[Path], typer.Argument(help=(
        "Folder(s) of labelled cases (any layout segment reads), or one cache folder."))],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run folder.")] = ...,
    cache: Annotated[Path | None, typer.Option(help=(
        "Cache of preprocessed slices (default: RUN/cache); reused across runs."))] = None,
    epochs: Annotated[int, typer.Option(min=1, help=(
        "Epochs to train (with --resume: the run's length in all)."))] = 50,
    steps_per_epoch: Annotated[int, typer.Option(min=1, help=(
        "Optimizer steps per epoch (each a batch of random slices); validation after "
        "each epoch."))] = 100,
    batch_size: Annotated[int, typer.Option(min=1, help=(
        "Global batch: of all processes together under torchrun."))] = 8,
    micro_batches: Annotated[int | None, typer.Option(min=1, help=(
        "Run each batch as this many micro-batches (own BatchNorm statistics, gradients "
        "summed); a multiple of the number of processes; default: one per process."))] = None,
    patch: Annotated[tuple[int, int], typer.Option(help="Patch H W (multiples of 32).")] = (
        128, 128),
    tumor_share: Annotated[float, typer.Option(min=0, max=1, help=(
        "Share of the slices drawn from those holding tumor."))] = 0.8,
    rotate_deg: Annotated[float, typer.Option(min=0, max=180, help=(
        "Augmentation: rotation within ± this many degrees."))] = 10.0,
    zoom: Annotated[float, typer.Option(min=0, max=0.5, help=(
        "Augmentation: zoom within ± this fraction."))] = 0.1,
    intensity: Annotated[float, typer.Option(min=0, max=1, help=(
        "Augmentation: per-modality intensity gain and shift within ± this."))] = 0.1,
    gamma: Annotated[float, typer.Option(min=0, max=2, help=(
        "Augmentation: per-modality gamma curve, exponent within [1/(1+G), 1+G]; 0: none."
    ))] = 0.0,
    low_res: Annotated[float, typer.Option(min=0, max=1, help=(
        "Augmentation: the share of slices seen at a lower resolution (voxels up to 2x "
        "larger per axis, interpolated back); 0: none."))] = 0.0,
    lr: Annotated[float, typer.Option(min=0, help="Learning rate (RMSprop).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(min=0, help="Weight decay (L2).")] = 1e-4,
    loss: Annotated[str, typer.Option(
        help="ce (reference), dice_ce (+ Dice of the tumor classes) or region_dice_ce "
             "(+ Dice of the regions WT, TC, ET).")] = "ce",
    schedule: Annotated[str, typer.Option(help="constant (reference) or cosine.")] = "constant",
    minutes: Annotated[float | None, typer.Option(help=(
        "Time budget: the epoch running when it is spent ends early (and is validated and "
        "checkpointed); no later epoch starts."))] = None,
    growth_rate: Annotated[int, typer.Option(help="8: reference; 16: FC-DenseNet103.")] = 8,
    val_cases: Annotated[str | None, typer.Option(help="Comma-separated case ids.")] = None,
    val_fraction: Annotated[float, typer.Option(min=0, max=0.9, help=(
        "Share of the cases held out for validation, drawn with --seed (instead of "
        "--val-cases or --fold)."))] = 0.0,
    fold: Annotated[str | None, typer.Option(help=(
        "I/K: validate on fold I of K, I counting from 0 (0 to K-1), e.g. 0/5."))] = None,
    seed: Annotated[int, typer.Option(help=(
        "Seed of the weights' start, the slices drawn and their augmentation."))] = 0,
    planes: Annotated[str, typer.Option(help=(
        "Comma-separated planes the slices are drawn from: axial (the reference), coronal, "
        "sagittal."))] = "axial",
    init: Annotated[Path | None, typer.Option(help=(
        "Weights to start from (fine-tune), e.g. the shipped model."))] = None,
    teacher: Annotated[list[Path] | None, typer.Option(help=(
        "Weights whose mean softmax the model also learns (distillation; repeat for several, "
        "e.g. the shipped model and its partner)."))] = None,
    distill: Annotated[float, typer.Option(help=(
        "Weight of the KL divergence from the teachers' softmax in the loss (with "
        "--teacher)."))] = 1.0,
    compile: Annotated[bool, typer.Option(help="torch.compile the model.")] = False,
    resume: Annotated[bool, typer.Option(help=(
        "Continue the run in OUTPUT with its recipe; --epochs or --minutes given with it "
        "lengthen the run (constant schedule)."))] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train the Tiramisu on labelled BraTS cases (CUDA when present, else all CPU cores).
    Needs PyTorch: tiramisu-brats\\[train].

    Under torchrun: data-parallel over all its processes (docs/distributed.md).
    """
    try:
        from tiramisu_brats import train as ttrain
        from tiramisu_brats.model import TiramisuConfig
    except ImportError as err:
        if err.name != "torch":
            raise
        raise fail("train needs PyTorch: pip install 'tiramisu-brats[train]'") from None

    if _given(ctx, "distill") and not teacher and not resume:
        raise fail("--distill weighs the teachers' softmax in the loss: give --teacher too")
    exists = "pass --resume to continue it, or another output folder"
    try:
        with user_errors(exists), progress_bar(progress) as bar:
            recipe = dict(
                model=TiramisuConfig(growth_rate=growth_rate), epochs=epochs,
                steps_per_epoch=steps_per_epoch, batch_size=batch_size, patch=patch,
                tumor_share=tumor_share, rotate_deg=rotate_deg, zoom=zoom, intensity=intensity,
                gamma=gamma, low_res=low_res, lr=lr, weight_decay=weight_decay, loss=loss,
                schedule=schedule,
                minutes=minutes, seed=seed, compile=compile, micro_batches=micro_batches,
                planes=[p.strip() for p in planes.split(",")],
                teachers=[str(t) for t in teacher or ()],
                distill=distill if teacher or resume else 0.0)
            if resume:  # the stored recipe, lengthened or repeated by the options given
                option = {"model": "growth_rate", "teachers": "teacher"}
                recipe = {k: v for k, v in recipe.items() if _given(ctx, option.get(k, k))}
            steps = TrainProgress(bar)
            run = ttrain.run_from_folders(
                data, output, cache=cache, resume=resume, fold=parse_fold(fold),
                val_cases=[v.strip() for v in val_cases.split(",")] if val_cases else (),
                val_fraction=val_fraction, init=init,
                on_cache=lambda folders: bar.track(folders, description="caching cases"),
                on_start=steps.start, on_step=steps.step, **recipe)
    except KeyboardInterrupt:
        # Under torchrun every process is interrupted: rank 0 alone says it.
        if (output / "checkpoint.safetensors").exists() and os.environ.get("RANK", "0") == "0":
            console.print(f"interrupted: {output} holds the last complete epoch; --resume "
                          "continues the run from it", highlight=False)
        raise typer.Exit(130) from None
    if not run.world.main:  # only rank 0 prints
        return
    if resume and run.rows and not steps.steps:
        out.print(f"{output}: the run had completed its {len(run.rows)} epochs already; nothing "
                  "was trained (--epochs or --minutes given with --resume lengthen it)",
                  highlight=False)
    elif run.rows:
        last = run.rows[-1]
        scores = (f"validation Dice WT {last['val_dice_WT']:.3f} TC {last['val_dice_TC']:.3f} "
                  f"ET {last['val_dice_ET']:.3f}" if run.val_set else "no validation cases")
        out.print(f"epoch {last['epoch']}: loss {last['train_loss']:.4f}, {scores}",
                  highlight=False)
    out.print(f"run folder: {output} (log.csv, curves.png, model_best.safetensors, "
              "model_last.safetensors, checkpoint.safetensors to resume)", highlight=False)


VIEW_EXAMPLES = """Examples:

- `tiramisu-brats view CASE_DIR seg.nii.gz --open`: one case and its labels.
- `tiramisu-brats view out --open`: the output folder of `segment` on a folder of cases.
"""


@app.command(epilog=VIEW_EXAMPLES)
def view(
    case: Annotated[Path, typer.Argument(help=(
        "A case folder (any layout segment reads), or the output folder of segment on a "
        "folder of cases (its index.html, or a page linking each shard's; each case a "
        "link)."))],
    labels: Annotated[Path | None, typer.Argument(help=(
        "Label map on the case's grid (.nii.gz); not with an output folder."))] = None,
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 0,
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help=(
        "Open the page in the default browser."))] = False,
) -> None:
    """View a case and a label map in the browser (NiiVue: three planes and a 3D render, the
    labels over any of the four images), or a segmented folder's report with a viewer link per
    case, served on 127.0.0.1 until Ctrl-C."""
    from tiramisu_brats import viewer

    with user_errors():
        if labels is None:
            server = viewer.serve_folder(case, port)
        else:
            server = viewer.serve(io.find_case_files(case), labels, port)
    what = case if labels is None else f"{case} with {labels}"
    out.print(f"viewing {what} at {server.url} (Ctrl-C stops)", highlight=False)
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        out.print("stopped", highlight=False)
    finally:
        server.server_close()
