"""Download and convert the public figshare brain-tumour MRI dataset (Cheng et al.).

Source: Jun Cheng, "brain tumor dataset", figshare article 1512427,
DOI 10.6084/m9.figshare.1512427, licensed CC BY 4.0.  The article holds four zip archives of
MATLAB v7.3 (HDF5) ``<N>.mat`` files (struct ``cjdata`` with ``label``, ``PID``, ``image``,
``tumorBorder``, ``tumorMask``), plus ``cvind.mat`` (cross-validation folds) and a README.

``fetch_figshare`` downloads the archives (resumable, checksum-verified, standard library HTTP only),
extracts the ``.mat`` files safely and converts them to 8-bit PNGs plus ``manifest.csv``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "FIGSHARE_API_URL",
    "FIGSHARE_ARTICLE_ID",
    "FIGSHARE_DOWNLOAD_BASE",
    "FIGSHARE_FILES",
    "FetchError",
    "add_fetch_arguments",
    "convert_mat_files",
    "download_file",
    "fetch_figshare",
    "figshare_files",
    "run_fetch",
]

logger = logging.getLogger(__name__)

FIGSHARE_ARTICLE_ID = 1512427
FIGSHARE_DOI = "10.6084/m9.figshare.1512427"
FIGSHARE_API_URL = f"https://api.figshare.com/v2/articles/{FIGSHARE_ARTICLE_ID}"
FIGSHARE_DOWNLOAD_BASE = "https://ndownloader.figshare.com"

#: Known files of figshare article 1512427.  Sizes are the figshare byte counts (they add up to the
#: 838.77 MB figshare reports for the article).  figshare's ``computed_md5`` values are not recorded
#: here (``md5`` is None); the zips carry SHA-256 digests instead (as published by torch_em), and
#: ``fetch_figshare(api_url=FIGSHARE_API_URL)`` uses the MD5s the figshare API reports.
FIGSHARE_FILES: list[dict[str, Any]] = [
    {
        "name": "brainTumorDataPublic_1-766.zip",
        "url": f"{FIGSHARE_DOWNLOAD_BASE}/files/3381290",
        "size": 214401279,
        "md5": None,
        "sha256": "cdac0a7f4152cb34dd79b13543da96c37a6928ad8cb823e2662150b1a73ade54",
    },
    {
        "name": "brainTumorDataPublic_767-1532.zip",
        "url": f"{FIGSHARE_DOWNLOAD_BASE}/files/3381296",
        "size": 217848429,
        "md5": None,
        "sha256": "d18e896d14f7af791cdd3d9b9342f9f974742a06132effde5a5219209862b4ce",
    },
    {
        "name": "brainTumorDataPublic_1533-2298.zip",
        "url": f"{FIGSHARE_DOWNLOAD_BASE}/files/3381293",
        "size": 215563856,
        "md5": None,
        "sha256": "612d9f506c55c54db5f2f38b6d50741ef97a6d7c32b3e1be76e789674a97aefb",
    },
    {
        "name": "brainTumorDataPublic_2299-3064.zip",
        "url": f"{FIGSHARE_DOWNLOAD_BASE}/files/3381302",
        "size": 231679762,
        "md5": None,
        "sha256": "9a673c55d139133cfbc57097bf155b5ac9f33684ee97f40bf2afba332d416a3a",
    },
    {
        "name": "cvind.mat",
        "url": f"{FIGSHARE_DOWNLOAD_BASE}/files/7005344",
        "size": 5736,
        "md5": None,
    },
]

#: ``cjdata.label`` -> class name.
CLASS_NAMES: dict[int, str] = {1: "meningioma", 2: "glioma", 3: "pituitary"}

MANIFEST_HEADER = ("path", "label", "patient_id", "source_index")

_USER_AGENT = "fedbrain-fetch/0.1 (+https://doi.org/10.6084/m9.figshare.1512427)"
_CHUNK = 1 << 18
_RETRY_BACKOFF_S = 1.0  # first retry delay; doubles per attempt (tests set it to 0)
_NON_DATA_MATS = {"cvind.mat"}


class FetchError(RuntimeError):
    """A download, checksum, archive or listing problem; the message is one line, suitable for a CLI."""


class _RetryableError(Exception):
    """Transient transfer failure; the download loop retries (resuming) after it."""


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------


def _progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> Any:
    """Return a tqdm bar, or a no-op stand-in when disabled or tqdm is missing."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(
                total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024
            )
        except ImportError:  # pragma: no cover - tqdm is a declared dependency
            pass

    class _NoBar:
        def update(self, n: int) -> None:
            pass

        def reset(self, total: int | None = None) -> None:
            pass

        def close(self) -> None:
            pass

    return _NoBar()


def _check_url(url: str) -> None:
    if not url.lower().startswith(("http://", "https://")):
        raise FetchError(f"refusing non-HTTP(S) URL: {url!r}")


def _hash_file(path: Path, md5: bool, sha256: bool) -> tuple[str | None, str | None]:
    h_md5 = hashlib.md5(usedforsecurity=False) if md5 else None
    h_sha = hashlib.sha256() if sha256 else None
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            if h_md5 is not None:
                h_md5.update(block)
            if h_sha is not None:
                h_sha.update(block)
    return (h_md5.hexdigest() if h_md5 else None, h_sha.hexdigest() if h_sha else None)


def _verify(path: Path, md5: str | None, size: int | None, sha256: str | None = None) -> str | None:
    """Return None when ``path`` matches the expected size/checksums, else a description of the problem."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"size mismatch (expected {size} bytes, got {actual_size})"
    if not md5 and not sha256:
        return None
    got_md5, got_sha = _hash_file(path, md5=bool(md5), sha256=bool(sha256))
    if md5 and got_md5 != md5.lower():
        return f"md5 checksum mismatch (expected {md5.lower()}, got {got_md5})"
    if sha256 and got_sha != sha256.lower():
        return f"sha256 checksum mismatch (expected {sha256.lower()}, got {got_sha})"
    return None


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` (or ``bytes */TOTAL``) into (start, total)."""
    if not value:
        return None, None
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _transfer_once(url: str, part: Path, size: int | None, timeout: float, progress: bool) -> bool:
    """One HTTP attempt that appends to (or restarts) ``part``.  Returns True when ``part`` is complete.

    Raises ``_RetryableError`` on transient failures and ``FetchError`` on permanent ones.
    """
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        logger.warning("%s is larger than expected; restarting the download", part.name)
        part.unlink()
        have = 0
    if size is not None and size > 0 and have == size:
        return True

    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:
            _, total = _parse_content_range(exc.headers.get("Content-Range") if exc.headers else None)
            if total is not None and total == have:
                return True  # the partial file is in fact complete
            part.unlink(missing_ok=True)
            raise _RetryableError(f"HTTP 416 for a resumed download of {url}; restarting") from exc
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise _RetryableError(f"HTTP {exc.code} {exc.reason} for {url}") from exc
        raise FetchError(f"HTTP {exc.code} {exc.reason} for {url}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise _RetryableError(f"cannot reach {url}: {reason}") from exc

    with resp:
        status = resp.status
        if have and status == 206:
            start, _ = _parse_content_range(resp.headers.get("Content-Range"))
            if start is not None and start != have:
                part.unlink(missing_ok=True)
                raise _RetryableError(f"server resumed {url} at byte {start}, not {have}; restarting")
            mode = "ab"
        elif status in (200, 206):
            if have:
                logger.info("server ignored the Range request for %s; restarting from zero", part.name)
            have = 0
            mode = "wb"
        else:
            raise FetchError(f"unexpected HTTP status {status} for {url}")

        length_header = resp.headers.get("Content-Length")
        expected = int(length_header) if length_header and length_header.isdigit() else None
        total = have + expected if expected is not None else size
        received = 0
        bar = _progress_bar(total, have, part.name[: -len(".part")], progress)
        try:
            with open(part, mode) as fh:
                while True:
                    try:
                        chunk = resp.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise _RetryableError(f"transfer of {url} interrupted: {exc!r}") from exc
                    if not chunk:
                        break
                    fh.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()
    if expected is not None and received < expected:
        raise _RetryableError(f"connection closed after {received} of {expected} bytes for {url}")
    return True


def _transfer(url: str, part: Path, size: int | None, timeout: float, retries: int, progress: bool) -> None:
    """Download ``url`` into ``part``, resuming after transient failures up to ``retries`` times."""
    attempt = 0
    while True:
        try:
            if _transfer_once(url, part, size, timeout, progress):
                return
        except _RetryableError as exc:
            attempt += 1
            if attempt > retries:
                raise FetchError(f"download failed after {attempt} attempt(s): {exc}") from exc
            delay = min(_RETRY_BACKOFF_S * 2 ** (attempt - 1), 30.0)
            logger.warning("%s; retrying in %.1f s (attempt %d of %d)", exc, delay, attempt + 1, retries + 1)
            time.sleep(delay)


def download_file(
    url: str,
    dest: Path,
    md5: str | None = None,
    size: int | None = None,
    timeout: float = 60,
    retries: int = 3,
    progress: bool = True,
    sha256: str | None = None,
) -> Path:
    """Download ``url`` to ``dest`` resumably and verify it; return ``dest``.

    Data is streamed to ``dest.part`` (``dest`` name + ``.part``); an existing partial file is resumed
    with an HTTP ``Range`` request (a server answering 200 instead of 206 makes it start over).
    Transient errors are retried ``retries`` times, each retry resuming.  When complete, the size and
    md5 (and optional sha256) are checked and the file is renamed atomically to ``dest``.  A ``dest``
    that already passes the checks is returned without any network access.  On a checksum or size
    mismatch the ``.part`` file is deleted and ``FetchError`` is raised.
    """
    _check_url(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        problem = _verify(dest, md5, size, sha256)
        if problem is None:
            logger.info("%s already present and verified; not downloading", dest.name)
            return dest
        logger.warning("existing %s fails verification (%s); downloading again", dest.name, problem)

    part = dest.with_suffix(dest.suffix + ".part")
    resumed = part.exists() and part.stat().st_size > 0
    _transfer(url, part, size, timeout, retries, progress)
    problem = _verify(part, md5, size, sha256)
    if problem is not None and resumed:
        # A stale partial file (e.g. from another version of the file) poisons a resumed download:
        # start once more from zero before giving up.
        logger.warning("%s: %s after resuming; downloading from scratch", dest.name, problem)
        part.unlink(missing_ok=True)
        _transfer(url, part, size, timeout, retries, progress)
        problem = _verify(part, md5, size, sha256)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise FetchError(f"{dest.name}: {problem} for {url}; the partial download was deleted")
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------------------
# File list
# --------------------------------------------------------------------------------------------------


def figshare_files(base_url: str | None = None) -> list[dict[str, Any]]:
    """Return a copy of ``FIGSHARE_FILES``, with the download host replaced by ``base_url`` if given."""
    files = [dict(f) for f in FIGSHARE_FILES]
    if base_url:
        base = base_url.rstrip("/")
        for f in files:
            f["url"] = base + f["url"][len(FIGSHARE_DOWNLOAD_BASE) :]
    return files


def _normalise_entry(entry: dict[str, Any]) -> dict[str, Any]:
    name = entry.get("name")
    url = entry.get("url") or entry.get("download_url")
    if not name or not url:
        raise FetchError(f"file entry without name or download URL: {entry!r}")
    size = entry.get("size")
    md5 = entry.get("md5", entry.get("computed_md5")) or None
    out = {"name": str(name), "url": str(url), "size": int(size) if size is not None else None, "md5": md5}
    if entry.get("sha256"):
        out["sha256"] = entry["sha256"]
    return out


def _fetch_file_list(api_url: str, timeout: float = 60, retries: int = 3) -> list[dict[str, Any]]:
    """Read the file list of a figshare article from the figshare v2 API (or a compatible URL)."""
    _check_url(api_url)
    headers = {"User-Agent": _USER_AGENT, "Accept": "application/json"}
    request = urllib.request.Request(api_url, headers=headers)
    attempt = 0
    while True:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                payload = json.loads(resp.read().decode("utf-8"))
            break
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code < 500 and exc.code not in (408, 429):
                raise FetchError(f"HTTP {exc.code} {exc.reason} for {api_url}") from exc
            error: Exception = exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            error = exc
        except ValueError as exc:
            raise FetchError(f"invalid JSON from {api_url}: {exc}") from exc
        attempt += 1
        if attempt > retries:
            reason = getattr(error, "reason", error)
            raise FetchError(f"cannot read the file list from {api_url}: {reason}") from error
        time.sleep(min(_RETRY_BACKOFF_S * 2 ** (attempt - 1), 30.0))

    entries = payload.get("files") if isinstance(payload, dict) else payload
    if not isinstance(entries, list) or not entries:
        raise FetchError(f"no files listed by {api_url}")
    return [_normalise_entry(e) for e in entries if isinstance(e, dict) and not e.get("is_link_only")]


# --------------------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------------------


def _safe_name(name: str) -> str:
    """A listed file name must be a plain file name (no directories, no ``..``)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise FetchError(f"refusing unsafe file name {name!r} in the file list")
    return name


def _member_parts(name: str) -> tuple[str, ...]:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise FetchError(f"unsafe member path {name!r}")
    return tuple(p for p in pure.parts if p not in ("", "."))


def _extract_mats(zip_path: Path, dest_dir: Path) -> list[Path]:
    """Extract the ``.mat`` members of ``zip_path`` under ``dest_dir``; unsafe member paths are rejected.

    Every member is validated before anything is written.  Members already extracted with the right
    size are left alone, so re-running is cheap.
    """
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            planned: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
            for info in infos:
                try:
                    parts = _member_parts(info.filename)
                except FetchError as exc:
                    raise FetchError(f"{zip_path.name}: {exc}; refusing to extract") from None
                if info.is_dir() or not parts or not parts[-1].lower().endswith(".mat"):
                    continue
                if parts[0] == "__MACOSX" or parts[-1].startswith("._"):
                    continue
                planned.append((info, parts))

            root = dest_dir.resolve()
            extracted: list[Path] = []
            for info, parts in planned:
                target = dest_dir.joinpath(*parts)
                if not target.resolve().is_relative_to(root):
                    raise FetchError(f"{zip_path.name}: member {info.filename!r} escapes the target folder")
                if target.exists() and target.stat().st_size == info.file_size:
                    extracted.append(target)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, target)
                extracted.append(target)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise FetchError(f"{zip_path.name} is not a valid zip archive ({exc}); delete it and rerun") from exc
    return extracted


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


@dataclass
class _ConversionResult:
    manifest: Path
    class_counts: Counter = field(default_factory=Counter)
    n_patients: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return sum(self.class_counts.values())


def _decode_matlab_string(ds: Any) -> str:
    """Decode a MATLAB v7.3 char array (uint16 code units) or a plain HDF5 string."""
    if ds.attrs.get("MATLAB_empty"):
        return ""
    data = np.asarray(ds[()])
    if data.dtype.kind in ("S", "O", "U"):
        value = data.ravel()[0] if data.size else b""
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    else:
        codes = data.ravel(order="F").astype(np.uint32)
        text = "".join(chr(int(c)) for c in codes if c)
    return text.strip()


def _read_cjdata(path: Path) -> tuple[int, str, np.ndarray]:
    """Read (label, patient id, image) from a MATLAB v7.3 ``cjdata`` file; the image is row-major."""
    import h5py

    with h5py.File(path, "r") as f:
        cj = f["cjdata"]
        label = int(np.asarray(cj["label"][()]).ravel()[0])
        pid = _decode_matlab_string(cj["PID"])
        # MATLAB stores arrays column-major; h5py therefore returns the transpose.
        image = np.asarray(cj["image"][()]).T
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"image has shape {image.shape}, expected a 2-D slice")
    return label, pid, image


def _window_to_uint8(image: np.ndarray) -> np.ndarray:
    """Min-max window a slice to 0..255 (a constant slice becomes all zeros)."""
    img = image.astype(np.float64)
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.zeros(img.shape, dtype=np.uint8)
    return np.clip(np.rint((img - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _index_key(path: Path) -> tuple[int, int | str]:
    stem = path.stem
    return (0, int(stem)) if stem.isdigit() else (1, stem)


def _write_source_md(out_dir: Path, result: _ConversionResult, files: list[dict[str, Any]] | None) -> Path:
    lines = [
        "# Source of this data",
        "",
        'Jun Cheng, "brain tumor dataset", figshare, article 1512427, '
        f"DOI [{FIGSHARE_DOI}](https://doi.org/{FIGSHARE_DOI}).",
        "",
        "**License:** Creative Commons Attribution 4.0 International (CC BY 4.0), "
        "https://creativecommons.org/licenses/by/4.0/. Attribution is required; please cite:",
        "",
        "- Cheng J, Huang W, Cao S, Yang R, Yang W, Yun Z, et al. Enhanced Performance of Brain Tumor "
        "Classification via Tumor Region Augmentation and Partition. PLoS ONE 10(10): e0140381 (2015). "
        "https://doi.org/10.1371/journal.pone.0140381",
        "- Cheng J, Yang W, Huang M, Huang W, Jiang J, Zhou Y, et al. Retrieval of Brain Tumors by Adaptive "
        "Spatial Pooling and Fisher Vector Representation. PLoS ONE 11(6): e0157112 (2016). "
        "https://doi.org/10.1371/journal.pone.0157112",
        "",
        "## Conversion",
        "",
        "Converted by `fedbrain.data.fetch` on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} (modified from the original: "
        "format changed).",
        "Each MATLAB v7.3 `cjdata.image` (int16 T1-weighted contrast-enhanced slice) was written as an 8-bit "
        "greyscale PNG with a per-image min-max window (minimum -> 0, maximum -> 255), in its original "
        "orientation and resolution. `cjdata.label` 1/2/3 -> meningioma/glioma/pituitary; "
        "`cjdata.PID` -> `patient_id`. Tumour masks and borders are not exported.",
        "",
        "## Counts",
        "",
        f"- images: {result.n_images}",
    ]
    lines += [f"- {name}: {result.class_counts.get(name, 0)}" for name in CLASS_NAMES.values()]
    lines += [
        f"- patients: {result.n_patients}",
        f"- skipped (unreadable or invalid .mat): {len(result.skipped)}",
    ]
    if result.skipped:
        lines += ["", "Skipped files:", ""] + [f"- `{name}`" for name in result.skipped]
    if files:
        lines += ["", "## Downloaded files", ""]
        for f in files:
            check = ""
            if f.get("md5"):
                check = f", md5 {f['md5']}"
            elif f.get("sha256"):
                check = f", sha256 {f['sha256']}"
            lines.append(f"- `{f['name']}` from {f['url']} ({f.get('size')} bytes{check})")
    path = out_dir / "SOURCE.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _convert(
    mat_paths: Iterable[Path], out_dir: Path, files: list[dict[str, Any]] | None = None
) -> _ConversionResult:
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str, str]] = []
    result = _ConversionResult(manifest=out_dir / "manifest.csv")
    patients: set[str] = set()
    seen: dict[str, Path] = {}
    for mat in sorted((Path(p) for p in mat_paths), key=_index_key):
        try:
            label, pid, image = _read_cjdata(mat)
            if label not in CLASS_NAMES:
                raise ValueError(f"unknown label {label}")
        except Exception as exc:  # h5py raises OSError, KeyError, ValueError, ... on bad files
            logger.warning("skipping unreadable %s: %s", mat, exc)
            result.skipped.append(mat.name)
            continue
        index = mat.stem
        if index in seen:
            logger.warning("duplicate slice index %s (%s and %s); keeping the last", index, seen[index], mat)
            rows = [r for r in rows if r[3] != index]
        seen[index] = mat
        class_name = CLASS_NAMES[label]
        png = out_dir / "images" / class_name / f"{index}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        tmp = png.with_name(png.name + ".tmp")
        Image.fromarray(_window_to_uint8(image)).save(tmp, format="PNG")
        os.replace(tmp, png)
        rows.append((png.relative_to(out_dir).as_posix(), class_name, pid, index))
        patients.add(pid)

    result.class_counts = Counter(r[1] for r in rows)
    result.n_patients = len(patients)
    tmp_manifest = result.manifest.with_name(result.manifest.name + ".tmp")
    with open(tmp_manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_HEADER)
        writer.writerows(rows)
    os.replace(tmp_manifest, result.manifest)
    _write_source_md(out_dir, result, files)
    return result


def convert_mat_files(mat_paths: Iterable[Path], out_dir: Path) -> Path:
    """Convert figshare ``cjdata`` .mat files to PNGs plus ``manifest.csv``; return the manifest path.

    Each slice is written as an 8-bit greyscale PNG to ``out_dir/images/<class>/<N>.png`` using a
    per-image min-max window: the int16 minimum maps to 0 and the maximum to 255 (no clipping of
    outliers, no resampling).  ``manifest.csv`` has the columns ``path,label,patient_id,source_index``
    (path relative to ``out_dir``, class name, decoded ``PID``, the ``N`` of ``N.mat``).  Unreadable or
    invalid files are skipped with a logged warning and counted in ``out_dir/SOURCE.md``, which also
    records provenance, licence (CC BY 4.0) and counts.
    """
    return _convert(mat_paths, out_dir).manifest


# --------------------------------------------------------------------------------------------------
# Whole fetch
# --------------------------------------------------------------------------------------------------


def _marker_matches(marker: Path, entry: dict[str, Any]) -> bool:
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(data.get(k) == entry.get(k) for k in ("name", "size", "md5", "sha256"))


@dataclass
class _FetchResult:
    conversion: _ConversionResult
    downloaded: list[str]


def _fetch(
    out_dir: Path,
    files: list[dict[str, Any]] | None = None,
    api_url: str | None = None,
    keep_archives: bool = True,
    progress: bool = True,
    base_url: str | None = None,
) -> _FetchResult:
    out_dir = Path(out_dir)
    if files is not None:
        entries = [_normalise_entry(f) for f in files]
    elif api_url:
        entries = _fetch_file_list(api_url)
    else:
        entries = figshare_files(base_url)
    if not entries:
        raise FetchError("the file list is empty")

    raw = out_dir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    mats: list[Path] = []
    downloaded: list[str] = []
    for entry in entries:
        name = _safe_name(entry["name"])
        dest = raw / name
        is_zip = name.lower().endswith(".zip")
        marker = raw / f"{name}.extracted.json"
        extract_dir = raw / "mat" / Path(name).stem
        if is_zip and not dest.exists() and _marker_matches(marker, entry):
            logger.info("%s already extracted (archive not kept); skipping", name)
            mats.extend(sorted(extract_dir.rglob("*.mat")))
            continue
        md5, size, sha256 = entry.get("md5"), entry.get("size"), entry.get("sha256")
        if dest.exists() and _verify(dest, md5, size, sha256) is None:
            logger.info("%s already present and verified; not downloading", name)
        else:
            download_file(entry["url"], dest, md5=md5, size=size, progress=progress, sha256=sha256)
            downloaded.append(name)
        if is_zip:
            mats.extend(_extract_mats(dest, extract_dir))
            marker.write_text(json.dumps({k: entry.get(k) for k in ("name", "size", "md5", "sha256")}) + "\n")
            if not keep_archives:
                dest.unlink()
        elif name.lower().endswith(".mat") and name not in _NON_DATA_MATS:
            mats.append(dest)

    mats = [m for m in mats if m.name not in _NON_DATA_MATS]
    conversion = _convert(mats, out_dir, files=entries)
    return _FetchResult(conversion=conversion, downloaded=downloaded)


def fetch_figshare(
    out_dir: Path,
    files: list[dict] | None = None,
    api_url: str | None = None,
    keep_archives: bool = True,
    progress: bool = True,
    base_url: str | None = None,
) -> Path:
    """Download, extract and convert the figshare brain-tumour dataset into ``out_dir``; return the manifest.

    Files come from ``files`` (dicts with name, url, size, md5[, sha256]) if given, else from the figshare
    API at ``api_url`` if given, else from ``FIGSHARE_FILES`` (download host replaced by ``base_url`` if
    given).  Downloads go to ``out_dir/raw/``; ``.mat`` members of the zips are extracted (unsafe member
    paths are refused) to ``out_dir/raw/mat/<zip stem>/`` and converted with ``convert_mat_files``.
    Re-running skips verified downloads, and with ``keep_archives=False`` it also remembers which
    archives were already extracted.
    """
    return _fetch(out_dir, files, api_url, keep_archives, progress, base_url).conversion.manifest


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``fedbrain data fetch figshare --out DIR [...]`` to ``parser``."""
    parser.add_argument("source", choices=["figshare"], help="dataset to fetch (figshare: Cheng et al.)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (raw/, images/, manifest.csv)")
    parser.add_argument(
        "--api-url",
        default=None,
        help=f"read the file list (with MD5s) from this figshare API URL, e.g. {FIGSHARE_API_URL}; "
        "default: the built-in list",
    )
    parser.add_argument(
        "--base-url", default=None, help=f"download host replacing {FIGSHARE_DOWNLOAD_BASE} (a mirror)"
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    parser.add_argument(
        "--delete-archives", action="store_true", help="delete each zip once its .mat files are extracted"
    )


def run_fetch(args: argparse.Namespace) -> int:
    """Run ``fedbrain data fetch``; print the manifest path and counts.  Returns 0, or 2 on a fetch error."""
    if getattr(args, "source", "figshare") != "figshare":
        print(f"error: unknown dataset {args.source!r}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        result = _fetch(
            Path(args.out),
            api_url=getattr(args, "api_url", None),
            keep_archives=not getattr(args, "delete_archives", False),
            progress=not getattr(args, "no_progress", False),
            base_url=getattr(args, "base_url", None),
        )
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    conv = result.conversion
    counts = ", ".join(f"{name} {conv.class_counts.get(name, 0)}" for name in CLASS_NAMES.values())
    print(f"manifest: {conv.manifest}")
    print(
        f"images: {conv.n_images} ({counts}); patients: {conv.n_patients}; skipped: {len(conv.skipped)}; "
        f"downloaded: {len(result.downloaded)} file(s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m fedbrain.data.fetch figshare --out DIR``."""
    parser = argparse.ArgumentParser(prog="fedbrain data fetch", description=__doc__.splitlines()[0])
    add_fetch_arguments(parser)
    return run_fetch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
