"""The command line, end to end: exit codes, files written, numbers in them."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from tiramisu_brats import io
from tiramisu_brats.cli import app
from tiramisu_brats.export import default_weights

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_segment_writes_a_label_map_on_the_input_grid_with_a_summary(small_cases, tiny_weights,
                                                                     tmp_path):
    case = small_cases / "syn-0"
    out = tmp_path / "syn-0.nii.gz"
    result = run("segment", case, "-o", out, "--model", tiny_weights, "--backend", "torch",
                 "--no-progress", "--save-raw")
    assert result.exit_code == 0, result.output
    ref = nib.load(case / "syn-0_t1.nii.gz")
    img = nib.load(out)
    assert img.shape == ref.shape and img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(img.affine, ref.affine)
    np.testing.assert_array_equal(img.header.get_sform(), ref.header.get_sform())
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2, 4}
    summary = json.loads((tmp_path / "syn-0.json").read_text())
    assert summary["case"] == "syn-0" and summary["shape"] == list(ref.shape)
    assert set(summary["timings_s"]) == {"load", "preprocess", "infer", "postprocess", "save",
                                         "total"}
    labels = np.asarray(img.dataobj)
    assert summary["volumes_ml"]["WT_ml"] == pytest.approx(np.count_nonzero(labels) / 1000)
    assert (tmp_path / "syn-0_raw.nii.gz").exists()
    for stage in ("load", "infer", "save"):
        assert stage in result.output
    qc = summary["qc"]
    said = "quality score " + f"{qc['score']:.2f}" + (", to review" if qc["review"] else "")
    assert said in result.output and qc["why"] in " ".join(result.output.split())


@pytest.mark.slow
def test_whole_slices_runs_the_network_on_whole_slices(small_cases, tiny_weights, tmp_path):
    from tiramisu_brats.api import Segmenter

    case = small_cases / "syn-0"
    labels = {}
    for flag, margin in (("--whole-slices", None), ("--brain-windows", 8)):
        out = tmp_path / f"{flag}.nii.gz"
        result = run("segment", case, "-o", out, "--model", tiny_weights, "--backend", "torch",
                     "--no-progress", "--no-postprocess", flag)
        assert result.exit_code == 0, result.output
        summary = json.loads(out.with_name(f"{flag}.json").read_text())
        assert summary["model"]["brain_window_margin"] == margin
        labels[margin] = np.asarray(nib.load(out).dataobj)
    image = io.read_case(io.find_case_files(case)).image
    for margin, expected in labels.items():
        segmenter = Segmenter(tiny_weights, "torch", whole_slices=margin is None,
                              postprocess=False)
        np.testing.assert_array_equal(segmenter.segment(image).labels, expected)
    # Defaults: whole slices with torch (its memory grows with every new input shape), brain
    # windows with the ONNX backends.
    assert Segmenter(tiny_weights, "torch").margin is None
    assert Segmenter(tiny_weights, "openvino").margin == 8


@pytest.mark.parametrize(("flags", "tumor_slices"), [
    ((), True), (("--all-slices",), False), (("--no-postprocess",), False),
    (("--save-raw",), False), (("--no-postprocess", "--tumor-slices"), True)])
def test_tumor_slices_by_default_when_postprocessing(small_cases, tiny_weights, tmp_path, flags,
                                                     tumor_slices):
    out = tmp_path / "o.nii.gz"
    result = run("segment", small_cases / "syn-0", "-o", out, "--model", tiny_weights,
                 "--backend", "torch", "--no-progress", *flags)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o.json").read_text())
    assert summary["model"]["tumor_slices"] is tumor_slices
    brain, run_ = summary["slices"]["brain"], summary["slices"]["run"]
    assert 0 < run_ <= brain <= 32 and (tumor_slices or run_ == brain)


@pytest.mark.slow
def test_console_command_exits_with_its_status_and_all_output(small_cases, tiny_weights,
                                                             tmp_path):
    """``python -m tiramisu_brats`` (as the installed command) exits at once after a command:
    its output printed, its files written, its exit status kept."""
    from tiramisu_brats import __version__

    def command(*args):
        return subprocess.run([sys.executable, "-m", "tiramisu_brats", *map(str, args)],
                              capture_output=True, text=True, timeout=300)

    version = command("--version")
    assert (version.returncode, version.stdout.strip()) == (0, __version__)
    no_command = command("--verbose")  # options but no command
    assert no_command.returncode == 2 and "missing command" in no_command.stderr
    out = tmp_path / "o.nii.gz"
    done = command("segment", small_cases / "syn-0", "-o", out, "--model", tiny_weights,
                   "--backend", "torch", "--no-progress")
    assert done.returncode == 0, done.stderr
    printed = " ".join(done.stderr.split())  # what the run reports goes to stderr
    assert f"wrote {out}" in printed and "seconds per stage" in printed
    # the case was read and preprocessed ahead, in a thread: one column says so
    assert "load + preprocess" in printed and "┃ preprocess" not in printed
    assert json.loads((tmp_path / "o.json").read_text())["case"] == "syn-0"
    missing = command("segment", tmp_path / "nope", "-o", tmp_path / "x.nii.gz")
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_the_command_starts_no_blas_threads():
    """Importing the command line loads NumPy and SciPy without their OpenBLAS thread pools
    (which spin at start-up on every core), unless the user asks for them."""
    code = ("import os, tiramisu_brats.cli, scipy.ndimage, numpy; "
            "print(len(os.listdir('/proc/self/task')), os.environ['OPENBLAS_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}

    def threads(**extra):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**env, **extra}, check=True)
        return done.stdout.split()

    assert threads() == ["1", "1"]
    allowed = threads(OPENBLAS_NUM_THREADS="2")  # what the test would see without the setting
    assert int(allowed[0]) > 1 and allowed[1] == "2"


def test_segment_refuses_to_overwrite_without_the_flag(small_cases, tiny_weights, tmp_path):
    out = tmp_path / "x.nii.gz"
    out.write_bytes(b"precious")
    args = ("segment", small_cases / "syn-1", "-o", out, "--model", tiny_weights, "--backend",
            "torch", "--no-progress")
    result = run(*args)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert out.read_bytes() == b"precious"
    assert run(*args, "--overwrite").exit_code == 0
    assert nib.load(out).shape == (48, 40, 32)


def test_segment_output_of_the_wrong_kind_is_refused_before_the_model_loads(
        small_cases, tiny_weights, tmp_path, monkeypatch):
    from tiramisu_brats import api

    common = ("--model", tiny_weights, "--backend", "torch", "--no-progress")
    monkeypatch.setattr(api, "Segmenter", None)  # loading a model would fail the test
    result = run("segment", small_cases, "-o", tmp_path / "all.nii.gz", *common)
    assert result.exit_code == 2 and result.output == (
        f"error: {tmp_path / 'all.nii.gz'}: named like a label map, but the output for a folder "
        f"of cases is a folder ({small_cases} holds no case itself)\n")
    assert not (tmp_path / "all.nii.gz").exists()
    (tmp_path / "dir.nii.gz").mkdir()
    result = run("segment", small_cases / "syn-0", "-o", tmp_path / "dir.nii.gz", "--overwrite",
                 *common)
    assert result.exit_code == 2 and result.output == (
        f"error: {tmp_path / 'dir.nii.gz'}: a folder; the output of one case is a label map "
        "file\n")
    # A folder the user may not write into (root may write anywhere: os.access is asked).
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(api.os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    for output, said in ((tmp_path / "ro", f"{tmp_path / 'ro'}: output folder is not writable"),
                         (tmp_path / "ro" / "new", f"{tmp_path / 'ro' / 'new'}: "
                                                   f"{tmp_path / 'ro'} is not writable")):
        with pytest.raises(io.InputError, match=f"^{said}$"):
            api.segment_cohort(small_cases, output, model=tiny_weights, backend="torch")


def test_segment_interrupted_says_what_was_finished_and_how_to_go_on(small_cases, tmp_path,
                                                                     monkeypatch):
    from tiramisu_brats import api

    def interrupted(input, output, *, on_event, **options):
        on_event("cases", "", 3)
        on_event("case", "syn-0", output / "syn-0.nii.gz")
        on_event("wrote", "syn-0", output / "syn-0.nii.gz")
        on_event("case", "syn-1", output / "syn-1.nii.gz")
        raise KeyboardInterrupt  # as Ctrl-C does, in the second case

    monkeypatch.setattr(api, "segment_cohort", interrupted)
    result = run("segment", small_cases, "-o", tmp_path / "all", "--no-progress")
    assert result.exit_code == 130
    assert result.output.splitlines()[-1] == (
        f"interrupted: 1 case(s) finished in {tmp_path / 'all'}; --skip-existing goes on with "
        "the others (a case without its JSON summary is done again)")


def _without_flair(case: Path, folder: Path) -> Path:
    """``folder``: links to the files of ``case`` but its FLAIR (an incomplete case)."""
    folder.mkdir()
    for f in case.iterdir():
        if "flair" not in f.name:
            (folder / f.name).symlink_to(f)
    return folder


def test_messages_are_not_cut_at_the_terminal_width(small_cases, tiny_weights, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "syn-0").symlink_to(small_cases / "syn-0")
    broken = _without_flair(small_cases / "syn-1", cases / "incomplete-case-with-a-long-name")
    result = run("segment", cases, "-o", tmp_path / "out", "--model", tiny_weights,
                 "--backend", "torch", "--no-progress")
    assert result.exit_code == 1, result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed incomplete")]
    assert failed == [f"failed incomplete-case-with-a-long-name: {broken}: no flair image "
                      "(expected <case>_flair.nii.gz, BraTS 2017-2021 naming)"]  # one line
    assert len(failed[0]) > 80


def test_segment_skips_finished_cases_and_says_so(small_cases, tiny_weights, tmp_path):
    common = ("--model", tiny_weights, "--backend", "torch", "--no-progress")
    out = tmp_path / "one.nii.gz"
    assert run("segment", small_cases / "syn-1", "-o", out, *common).exit_code == 0
    done = out.stat().st_mtime_ns
    result = run("segment", small_cases / "syn-1", "-o", out, "--skip-existing", *common)
    assert result.exit_code == 0 and out.stat().st_mtime_ns == done
    said = " ".join(result.output.split())  # the console wraps long lines
    assert f"{out}: left as it was (an earlier run finished syn-1)" in said
    folder = tmp_path / "all"
    first = run("segment", small_cases, "-o", folder, *common)
    assert first.exit_code == 0
    flagged = " ".join(first.output.split()).split("to review (QC): ")[1]
    result = run("segment", small_cases, "-o", folder, *common)  # again, nothing asked
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "nothing was written" in said and "--skip-existing" in said
    result = run("segment", small_cases, "-o", folder, "--skip-existing", *common)
    cases = len(io.find_cases(small_cases))
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and f"0 segmented, {cases} skipped (done before), 0 failed" in said
    assert said.endswith(f"to review (QC): {flagged}")  # as the run that made them judged them


def test_brats2023_label_convention(small_cases, tiny_weights, tmp_path):
    from tiramisu_brats.api import Segmenter

    files = io.find_case_files(small_cases / "syn-2")
    seg = Segmenter(tiny_weights, "torch")
    seg.segment_case(files, tmp_path / "a.nii.gz")
    seg.segment_case(files, tmp_path / "b.nii.gz", convention="brats2023")
    a = np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "b.nii.gz").dataobj)
    np.testing.assert_array_equal(np.where(a == 4, 3, a), b)


def test_segment_case_takes_a_case_prepared_ahead(small_cases, tiny_weights, tmp_path):
    from tiramisu_brats.api import Segmenter, prepare_case

    files = io.find_case_files(small_cases / "syn-1")
    seg = Segmenter(tiny_weights, "torch")
    ways = {"read": io.read_case, "prepared": lambda f: prepare_case(io.read_case(f)),
            "other crop": lambda f: prepare_case(io.read_case(f), crop=(64, 64))}
    labels, preprocess_s = {}, {}
    for name, read in ways.items():
        out = tmp_path / f"{name}.nii.gz"
        preprocess_s[name] = seg.segment_case(files, out, read=read)["timings_s"]["preprocess"]
        labels[name] = np.asarray(nib.load(out).dataobj)
    np.testing.assert_array_equal(labels["prepared"], labels["read"])
    np.testing.assert_array_equal(labels["other crop"], labels["read"])  # prepared again
    assert preprocess_s["prepared"] == 0 < preprocess_s["read"]
    assert preprocess_s["other crop"] > 0


@pytest.mark.slow
def test_cohort_segment_and_evaluate_match_numpy_dice(small_cases, tiny_weights, tmp_path):
    preds = tmp_path / "preds"
    result = run("segment", small_cases, "-o", preds, "--model", tiny_weights, "--backend",
                 "torch", "--no-progress", "--save-raw")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in preds.glob("*.nii.gz") if "_raw" not in p.name) == [
        "syn-0.nii.gz", "syn-1.nii.gz", "syn-2.nii.gz"]
    review = [c for c in ("syn-0", "syn-1", "syn-2")
              if json.loads((preds / f"{c}.json").read_text())["qc"]["review"]]
    said = "3 segmented, 0 failed" + (f"; {len(review)} to review (QC): {', '.join(review)}"
                                       if review else "")
    assert said in " ".join(result.output.split())
    # Replace one prediction with the truth, another with a shifted truth: known answers.
    truth = {c: io.read_label_map(small_cases / c / f"{c}_seg.nii.gz")[0] for c in
             ("syn-0", "syn-1", "syn-2")}
    ref_img = nib.load(small_cases / "syn-0" / "syn-0_t1.nii.gz")
    io.write_label_map(preds / "syn-0.nii.gz", truth["syn-0"], ref_img.header, ref_img.affine,
                       overwrite=True)
    report = tmp_path / "report"
    result = run("evaluate", preds, small_cases, "-o", report, "--no-progress")
    assert result.exit_code == 0, result.output
    rows = {r["case"]: r for r in csv.DictReader(open(report / "metrics.csv"))}
    assert float(rows["syn-0"]["dice_WT"]) == 1.0
    for case, row in rows.items():
        pred = np.asarray(nib.load(preds / f"{case}.nii.gz").dataobj)
        for region, labels in (("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,))):
            a, b = np.isin(pred, labels), np.isin(truth[case], labels)
            expected = 2 * np.sum(a & b) / (a.sum() + b.sum()) if a.sum() + b.sum() else 1.0
            assert float(row[f"dice_{region}"]) == pytest.approx(expected, abs=1e-6)
    for name in ("metrics.csv", "metrics_raw.csv", "summary.json", "boxplots.png",
                 "overlay_syn-0.png"):
        assert (report / name).exists(), name
    summary = json.loads((report / "summary.json").read_text())
    assert summary["n_cases"] == 3


@pytest.mark.slow
def test_demo_runs_the_whole_job(tiny_weights, tmp_path, caplog):
    result = run("demo", "-o", tmp_path / "demo", "--model", tiny_weights, "--backend", "torch",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    demo = tmp_path / "demo"
    assert (demo / "synthetic-000.nii.gz").exists() and (demo / "synthetic-000.json").exists()
    assert (demo / "report" / "metrics.csv").exists()
    assert (demo / "report" / "overlay_synthetic-000.png").exists()
    assert "Dice against the known tumor" in result.output
    assert not (demo / "synthetic-000_raw.nii.gz").exists()
    assert not (demo / "report" / "metrics_raw.csv").exists()
    # The demo segments as segment does: the same slices through the network, the same labels.
    seg = tmp_path / "seg.nii.gz"
    assert run("segment", demo / "input" / "synthetic-000", "-o", seg, "--model", tiny_weights,
               "--backend", "torch", "--no-progress").exit_code == 0
    ours = json.loads((demo / "synthetic-000.json").read_text())
    theirs = json.loads(seg.with_name("seg.json").read_text())
    assert ours["slices"] == theirs["slices"] and ours["model"] == theirs["model"]
    assert ours["model"]["tumor_slices"]
    assert f"quality score {ours['qc']['score']:.2f}" in result.output
    assert np.array_equal(nib.load(seg).get_fdata(),
                          nib.load(demo / "synthetic-000.nii.gz").get_fdata())
    assert run("demo", "-o", demo, "--model", tiny_weights, "--no-progress").exit_code == 2
    # Again over it with another case: scored alone, not with the earlier demo's label map.
    result = run("demo", "-o", demo, "--model", tiny_weights, "--backend", "torch", "--seed", 1,
                 "--overwrite", "--no-progress")
    assert result.exit_code == 0 and "Dice against the known tumor" in result.output
    assert "no reference" not in caplog.text, caplog.text
    assert "synthetic-001" in (demo / "report" / "metrics.csv").read_text()


def test_demo_refuses_a_folder_of_cases_or_a_file_for_output_before_writing(
        small_cases, tiny_weights, tmp_path):
    out = tmp_path / "demo"
    result = run("demo", "-o", out, "--case", small_cases, "--model", tiny_weights,
                 "--no-progress")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{small_cases}: a folder of cases" in said
    assert not out.exists()  # nothing left behind
    result = run("demo", "-o", out, "--seed", -1, "--no-progress")  # before any folder is made
    assert result.exit_code == 2 and "--seed" in result.output and not out.exists()
    result = run("demo", "-o", out, "--case", tmp_path / "nowhere", "--no-progress")
    assert result.exit_code == 2 and not out.exists()
    assert result.output == f"error: {tmp_path / 'nowhere'}: not a folder\n"
    (tmp_path / "file").write_text("x")
    result = run("demo", "-o", tmp_path / "file", "--no-progress")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "file: not a folder (the demo writes a folder)" in said


@pytest.mark.slow
def test_demo_save_raw_adds_the_map_before_postprocessing(tiny_weights, tmp_path):
    result = run("demo", "-o", tmp_path, "--model", tiny_weights, "--backend", "torch",
                 "--save-raw", "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "synthetic-000.json").read_text())
    assert summary["slices"]["run"] == summary["slices"]["brain"]  # every slice for the raw map
    assert (tmp_path / "synthetic-000_raw.nii.gz").exists()
    assert (tmp_path / "report" / "metrics_raw.csv").exists()


def test_missing_modality_is_a_one_line_error(small_cases, tiny_weights, tmp_path):
    case = _without_flair(small_cases / "syn-0", tmp_path / "broken")
    result = run("segment", case, "-o", tmp_path / "o.nii.gz", "--model", tiny_weights,
                 "--no-progress")
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: {case}: no flair image (expected <case>_flair.nii.gz, "
                             "BraTS 2017-2021 naming)\n")
    assert not (tmp_path / "o.nii.gz").exists()


def test_an_implausible_voxel_size_is_a_one_line_error_naming_the_file(tmp_path, tiny_weights):
    from tiramisu_brats.synthetic import make_case, write_case

    case = make_case(0, shape=(48, 40, 32), case_id="big")
    folder = write_case(dataclasses.replace(case, affine=case.affine * [[20], [20], [20], [1]]),
                        tmp_path)
    result = run("segment", folder, "-o", tmp_path / "o.nii.gz", "--model", tiny_weights,
                 "--no-progress")
    t1 = io.find_case_files(folder).images[0]
    assert result.exit_code == 2, result.output
    assert f"{t1}: voxels of 20x20x20 mm (from the affine)" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "o.nii.gz").exists()


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("case", ["brats-labeled/BraTS2021_00005",
                                  "brats2023-unlabeled/BraTS-GLI-00001-000"])
def test_shipped_model_segments_real_cases(real_case, tmp_path, case):
    case_dir = real_case(case)
    out = tmp_path / "out.nii.gz"
    result = run("segment", case_dir, "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    files = io.find_case_files(case_dir)
    ref = nib.load(files.images[0])
    img = nib.load(out)
    assert img.shape == ref.shape == (240, 240, 155)
    np.testing.assert_array_equal(img.affine, ref.affine)
    labels = np.asarray(img.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 4} and np.count_nonzero(labels) > 1000
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["model"]["tumor_slices"] is True
    assert summary["slices"]["run"] < summary["slices"]["brain"]
    every = tmp_path / "every.nii.gz"  # every brain slice through the network: same labels
    assert run("segment", case_dir, "-o", every, "--no-progress", "--all-slices").exit_code == 0
    np.testing.assert_array_equal(np.asarray(nib.load(every).dataobj), labels)
    if files.seg is not None:  # a case the shipped model never saw in training
        report = tmp_path / "report"
        assert run("evaluate", out, files.seg, "-o", report, "--no-progress").exit_code == 0
        row = next(csv.DictReader(open(report / "metrics.csv")))
        assert float(row["dice_WT"]) > 0.5


def test_the_shipped_model_is_in_the_package():
    from tiramisu_brats.model import REFERENCE, read_config

    config, header = read_config(default_weights())
    assert config == REFERENCE  # the Tiramisu of the paper: 48 maps, blocks 4..15..4, k 8
    assert header["recipe"]


def test_quantize_says_what_is_wrong_without_labelled_cases(tmp_path, tiny_weights):
    from tiramisu_brats.synthetic import make_case, write_case

    write_case(make_case(0, shape=(48, 40, 32)), tmp_path / "cases", with_seg=False)
    result = run("quantize", tmp_path / "cases", "--model", tiny_weights, "--no-progress")
    assert result.exit_code == 2, result.output
    assert "no labelled cases in" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("**/*.int8.*")) and not list(tiny_weights.parent.glob("*.int8.*"))


def test_help_reflows_docstrings_and_shows_file_name_patterns():
    def help_of(*command):  # wide, so that no file name is cut at a column's edge
        return runner.invoke(app, [*command, "--help"], env={"COLUMNS": "240"}).output

    listing = " ".join(help_of().split())
    # a command's docstring reads as one paragraph, markup rendered rather than printed
    assert "The case is segmented exactly as segment does it." in listing
    assert "``" not in listing
    segment = help_of("segment")
    for pattern in ("<case>_t1", "<case>-t1n", "<case>_0000", "<name>_raw.nii.gz"):
        assert pattern in segment


def test_the_examples_in_help_use_options_their_command_has():
    import re

    import typer.main

    from tiramisu_brats import cli

    group = typer.main.get_command(app)
    for name, examples in (("segment", cli.SEGMENT_EXAMPLES), ("evaluate", cli.EVALUATE_EXAMPLES),
                           ("train", cli.TRAIN_EXAMPLES), ("view", cli.VIEW_EXAMPLES)):
        known = {o for p in group.commands[name].params for o in p.opts + p.secondary_opts}
        used = set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", examples))
        used -= {"-v"}  # the app's option, before the command
        assert used and used <= known, (name, used - known)
        assert f"tiramisu-brats {name} " in examples
        shown = " ".join(runner.invoke(app, [name, "--help"]).output.split())
        assert f"Examples: • tiramisu-brats {name} " in shown


def test_train_with_teachers_records_them(small_cases, tiny_weights, tmp_path):
    from tiramisu_brats.export import file_sha256

    run_dir = tmp_path / "run"
    args = ("train", small_cases, "-o", run_dir, "--epochs", 1, "--steps-per-epoch", 1,
            "--batch-size", 2, "--patch", 32, 32, "--val-fraction", 0.3, "--no-progress")
    result = run(*args, "--teacher", tmp_path / "none.safetensors")
    assert result.exit_code == 2 and "none.safetensors: teacher weights not found" in result.output
    result = run(*args, "--teacher", tiny_weights, "--distill", 0.5)
    assert result.exit_code == 0, result.output
    stored = json.loads((run_dir / "train_config.json").read_text())
    assert stored["teachers"] == [str(tiny_weights)] and stored["distill"] == 0.5
    assert stored["teachers_sha256"] == [file_sha256(tiny_weights)]


def test_quantize_refuses_an_incomplete_case_no_case_to_calibrate_on_and_a_negative_tolerance(
        small_cases, tiny_weights, tmp_path, monkeypatch):
    from tiramisu_brats import export

    monkeypatch.setattr(export, "require_nncf", lambda source: None)  # installed or not
    cases = tmp_path / "cases"
    for case in ("syn-0", "syn-1"):
        (cases / case).mkdir(parents=True)
        for f in (small_cases / case).iterdir():
            if f.name != "syn-1_t1ce.nii.gz":  # labelled, but one image short
                (cases / case / f.name).symlink_to(f)
    refused = [
        ((cases,), f"error: {cases / 'syn-1'}: no t1ce image (expected <case>_t1ce.nii.gz"),
        ((small_cases, "--holdout", "syn-0, syn-1 ,syn-2"),  # spaces as typed
         "error: all 3 labelled cases are held out: no case is left to calibrate on"),
        ((small_cases, "--tolerance", -1), "error: tolerance -1.0: a change of Dice must be 0 "
                                           "or more"),
    ]
    for args, message in refused:
        result = run("quantize", *args, "--model", tiny_weights, "--no-progress")
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    assert not list(tiny_weights.parent.glob("*.int8.*"))


TRAIN_SMALL = ("--steps-per-epoch", 1, "--batch-size", 2, "--patch", 32, 32, "--growth-rate", 2,
               "--no-progress")


def test_train_refuses_a_bad_model_or_patch_in_one_line_before_writing(small_cases, tmp_path):
    for options, message in ((("--growth-rate", 0), "error: invalid model config: "),
                             (("--patch", -32, 64), "error: patch (-32, 64) must be positive "
                                                    "multiples of 32"),
                             (("--distill", 0.5), "error: --distill weighs the teachers' softmax"),
                             (("--fold", "a/b"), "error: fold 'a/b': expected I/K, e.g. 0/5"),
                             (("--fold", "0/3", "--val-fraction", 0.3),
                              "error: the validation split is given 2 ways (a fold, a "
                              "validation fraction)")):
        result = run("train", small_cases, "-o", tmp_path / "run", *TRAIN_SMALL, *options)
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.count("\n") == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_resume_keeps_the_run_its_split_and_its_cache(small_cases, tiny_weights,
                                                            tmp_path):
    run_dir, shared = tmp_path / "run", tmp_path / "shared"
    result = run("train", small_cases, "-o", run_dir, "--cache", shared, "--epochs", 2,
                 "--val-cases", "syn-2", *TRAIN_SMALL)
    assert result.exit_code == 0, result.output
    before = (run_dir / "checkpoint.safetensors").read_bytes()
    refused = [
        (("--epochs", 1), "the run has completed 2 epochs; it cannot go on with 1"),
        (("--val-cases", "syn-0"), "differs in val_cases (('syn-0',), stored ('syn-2',))"),
        (("--val-fraction", 0.7), "differs in val_cases (('syn-0', 'syn-2'), stored ('syn-2',))"),
        (("--distill", 0.5), "differs in distill (0.5, stored 0.0)"),
        (("--teacher", tiny_weights), f"differs in teachers (('{tiny_weights}',), stored ())"),
        (("--init", tiny_weights), f"differs in init ('{tiny_weights}', stored '')"),
    ]
    for options, message in refused:
        result = run("train", small_cases, "-o", run_dir, "--resume", *options, "--no-progress")
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and f"error: {run_dir}: " in said, result.output
        assert message in said and "training on" not in said, result.output
    assert (run_dir / "checkpoint.safetensors").read_bytes() == before
    assert json.loads((run_dir / "train_config.json").read_text())["epochs"] == 2
    # no --cache: the run's own, not a new one in the run folder
    result = run("train", small_cases, "-o", run_dir, "--resume", "--epochs", 3, "--no-progress")
    assert result.exit_code == 0, result.output
    assert not (run_dir / "cache").exists()
    with open(run_dir / "log.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]
    # Resumed as it is, a finished run says so rather than print its last epoch as new.
    done = (run_dir / "checkpoint.safetensors").read_bytes()
    result = run("train", small_cases, "-o", run_dir, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (f"{run_dir}: the run had completed its 3 epochs already; nothing was trained "
            "(--epochs or --minutes given with --resume lengthen it)") in result.output
    assert "epoch 3:" not in result.output
    assert (run_dir / "checkpoint.safetensors").read_bytes() == done


def test_train_interrupted_says_how_to_go_on(small_cases, tmp_path, monkeypatch):
    from tiramisu_brats import train as ttrain

    train_epoch, stop = ttrain._train_epoch, []

    def interrupted(run, epoch, start, on_step):
        if epoch == stop[-1]:
            raise KeyboardInterrupt  # as Ctrl-C does
        return train_epoch(run, epoch, start, on_step)

    monkeypatch.setattr(ttrain, "_train_epoch", interrupted)
    run_dir = tmp_path / "run"
    args = ("train", small_cases, "-o", run_dir, "--epochs", 3, *TRAIN_SMALL)
    stop.append(1)  # no epoch completed: nothing to go on from
    result = run(*args)
    assert result.exit_code == 130 and "resume" not in result.output, result.output
    result = run("train", small_cases, "-o", run_dir, "--resume", "--no-progress")
    assert result.exit_code == 2, result.output
    assert (f"error: {run_dir}: nothing to resume: no epoch of the run was completed (no "
            "checkpoint.safetensors); the run can start anew, without resuming"
            in " ".join(result.output.split()))
    assert "training on" not in result.output
    stop.append(2)
    result = run(*args)
    assert result.exit_code == 130, result.output
    assert (f"interrupted: {run_dir} holds the last complete epoch; --resume continues the run "
            "from it" in " ".join(result.output.split()))


def test_train_without_pytorch_says_which_extra_brings_it(tmp_path, monkeypatch):
    import tiramisu_brats

    monkeypatch.setitem(sys.modules, "torch", None)  # an install without PyTorch
    for name in ("train", "model", "data"):
        monkeypatch.delitem(sys.modules, f"tiramisu_brats.{name}", raising=False)
        monkeypatch.delattr(tiramisu_brats, name, raising=False)
    result = run("train", tmp_path, "-o", tmp_path / "run", "--no-progress")
    said = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "train needs PyTorch: pip install 'tiramisu-brats[train]'" in said
