"""The interactive view of a case and its label map: NiiVue in the browser, from a small local
server bound to 127.0.0.1 that serves the page, NiiVue's built file (vendored in this folder,
never fetched) and the case's NIfTI files, and for a folder (``serve_folder``) its report's
pages, pictures and tables; nothing else.

>>> server = serve(io.find_case_files("BraTS2021_00006/"), "out.nii.gz")
>>> server.url      # 'http://127.0.0.1:PORT/'
>>> server.serve_forever()
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.parse
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import numpy as np

from tiramisu_brats import io

log = logging.getLogger(__name__)

_NAMES = dict(zip(io.MODALITIES, ("T1", "T1ce", "T2", "FLAIR"), strict=True))


def _asset(name: str) -> bytes:
    return (resources.files("tiramisu_brats.viewer") / name).read_bytes()


def page(title: str, images: dict[str, str], labels: str, first: str = "FLAIR") -> str:
    """The viewer's HTML: ``images`` (name → URL) to switch between, ``labels`` the label
    map's URL, drawn over them in the BraTS colours."""
    import html

    config = json.dumps({"images": images, "labels": labels, "first": first})
    text = _asset("viewer.html").decode()
    return text.replace("__TITLE__", html.escape(title)).replace("__CONFIG__", config)


class ViewServer(ThreadingHTTPServer):
    """A local HTTP server of fixed ``routes`` (URL path → page bytes or a file); ``url`` is
    its address. NiiVue's file is served beside every page."""

    daemon_threads = True

    def __init__(self, routes: dict[str, bytes | Path], port: int = 0) -> None:
        self.routes = routes
        try:
            super().__init__(("127.0.0.1", port), _Handler)
        except OSError as err:  # the port taken (or not ours to take): say which
            raise OSError(f"127.0.0.1 port {port}: {err.strerror or err}") from err

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


# The files of an output or report folder that ``serve_folder`` serves, by content type.
_FOLDER_FILES = {".png": "image/png", ".html": "text/html; charset=utf-8",
                 ".csv": "text/csv; charset=utf-8", ".json": "application/json"}


class _Handler(BaseHTTPRequestHandler):
    server: ViewServer

    def do_GET(self) -> None:
        # Browsers percent-encode a case id's spaces and non-ASCII letters; the routes hold it
        # as written. Only route keys are served, so a decoded "../" matches nothing.
        path = urllib.parse.unquote(self.path.split("?", 1)[0])
        route = self.server.routes.get(path)
        if path.endswith("/niivue.umd.js"):
            self._send(_asset("niivue.umd.js"), "text/javascript")
        elif isinstance(route, bytes):
            self._send(route, "text/html; charset=utf-8")
        elif isinstance(route, Path):
            self._send(route.read_bytes(), _FOLDER_FILES.get(route.suffix,
                                                             "application/octet-stream"))
        else:
            self.send_error(404)

    def _send(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s", format % args)


def _url_name(path: Path, stem: str) -> str:
    return stem + (".nii.gz" if path.name.lower().endswith(".gz") else ".nii")


def _case_routes(prefix: str, case_id: str, images: Sequence[Path], labels: Path
                 ) -> dict[str, bytes | Path]:
    """The viewer page of one case at ``prefix`` ("/" or "/view/<case>/") and its files."""
    routes: dict[str, bytes | Path] = {
        prefix + _url_name(p, m): Path(p) for m, p in zip(io.MODALITIES, images, strict=True)}
    routes[prefix + _url_name(labels, "labels")] = labels
    names = {_NAMES[m]: _url_name(p, m) for m, p in zip(io.MODALITIES, images, strict=True)}
    routes[prefix] = page(f"{case_id} ({labels.name})", names,
                          _url_name(labels, "labels")).encode()
    return routes


def serve(case: io.CaseFiles, labels: str | os.PathLike[str], port: int = 0) -> ViewServer:
    """A ``ViewServer`` for ``case``'s four images and the label map ``labels`` (on the same
    grid); ``port`` 0 picks a free one. Call ``serve_forever`` (and ``shutdown`` to stop).

    Raises ``io.InputError`` before anything is served where the images or the label map are
    not what ``io.read_case`` and ``io.read_label_map`` accept, or their shapes differ; an
    affine that differs is a warning (NiiVue places each file by its own)."""
    labels = Path(labels)
    if not labels.is_file():
        raise io.InputError(f"{labels}: no such label map")
    label_map, affine, _ = io.read_label_map(labels)
    images = io.read_case(case, keep_dtype=True)
    if label_map.shape != images.shape:
        raise io.InputError(f"{labels}: shape {label_map.shape} differs from the case's "
                            f"{images.shape} ({case.images[0]})")
    if not np.allclose(affine, images.affine, atol=io.AFFINE_ATOL):
        log.warning("%s: affine differs from the case's (%s)", labels, case.images[0])
    routes = _case_routes("/", case.case_id, case.images, labels)
    routes["/index.html"] = routes["/"]
    return ViewServer(routes, port)


def serve_folder(folder: str | os.PathLike[str], port: int = 0) -> ViewServer:
    """A ``ViewServer`` for the output folder of ``segment`` on a folder of cases: its
    ``index.html`` (or, from sharded jobs, a page linking each shard's), pictures and tables
    (PNG, CSV, JSON: evaluate's report links them) at ``/``, and each case in the viewer at
    ``/view/<case>/`` (the report's links), from the JSON ``segment`` wrote beside each label
    map."""
    folder = Path(folder)
    if not folder.is_dir():
        raise io.InputError(f"{folder}: no such folder" if not folder.exists() else
                            f"{folder}: not a folder (a case folder with a label map, or the "
                            "output folder of segment on a folder of cases)")
    index = folder / "index.html"
    shards = sorted((int(m[2]), int(m[1]), p.name) for p in folder.glob("index-shard-*-of-*.html")
                    if (m := re.fullmatch(r"index-shard-(\d+)-of-(\d+)\.html", p.name)))
    routes: dict[str, bytes | Path] = {}
    if index.is_file():
        routes["/"] = index
    elif shards:  # sharded jobs each wrote their own index: a page that links them
        import html

        links = "".join(f'<li><a href="{html.escape(n)}">{html.escape(n)}</a></li>'
                        for _, _, n in shards)
        splits = sorted({n for n, _, _ in shards})
        note = ("" if len(splits) == 1 else "<p>Pages of splits into "
                f"{', '.join(map(str, splits))} jobs: an earlier split's may be out of date.</p>")
        routes["/"] = (f"<!doctype html><meta charset=utf-8><title>{html.escape(folder.name)}"
                       f"</title><h1>{html.escape(folder.name)}</h1>{note}<ul>{links}</ul>"
                       ).encode()
    elif io.is_case_folder(folder):
        raise io.InputError(f"{folder}: a case folder; viewing a case needs a label map on "
                            "its grid")
    else:
        raise io.InputError(f"{folder}: no index.html (not the output of segment on a folder "
                            "of cases)")
    for path in sorted(folder.iterdir()):
        if path.suffix in _FOLDER_FILES and not path.name.startswith("."):
            routes["/" + path.name] = path
        if path.suffix != ".json":
            continue
        try:
            summary = json.loads(path.read_text())
            images = [Path(p) for p in summary["inputs"]]
            labels = folder / summary["label_map"]
            case = summary["case"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a case's summary (or one from before inputs were recorded)
        if labels.is_file() and all(p.is_file() for p in images) and len(images) == 4:
            try:
                case_id = io.safe_case_id(case)
            except (io.InputError, TypeError):
                log.warning("%s: case %r is not usable in a URL path; not served", path, case)
                continue
            routes.update(_case_routes(f"/view/{case_id}/", case, images, labels))
    return ViewServer(routes, port)
