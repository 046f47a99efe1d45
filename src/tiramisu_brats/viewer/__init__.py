"""The interactive view of a case and its label map: NiiVue in the browser, from a small local
server bound to 127.0.0.1 that serves the page, NiiVue's built file (vendored in this folder,
never fetched) and the case's NIfTI files, nothing else.

>>> server = serve(io.find_case_files("BraTS2021_00006/"), "out.nii.gz")
>>> server.url      # 'http://127.0.0.1:PORT/'
>>> server.serve_forever()
"""

from __future__ import annotations

import json
import logging
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

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
    """A local HTTP server for one case; ``url`` is the page's address."""

    daemon_threads = True

    def __init__(self, files: dict[str, Path], html: str, port: int = 0) -> None:
        self.files = files
        self.html = html.encode()
        super().__init__(("127.0.0.1", port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: ViewServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(self.server.html, "text/html; charset=utf-8")
        elif path == "/niivue.umd.js":
            self._send(_asset("niivue.umd.js"), "text/javascript")
        elif path.lstrip("/") in self.server.files:
            self._send(self.server.files[path.lstrip("/")].read_bytes(),
                       "application/octet-stream")
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


def serve(case: io.CaseFiles, labels: str | os.PathLike[str], port: int = 0) -> ViewServer:
    """A ``ViewServer`` for ``case``'s four images and the label map ``labels`` (on the same
    grid); ``port`` 0 picks a free one. Call ``serve_forever`` (and ``shutdown`` to stop)."""
    labels = Path(labels)
    if not labels.is_file():
        raise io.InputError(f"{labels}: no such label map")
    files = {_url_name(p, m): Path(p) for m, p in zip(io.MODALITIES, case.images, strict=True)}
    files[_url_name(labels, "labels")] = labels
    images = {_NAMES[m]: _url_name(p, m) for m, p in zip(io.MODALITIES, case.images,
                                                         strict=True)}
    html = page(f"{case.case_id} ({labels.name})", images, _url_name(labels, "labels"))
    return ViewServer(files, html, port)
