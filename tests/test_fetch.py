"""Offline tests for fedbrain.data.fetch against a loopback HTTP server and synthetic MATLAB v7.3 files."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import re
import socket
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import h5py
import numpy as np
import pytest
from PIL import Image

try:
    from fedbrain.data import fetch
except ImportError:  # package not installed yet: import from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "custom"))
    from fedbrain.data import fetch

FetchError = fetch.FetchError

MATLAB_HEADER = (
    b"MATLAB 7.3 MAT-file, Platform: GLNXA64, "
    b"Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
)


# --------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------


def _image(seed: int, shape: tuple[int, int] = (64, 48)) -> np.ndarray:
    """An asymmetric int16 slice (so transposition errors show) with negative and positive values."""
    rng = np.random.default_rng(seed)
    img = rng.integers(-200, 1500, size=shape).astype(np.int16)
    img[0, 0] = -300  # global minimum at the top-left corner
    img[-1, -1] = 2000  # global maximum at the bottom-right corner
    return img


def write_mat(path: Path, label: int, pid: str, image: np.ndarray) -> None:
    """Write ``cjdata`` the way MATLAB ``save -v7.3`` does (HDF5 with a 512-byte user block, transposed)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        g = f.create_group("cjdata")
        g.attrs["MATLAB_class"] = np.bytes_("struct")
        d = g.create_dataset("label", data=np.array([[float(label)]]))
        d.attrs["MATLAB_class"] = np.bytes_("double")
        d = g.create_dataset("PID", data=np.array([[ord(c)] for c in pid], dtype=np.uint16))
        d.attrs["MATLAB_class"] = np.bytes_("char")
        d.attrs["MATLAB_int_decode"] = np.int32(2)
        d = g.create_dataset("image", data=np.ascontiguousarray(image.T))
        d.attrs["MATLAB_class"] = np.bytes_("int16")
        d = g.create_dataset("tumorMask", data=np.ascontiguousarray((image > 1000).T.astype(np.uint8)))
        d.attrs["MATLAB_class"] = np.bytes_("logical")
        g.create_dataset("tumorBorder", data=np.array([[10.0, 12.0, 14.0, 16.0]]).T)
    with open(path, "r+b") as fh:
        fh.write(MATLAB_HEADER.ljust(128, b" "))


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


SAMPLES = {  # index -> (label, patient id, seed)
    "1": (1, "100360", 1),
    "2": (2, "MR040", 2),
    "3": (3, "112649", 3),
    "4": (2, "100360", 4),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Two zips shaped like the figshare archives (one with a corrupt .mat) plus cvind.mat."""
    src = tmp_path_factory.mktemp("src")
    blobs: dict[str, bytes] = {}
    for index, (label, pid, seed) in SAMPLES.items():
        path = src / f"{index}.mat"
        write_mat(path, label, pid, _image(seed))
        blobs[index] = path.read_bytes()
    cvind = src / "cvind.mat"
    with h5py.File(cvind, "w", userblock_size=512) as f:
        f.create_dataset("cvind", data=np.arange(1, 6, dtype=np.float64)[None, :])
    return {
        "brainTumorDataPublic_1-2.zip": _zip_bytes({"1.mat": blobs["1"], "2.mat": blobs["2"]}),
        "brainTumorDataPublic_3-5.zip": _zip_bytes(
            {"3.mat": blobs["3"], "4.mat": blobs["4"], "5.mat": b"this is not an HDF5 file" * 40}
        ),
        "cvind.mat": cvind.read_bytes(),
    }


# --------------------------------------------------------------------------------------------------
# Loopback server
# --------------------------------------------------------------------------------------------------


class ServerState:
    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drop_once: set[str] = set()  # send half the body, then close the connection
        self.ignore_range: set[str] = set()  # always answer 200 with the whole body
        self.lock = threading.Lock()

    def gets(self, path: str) -> list[str | None]:
        with self.lock:
            return [rng for p, rng in self.requests if p == path]


def _make_handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            rng = self.headers.get("Range")
            with state.lock:
                state.requests.append((path, rng))
                body = state.routes.get(path)
                drop = path in state.drop_once
                state.drop_once.discard(path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            if rng and path not in state.ignore_range:
                m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
                assert m, rng
                start = int(m.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if drop:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def server(request: pytest.FixtureRequest) -> tuple[str, ServerState]:
    state = ServerState()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    request.addfinalizer(stop)
    return f"http://127.0.0.1:{httpd.server_address[1]}", state


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "_RETRY_BACKOFF_S", 0.0)


def _publish(server: tuple[str, ServerState], dataset: dict[str, bytes]) -> list[dict]:
    base, state = server
    files = []
    for i, (name, data) in enumerate(dataset.items()):
        path = f"/files/{1000 + i}"
        state.routes[path] = data
        files.append({"name": name, "url": base + path, "size": len(data), "md5": md5(data)})
    return files


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["path", "label", "patient_id", "source_index"]
        return list(reader)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_known_file_list() -> None:
    names = [f["name"] for f in fetch.FIGSHARE_FILES]
    assert names[:4] == [
        "brainTumorDataPublic_1-766.zip",
        "brainTumorDataPublic_767-1532.zip",
        "brainTumorDataPublic_1533-2298.zip",
        "brainTumorDataPublic_2299-3064.zip",
    ]
    assert "cvind.mat" in names
    for f in fetch.FIGSHARE_FILES:
        assert set(f) >= {"name", "url", "size", "md5"}
        assert f["url"].startswith("https://ndownloader.figshare.com/files/")
    rebased = fetch.figshare_files("http://127.0.0.1:9/mirror/")
    assert rebased[0]["url"] == "http://127.0.0.1:9/mirror/files/3381290"
    assert fetch.FIGSHARE_FILES[0]["url"] == "https://ndownloader.figshare.com/files/3381290"


def test_fetch_end_to_end_with_interruption_and_rerun(
    tmp_path: Path,
    server: tuple[str, ServerState],
    dataset: dict[str, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = _publish(server, dataset)
    _, state = server
    first_zip = urlsplit(files[0]["url"]).path
    state.drop_once.add(first_zip)  # the first transfer dies half-way; the retry must resume it

    with caplog.at_level(logging.WARNING, logger=fetch.__name__):
        manifest = fetch.fetch_figshare(tmp_path, files=files, progress=False)

    assert manifest == tmp_path / "manifest.csv"
    ranges = state.gets(first_zip)
    assert ranges[0] is None and len(ranges) == 2
    assert ranges[1] == f"bytes={len(dataset['brainTumorDataPublic_1-2.zip']) // 2}-"
    for name, data in dataset.items():
        assert md5((tmp_path / "raw" / name).read_bytes()) == md5(data)
        assert not (tmp_path / "raw" / f"{name}.part").exists()

    rows = _read_manifest(manifest)
    by_index = {r["source_index"]: r for r in rows}
    assert sorted(by_index) == ["1", "2", "3", "4"]  # 5.mat is corrupt, cvind.mat is not a slice
    for index, (label, pid, seed) in SAMPLES.items():
        row = by_index[index]
        class_name = fetch.CLASS_NAMES[label]
        assert row["label"] == class_name
        assert row["patient_id"] == pid
        assert row["path"] == f"images/{class_name}/{index}.png"
        with Image.open(tmp_path / row["path"]) as im:
            assert im.mode == "L" and im.format == "PNG"
            pixels = np.asarray(im)
        original = _image(seed)
        assert pixels.shape == original.shape  # orientation undone (MATLAB stores column-major)
        assert pixels[0, 0] == 0 and pixels[-1, -1] == 255
        expected = np.rint((original.astype(float) - original.min()) * 255 / np.ptp(original))
        assert np.array_equal(pixels, expected.astype(np.uint8))

    assert any("5.mat" in rec.getMessage() for rec in caplog.records)
    source = (tmp_path / "SOURCE.md").read_text()
    assert "CC BY 4.0" in source and "10.6084/m9.figshare.1512427" in source
    assert "journal.pone.0140381" in source and "journal.pone.0157112" in source
    assert "- images: 4" in source and "- glioma: 2" in source and "- patients: 3" in source
    assert "- skipped (unreadable or invalid .mat): 1" in source

    # Second run: everything verified locally, nothing requested from the server.
    n_requests = len(state.requests)
    manifest_text = manifest.read_text()
    assert fetch.fetch_figshare(tmp_path, files=files, progress=False) == manifest
    assert len(state.requests) == n_requests
    assert manifest.read_text() == manifest_text


def test_download_resumes_after_interrupted_transfer(
    tmp_path: Path, server: tuple[str, ServerState], dataset: dict[str, bytes]
) -> None:
    files = _publish(server, dataset)
    _, state = server
    entry = files[1]
    path = urlsplit(entry["url"]).path
    dest = tmp_path / entry["name"]
    part = tmp_path / (entry["name"] + ".part")

    state.drop_once.add(path)
    with pytest.raises(FetchError, match="after 1 attempt"):
        fetch.download_file(
            entry["url"], dest, md5=entry["md5"], size=entry["size"], retries=0, progress=False
        )
    assert not dest.exists()
    half = entry["size"] // 2
    assert part.stat().st_size == half

    out = fetch.download_file(entry["url"], dest, md5=entry["md5"], size=entry["size"], progress=True)
    assert out == dest and not part.exists()
    assert md5(dest.read_bytes()) == entry["md5"]
    assert state.gets(path) == [None, f"bytes={half}-"]

    # Already present with the right md5: no further request.
    fetch.download_file(entry["url"], dest, md5=entry["md5"], size=entry["size"], progress=False)
    assert len(state.gets(path)) == 2


def test_download_restarts_when_server_ignores_range(
    tmp_path: Path, server: tuple[str, ServerState], dataset: dict[str, bytes]
) -> None:
    files = _publish(server, dataset)
    _, state = server
    entry = files[0]
    path = urlsplit(entry["url"]).path
    state.ignore_range.add(path)
    dest = tmp_path / entry["name"]
    (tmp_path / (entry["name"] + ".part")).write_bytes(b"\xff" * 100)  # stale partial data

    fetch.download_file(entry["url"], dest, md5=entry["md5"], size=entry["size"], progress=False)
    assert md5(dest.read_bytes()) == entry["md5"]
    assert state.gets(path) == ["bytes=100-"]


def test_wrong_md5_raises_and_leaves_no_file(
    tmp_path: Path, server: tuple[str, ServerState], dataset: dict[str, bytes]
) -> None:
    files = _publish(server, dataset)
    entry = files[0]
    dest = tmp_path / entry["name"]
    with pytest.raises(FetchError, match="md5 checksum mismatch"):
        fetch.download_file(entry["url"], dest, md5="0" * 32, size=entry["size"], progress=False)
    assert not dest.exists()
    assert not (tmp_path / (entry["name"] + ".part")).exists()

    with pytest.raises(FetchError, match="md5 checksum mismatch"):
        fetch.fetch_figshare(tmp_path / "out", files=[{**entry, "md5": "1" * 32}], progress=False)
    assert list((tmp_path / "out" / "raw").iterdir()) == []


def test_http_404_is_not_retried(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    base, state = server
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch.download_file(base + "/files/missing", tmp_path / "x.zip", retries=3, progress=False)
    assert len(state.gets("/files/missing")) == 1


def test_unsafe_zip_member_is_rejected(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    base, state = server
    evil = _zip_bytes({"1.mat": b"x", "../evil.mat": b"owned"})
    state.routes["/files/evil"] = evil
    files = [{"name": "evil.zip", "url": base + "/files/evil", "size": len(evil), "md5": md5(evil)}]
    with pytest.raises(FetchError, match="unsafe member"):
        fetch.fetch_figshare(tmp_path / "out", files=files, progress=False)
    assert not (tmp_path / "out" / "raw" / "evil.mat").exists()
    assert not (tmp_path / "out" / "raw" / "mat").exists()


def test_convert_skips_unreadable_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = tmp_path / "7.mat"
    write_mat(good, 3, "PX1", _image(7, (16, 16)))
    missing_field = tmp_path / "8.mat"
    with h5py.File(missing_field, "w") as f:
        f.create_group("cjdata").create_dataset("label", data=np.array([[1.0]]))
    garbage = tmp_path / "9.mat"
    garbage.write_bytes(b"\x00" * 300)
    out = tmp_path / "converted"
    with caplog.at_level(logging.WARNING, logger=fetch.__name__):
        manifest = fetch.convert_mat_files([garbage, good, missing_field], out)
    rows = _read_manifest(manifest)
    assert rows == [
        {"path": "images/pituitary/7.png", "label": "pituitary", "patient_id": "PX1", "source_index": "7"}
    ]
    assert "- skipped (unreadable or invalid .mat): 2" in (out / "SOURCE.md").read_text()
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 2


def test_api_listing_cli_and_deleted_archives(
    tmp_path: Path,
    server: tuple[str, ServerState],
    dataset: dict[str, bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, state = server
    files = _publish(server, dataset)
    listing = [
        {"id": i, "name": f["name"], "size": f["size"], "computed_md5": f["md5"], "download_url": f["url"]}
        for i, f in enumerate(files)
    ]
    api = {"id": 1512427, "files": listing}
    state.routes["/v2/articles/1512427"] = json.dumps(api).encode()

    parser = argparse.ArgumentParser()
    fetch.add_fetch_arguments(parser)
    out = tmp_path / "data"
    argv = ["figshare", "--out", str(out), "--api-url", base + "/v2/articles/1512427", "--no-progress"]
    args = parser.parse_args([*argv, "--delete-archives"])
    assert fetch.run_fetch(args) == 0
    printed = capsys.readouterr().out
    assert f"manifest: {out / 'manifest.csv'}" in printed
    assert "images: 4 (meningioma 1, glioma 2, pituitary 1)" in printed and "skipped: 1" in printed
    assert not (out / "raw" / "brainTumorDataPublic_1-2.zip").exists()
    assert len(_read_manifest(out / "manifest.csv")) == 4

    # Rerun with archives deleted: only the API listing is fetched again, no archive.
    n_requests = len(state.requests)
    assert fetch.run_fetch(parser.parse_args([*argv, "--delete-archives"])) == 0
    assert [p for p, _ in state.requests[n_requests:]] == ["/v2/articles/1512427"]
    assert "downloaded: 0 file(s)" in capsys.readouterr().out
    assert len(_read_manifest(out / "manifest.csv")) == 4


def test_cli_network_failure_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    parser = argparse.ArgumentParser()
    fetch.add_fetch_arguments(parser)
    api_url = f"http://127.0.0.1:{port}/v2/articles/1"
    args = parser.parse_args(["figshare", "--out", str(tmp_path), "--api-url", api_url, "--no-progress"])
    assert fetch.run_fetch(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: cannot read the file list") and "\n" not in err
    assert "Traceback" not in captured.err and captured.out == ""
