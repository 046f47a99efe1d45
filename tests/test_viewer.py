"""The NiiVue viewer and the HTML report, also in a real headless browser (Chromium with
SwiftShader's software WebGL), skipped where no Chromium can be had."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from matplotlib.image import imread

from tiramisu_brats import io, report, viewer
from tiramisu_brats.synthetic import make_case, write_case

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                       "google-chrome")) if p), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason=(
    "no Chromium on this machine (apt-get install chromium; .ci/run installs it)"))
# No network at all (every host name fails to resolve), and software WebGL: Chromium 144 and
# later no longer fall back to it by themselves.
FLAGS = ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--enable-logging=stderr",
         "--v=0", "--virtual-time-budget=20000"]


def browser(url: str, *args: str) -> tuple[str, str]:
    """(stdout, console lines) of one headless Chromium run on ``url``."""
    done = subprocess.run([CHROMIUM, *FLAGS, *args, url], capture_output=True, text=True,
                          timeout=180)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, "\n".join(console)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("view")
    folder = write_case(make_case(0, shape=(96, 96, 64), case_id="v"), root)
    files = io.find_case_files(folder)
    server = viewer.serve(files, files.seg)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, files
    server.shutdown()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def test_the_viewer_serves_its_page_niivue_and_the_case_files_only(served):
    server, files = served
    assert server.server_address[0] == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
    status, page = _get(server.url)
    assert status == 200 and b'<script src="niivue.umd.js">' in page
    assert b"http" not in page.replace(b"http-equiv", b"")  # nothing from the network
    status, js = _get(server.url + "niivue.umd.js")
    assert status == 200 and len(js) > 1_000_000
    assert _get(server.url + "flair.nii.gz") == (200, files.images[3].read_bytes())
    assert _get(server.url + "labels.nii.gz")[1] == files.seg.read_bytes()
    assert _get(server.url + "../../etc/passwd")[0] == 404
    assert _get(server.url + "v_t1.nii.gz")[0] == 404  # only the names the page uses


def test_a_missing_label_map_is_a_clear_error(tmp_path):
    folder = write_case(make_case(1, shape=(48, 40, 24), case_id="w"), tmp_path)
    with pytest.raises(io.InputError, match="no such label map"):
        viewer.serve(io.find_case_files(folder), tmp_path / "nothing.nii.gz")


def test_a_label_map_that_is_not_one_of_the_case_is_a_clear_error_before_serving(tmp_path):
    import nibabel as nib

    files = io.find_case_files(write_case(make_case(1, shape=(48, 40, 24), case_id="w"),
                                          tmp_path))
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((48, 40, 25), np.uint8), np.eye(4)), other)
    with pytest.raises(io.InputError, match=r"shape \(48, 40, 25\) differs from the case's "
                                            r"\(48, 40, 24\)"):
        viewer.serve(files, other)
    mixed = tmp_path / "mixed.nii.gz"
    labels = np.zeros((48, 40, 24), np.uint8)
    labels[0, 0, :2] = (3, 4)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), mixed)
    with pytest.raises(io.InputError, match=r"mix 3 .* and 4"):
        viewer.serve(files, mixed)
    text = tmp_path / "labels.nii.gz"
    text.write_text("not an image")
    with pytest.raises(io.InputError, match="not a readable NIfTI file"):
        viewer.serve(files, text)


def test_a_case_folder_without_a_label_map_says_that_one_is_needed(tmp_path):
    folder = write_case(make_case(1, shape=(48, 40, 24), case_id="w"), tmp_path)
    with pytest.raises(io.InputError, match="a case folder; viewing a case needs a label map"):
        viewer.serve_folder(folder)


def test_a_missing_folder_and_a_taken_port_are_named(tmp_path):
    import socket

    with pytest.raises(io.InputError, match=rf"^{tmp_path / 'nope'}: no such folder$"):
        viewer.serve_folder(tmp_path / "nope")
    folder = write_case(make_case(1, shape=(48, 40, 24), case_id="w"), tmp_path)
    labels = tmp_path / "w.nii.gz"
    labels.write_bytes((folder / "w_seg.nii.gz").read_bytes())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"^127\.0\.0\.1 port {port}: Address already in use"):
            viewer.serve(io.find_case_files(folder), labels, port)


def test_case_ids_that_urls_encode_are_served_and_unusable_ones_skipped(tmp_path, caplog):
    import json
    import urllib.parse

    files = {}
    for seed, case_id in enumerate(("case 1", "cas\u00e9", "../x", "q#1?%")):
        folder = write_case(make_case(seed, shape=(32, 32, 24), case_id=f"c{seed}"), tmp_path)
        files[case_id] = io.find_case_files(folder)
        (tmp_path / f"c{seed}.json").write_text(json.dumps({
            "case": case_id, "label_map": files[case_id].seg.relative_to(tmp_path).as_posix(),
            "inputs": [str(p) for p in files[case_id].images]}))
    index = report.write_index_html(tmp_path, [{"case": c, "link": f"view/{c}/"} for c in files],
                                    "t")
    with caplog.at_level("WARNING"):
        server = viewer.serve_folder(tmp_path)
    assert "c2.json: case '../x' is not usable in a URL path; not served" in caplog.text
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for case_id in ("case 1", "cas\u00e9", "q#1?%"):
            url = server.url + "view/" + urllib.parse.quote(case_id) + "/"
            status, page = _get(url)
            assert status == 200 and f"{case_id} (".encode() in page
            assert _get(url + "labels.nii.gz?v=1") == (200, files[case_id].seg.read_bytes())
        assert sorted({k.split("/")[2] for k in server.routes if k.startswith("/view/")}) == [
            "case 1", "cas\u00e9", "q#1?%"]
        # The index's links, resolved as a browser resolves them (a "#" would cut the path)
        links = re.findall(r'class="view" href="([^"]+)"', index.read_text())
        assert len(links) == 4
        for link in (k for k in links if urllib.parse.unquote(k) != "view/../x/"):  # not served
            target = urllib.parse.urldefrag(urllib.parse.urljoin(server.url, link)).url
            assert _get(target)[0] == 200, link
        for outside in ("view/case%201/..%2F..%2Fc0.json", "%2e%2e/%2e%2e/etc/passwd",
                        "view/..%2Fx/"):
            assert _get(server.url + outside)[0] == 404
    finally:
        server.shutdown()


@needs_browser
@pytest.mark.slow
def test_the_viewer_draws_the_labels_in_a_real_browser(served, tmp_path):
    server, files = served
    dom, console = browser(server.url, "--dump-dom")
    assert 'data-ready="1"' in dom and "data-error" not in dom, console
    assert not re.search(r"Uncaught|ERROR:CONSOLE|error:", console), console
    # It opens at the tumor's centre (world mm of the labelled voxels' mean index).
    labels, affine, _ = io.read_label_map(files.seg)
    centre = affine @ [*np.argwhere(labels > 0).mean(0), 1]
    focus = re.search(r'data-focus="([^"]+)"', dom)
    assert focus, dom[:500]
    assert np.allclose([float(v) for v in focus[1].split(",")], centre[:3], atol=0.06)
    shot = tmp_path / "shot.png"
    browser(server.url, f"--screenshot={shot}", "--window-size=1200,800")
    pixels = imread(shot)[80:, :, :3]  # below the tool bar and its legend: the canvas
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    edema = (g - np.maximum(r, b)) > 0.2  # the green of edema over grey
    enhancing = (r > 0.5) & (g > 0.5) & (b < r - 0.25)  # the yellow of enhancing tumor
    assert edema.sum() > 500 and enhancing.sum() > 50, (edema.sum(), enhancing.sum())
    assert (pixels.max(-1) > 0.3).mean() > 0.05  # a drawn brain, not a lost WebGL context


@needs_browser
@pytest.mark.slow
def test_the_report_opens_offline_with_every_case_and_picture(tmp_path):
    rows = []
    for seed in range(3):
        case = make_case(seed, shape=(64, 64, 40))
        name = f"planes_c{seed}.png"
        report.planes_png(case.image[3], case.image[1], case.labels, tmp_path / name,
                          f"c{seed}")
        rows.append({"case": f"c{seed}", "review": seed == 1, "qc_score": 0.3 + 0.2 * seed,
                     "WT_ml": float((case.labels > 0).sum() / 1000), "image": name})
    page = report.write_index_html(tmp_path, rows, "Cohort")
    dom, console = browser(page.as_uri(), "--dump-dom")
    assert 'data-images-shown="3"' in dom, console
    assert dom.count("<tr>") == 4 and not re.search(r"Uncaught|ERROR:CONSOLE", console)
    summary = dom[dom.index('id="summary"'):dom.index("</p>")]
    assert "could not be loaded" not in summary and "1 to review" in summary
    body = dom[dom.index("<tbody>"):]
    assert body.index(">c1<") < body.index(">c0<")  # to review first


def test_the_view_command_says_its_address_and_stops_on_ctrl_c(tmp_path):
    import signal
    import sys

    folder = write_case(make_case(2, shape=(48, 40, 24), case_id="c"), tmp_path)
    files = io.find_case_files(folder)
    # A shell's background job ignores SIGINT, and so would the command started from it.
    proc = subprocess.Popen([sys.executable, "-m", "tiramisu_brats", "view", str(folder),
                             str(files.seg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        status, page = _get(url)
        assert status == 200 and b"niivue.umd.js" in page
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped" in out


@pytest.mark.slow
def test_a_segmented_folder_is_served_with_its_report_and_a_viewer_per_case(tmp_path,
                                                                            tiny_weights):
    from tiramisu_brats import api

    cohort = tmp_path / "cohort"
    for seed in range(2):
        write_case(make_case(seed, shape=(64, 64, 40), case_id=f"c{seed}"), cohort)
    out = tmp_path / "out"
    seg = api.Segmenter(tiny_weights, "torch", crop=(64, 64))
    api.segment_cohort(cohort, out, segmenter=seg)
    page = (out / "index.html").read_text()
    assert 'href="view/c0/"' in page and 'href="view/c1/"' in page
    server = viewer.serve_folder(out)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert _get(server.url)[1] == (out / "index.html").read_bytes()
        assert _get(server.url + "c0_planes.png")[0] == 200
        status, viewer_page = _get(server.url + "view/c1/")
        assert status == 200 and b"c1 (c1.nii.gz)" in viewer_page
        files = io.find_case_files(cohort / "c1")
        assert _get(server.url + "view/c1/flair.nii.gz")[1] == files.images[3].read_bytes()
        assert _get(server.url + "view/c1/labels.nii.gz")[1] == (out / "c1.nii.gz").read_bytes()
        assert _get(server.url + "view/c1/niivue.umd.js")[0] == 200
        # the report's pictures and tables (evaluate's page links metrics.csv, summary.json)
        assert _get(server.url + "c0.json")[1] == (out / "c0.json").read_bytes()
        assert _get(server.url + "c0.nii.gz")[0] == 404  # not the volumes
        if CHROMIUM is not None:  # the link opens the case in NiiVue
            dom, console = browser(server.url + "view/c1/", "--dump-dom")
            assert 'data-ready="1"' in dom, console
    finally:
        server.shutdown()
    with pytest.raises(io.InputError, match=r"no index\.html"):
        viewer.serve_folder(cohort)


def test_a_folder_segmented_in_shards_is_served_with_a_page_linking_each_shards_index(
        tmp_path, tiny_weights):
    from tiramisu_brats import api

    cohort = tmp_path / "cohort"
    for seed in range(2):
        write_case(make_case(seed, shape=(48, 48, 24), case_id=f"c{seed}"), cohort)
    out = tmp_path / "out"
    seg = api.Segmenter(tiny_weights, "torch", crop=(64, 64))
    for i in range(2):
        api.segment_cohort(cohort, out, segmenter=seg, shard=(i, 2))
    server = viewer.serve_folder(out)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = _get(server.url)[1].decode()
        names = ["index-shard-0-of-2.html", "index-shard-1-of-2.html"]
        assert all(f'href="{n}"' in page for n in names)
        assert 'href="view/c1/"' in _get(server.url + names[1])[1].decode()
        assert _get(server.url + "view/c1/")[0] == 200
    finally:
        server.shutdown()
    # pages of another split beside them: in numeric order, and said to be from two splits
    for i in (2, 10):
        (out / f"index-shard-{i}-of-12.html").write_text("<p>old</p>")
    page = viewer.serve_folder(out).routes["/"].decode()
    order = [m for m in re.findall(r'href="(index-shard-[^"]+)"', page)]
    assert order == ["index-shard-0-of-2.html", "index-shard-1-of-2.html",
                     "index-shard-2-of-12.html", "index-shard-10-of-12.html"]
    assert "splits into 2, 12 jobs" in page
