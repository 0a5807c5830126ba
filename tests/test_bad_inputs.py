"""Bad uploads and bad site files (issue 10, section 3): each is refused with a countable reason, fast, in bounded
memory, without writing anything; folder walks count what they cannot read; good odd formats still decode."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from fedbrain.data import images
from fedbrain.data.images import ImageError, decode_grayscale, load_grayscale

READER_REASONS = {"symlink loop", "dangling link", "unreadable folder", "unreadable file", "not a regular file",
                  "folder linked twice"}
MAX_SECONDS = 5.0  # per bad input, in a fresh process on a busy 2-core machine
MAX_GROWTH = 1 << 30  # peak resident memory a bad input may add (1 GiB)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
pytestmark = pytest.mark.timeout(120)  # whole tests; the module fixture's per-input bound is MAX_SECONDS


# ---------------------------------------------------------------- building blocks


def slice_u8(n: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth synthetic slice: a bright disc with a blob and mild noise (passes every slice check)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    img = 140.0 * ((yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (n * 0.4) ** 2)
    img += 80.0 * ((yy - n * 0.4) ** 2 + (xx - n * 0.6) ** 2 < (n * 0.1) ** 2)
    return np.clip(img + rng.normal(0, 6, (n, n)), 0, 255).astype(np.uint8)


def encode(img: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(w: int, h: int, bits: int = 8) -> bytes:
    """A tiny PNG that declares ``w x h`` pixels (a decompression bomb's header) and holds no pixels."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, 0, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))


def tiff_header_only(w: int, h: int) -> bytes:
    """A little-endian greyscale TIFF that declares ``w x h`` pixels and holds 16 bytes."""
    tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
            (278, 4, h), (279, 4, 16)]
    data_at = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", tag, kind, 1, data_at if tag == 273 else value) for tag, kind, value in tags)
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\0" * 16


def jpeg_with_size(w: int, h: int) -> bytes:
    """A real small JPEG whose frame header is patched to claim ``w x h``."""
    data = bytearray(encode(slice_u8(64), "JPEG"))
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def bmp_with_size(w: int, h: int) -> bytes:
    data = bytearray(encode(slice_u8(64), "BMP"))
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


def gif_with_size(w: int, h: int) -> bytes:
    data = bytearray(encode(slice_u8(64), "GIF"))
    data[6:10] = struct.pack("<HH", w, h)
    return bytes(data)


def png_bad_crc() -> bytes:
    """A PNG whose compressed pixel data has bytes flipped (its chunk checksum no longer matches)."""
    data = bytearray(encode(slice_u8(), "PNG"))
    at = data.index(b"IDAT") + 40
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    return bytes(data)


def jpeg_header_only() -> bytes:
    data = encode(slice_u8(), "JPEG")
    return data[:data.index(b"\xff\xda")]  # everything before the start of scan


def frames(fmt: str, n: int = 3, **kw) -> bytes:
    imgs = [Image.fromarray(slice_u8(seed=i)) for i in range(n)]
    return encode(imgs[0], fmt, save_all=True, append_images=imgs[1:], **kw)


def zip_of_png() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("slice.png", encode(slice_u8(), "PNG"))
    return buf.getvalue()


def psd_header() -> bytes:
    return b"8BPS" + struct.pack(">H6xHIIHH", 1, 1, 64, 64, 8, 1) + b"\0" * 64


def float_tiff(fill: float | None = None, nan_fraction: float = 0.0) -> bytes:
    arr = slice_u8().astype(np.float32)
    if fill is not None:
        arr[:] = fill
    if nan_fraction:
        arr.ravel()[:: int(1 / nan_fraction)] = np.nan
    return encode(Image.fromarray(arr, "F"), "TIFF")


def colour_noise(n: int = 96, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, n, 3), dtype=np.uint8)


def grey_noise(n: int = 96, seed: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, n), dtype=np.uint8)


def rainbow(n: int = 96) -> np.ndarray:
    """A smooth, strongly saturated colour picture (a photo or a colour map, not an MRI slice)."""
    hue = (np.mgrid[:n, :n][1] * 255 // n).astype(np.uint8)
    hsv = np.stack([hue, np.full_like(hue, 255), np.full_like(hue, 220)], -1)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def dicom(pixels: np.ndarray | None = None, *, frames: int = 1, rgb: bool = False, rows: int | None = None,
          cols: int | None = None, pixel_bytes: bytes | None = None, photometric: str | None = None,
          window: bool = True, syntax: str | None = None, float_pixels: np.ndarray | None = None,
          bits: int = 16) -> bytes:
    """An MR image DICOM file (explicit VR little endian unless ``syntax``), with pixels set as given."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    if pixels is not None or pixel_bytes is not None or float_pixels is not None:
        shape = (pixels if pixels is not None else float_pixels if float_pixels is not None
                 else np.zeros((64, 64))).shape
        ds.Rows = rows or shape[-3 if rgb else -2]
        ds.Columns = cols or shape[-2 if rgb else -1]
        if frames > 1:
            ds.NumberOfFrames = frames
        if rgb:
            ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            dtype = "u1"
        elif float_pixels is not None:
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated = 32
        else:
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric or "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (16, 12, 11, 0) if bits == 16 \
                else (8, 8, 7, 0)
            dtype = "<u2" if bits == 16 else "u1"
            if window:
                ds.WindowCenter, ds.WindowWidth = 1200, 2000
        if float_pixels is not None:
            ds.FloatPixelData = float_pixels.astype("<f4").tobytes()
        elif pixel_bytes is not None:
            ds.PixelData = pixel_bytes
        else:
            ds.PixelData = pixels.astype(dtype).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def mr_pixels(n: int = 64) -> np.ndarray:
    return np.clip(slice_u8(n).astype(np.uint16) * 12, 0, 4095)


def dicom_bad_syntax() -> bytes:
    data = dicom(mr_pixels())
    explicit = b"1.2.840.10008.1.2.1\0"
    assert explicit in data
    return data.replace(explicit, b"9.9.999.99999.9.9.9\0", 1)


def dicom_garbage_jpeg() -> bytes:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    return dicom(pixel_bytes=encapsulate([b"\xff\xd8 this is no JPEG stream" * 4]), syntax=JPEGBaseline8Bit)


def dicom_rle_bomb(side: int = 8192) -> bytes:
    """An 8-bit RLE Lossless DICOM of ``side x side`` zeros: ~1 MB on disk, 67 MP once decoded."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    segment = b"\x81\x00" * (side * side // 128)  # runs of 128 zeros
    frame = struct.pack("<16I", 1, 64, *[0] * 14) + segment
    data = dicom(pixel_bytes=encapsulate([frame]), rows=side, cols=side, syntax=RLELossless, bits=8)
    assert len(data) < 1_100_000
    return data


# ---------------------------------------------------------------- the bad inputs

# name -> (file name, maker of the bytes, expected reason)
BAD_BYTES: dict[str, tuple[str, Callable[[], bytes], str]] = {
    "empty": ("empty.png", lambda: b"", "empty file"),
    "one byte": ("one.jpg", lambda: b"\xff", "not an image"),
    "NUL bytes": ("zeros.png", lambda: b"\0" * 4096, "not an image"),
    "text renamed .png": ("notes.png", lambda: b"this is not an image\n" * 10, "not an image"),
    "HTML": ("page.jpg", lambda: b"<!DOCTYPE html><html><body><img src=x.png></body></html>", "not an image"),
    "JSON": ("data.png", lambda: b'{"image": "slice.png", "label": "glioma"}', "not an image"),
    "ZIP of a PNG": ("slice.png", zip_of_png, "not an image"),
    "gzip of a PNG": ("slice.png", lambda: __import__("gzip").compress(encode(slice_u8(), "PNG")), "not an image"),
    "PDF": ("report.jpg", lambda: b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" * 20, "not an image"),
    "SVG": ("vector.png", lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" '
                                  b'height="64"><circle cx="32" cy="32" r="20"/></svg>', "not an image"),
    "ELF executable": ("a.jpg", lambda: b"\x7fELF\x02\x01\x01" + b"\0" * 200, "not an image"),
    "GIF signature only": ("x.gif", lambda: b"GIF89a not really", "not an image"),
    "PNG signature only": ("x.png", lambda: b"\x89PNG\r\n\x1a\n", "not an image"),
    "EPS (PostScript)": ("scan.png", lambda: encode(slice_u8(), "EPS"), "unsupported image format"),
    "PSD": ("scan.png", psd_header, "unsupported image format"),
    "ICO": ("favicon.png", lambda: encode(slice_u8(64), "ICO"), "unsupported image format"),
    "PPM": ("scan.png", lambda: encode(slice_u8(), "PPM"), "unsupported image format"),
    "PCX": ("scan.png", lambda: encode(slice_u8(), "PCX"), "unsupported image format"),
    "XBM": ("scan.png", lambda: encode(Image.fromarray(slice_u8()).convert("1"), "XBM"), "unsupported image format"),
    "SGI": ("scan.png", lambda: encode(slice_u8(), "SGI"), "unsupported image format"),
    "truncated JPEG": ("cut.jpg", lambda: encode(slice_u8(), "JPEG")[:600], "truncated or corrupt image"),
    "JPEG header only": ("head.jpg", jpeg_header_only, "truncated or corrupt image"),
    "truncated PNG": ("cut.png", lambda: (lambda d: d[: len(d) // 2])(encode(slice_u8(), "PNG")),
                      "truncated or corrupt image"),
    "PNG with bad CRC": ("crc.png", png_bad_crc, "truncated or corrupt image"),
    "PNG header, no pixels": ("nopix.png", lambda: png_header_only(64, 64), "truncated or corrupt image"),
    "truncated TIFF": ("cut.tif", lambda: encode(slice_u8(), "TIFF")[:400], "truncated or corrupt image"),
    "truncated BMP": ("cut.bmp", lambda: encode(slice_u8(), "BMP")[:2000], "truncated or corrupt image"),
    "truncated WebP": ("cut.webp", lambda: (lambda d: d[: len(d) // 2])(encode(slice_u8(), "WEBP")),
                       "truncated or corrupt image"),
    "PNG bomb 100000x100000": ("bomb.png", lambda: png_header_only(100_000, 100_000), "image too large"),
    "PNG 9000x9000 header": ("huge.png", lambda: png_header_only(9_000, 9_000, bits=1), "image too large"),
    "JPEG bomb 65000x65000": ("bomb.jpg", lambda: jpeg_with_size(65_000, 65_000), "image too large"),
    "JPEG 9000x9000 header": ("huge.jpg", lambda: jpeg_with_size(9_000, 9_000), "image too large"),
    "TIFF bomb header": ("bomb.tif", lambda: tiff_header_only(100_000, 100_000), "image too large"),
    "BMP bomb header": ("bomb.bmp", lambda: bmp_with_size(50_000, 50_000), "image too large"),
    "GIF bomb header": ("bomb.gif", lambda: gif_with_size(65_535, 65_535), "image too large"),
    "bytes over the size cap": ("big.png", lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * images.MAX_FILE_BYTES,
                                "file too large"),
    "GIF multi-frame": ("cine.gif", lambda: frames("GIF"), "multi-frame image"),
    "APNG multi-frame": ("cine.png", lambda: frames("PNG"), "multi-frame image"),
    "TIFF multi-page": ("stack.tif", lambda: frames("TIFF"), "multi-frame image"),
    "WebP animated": ("cine.webp", lambda: frames("WEBP", lossless=True), "multi-frame image"),
    "CIELab TIFF, constant": ("lab.tif", lambda: encode(Image.new("LAB", (64, 64), (60, 20, 200)), "TIFF"),
                              "blank image"),
    "16-bit constant PNG": ("flat16.png", lambda: encode(np.full((64, 64), 1234, np.uint16), "PNG"), "blank image"),
    "32-bit int constant TIFF": ("flat32.tif", lambda: encode(Image.new("I", (64, 64), 70000), "TIFF"),
                                 "blank image"),
    "black PNG": ("black.png", lambda: encode(np.zeros((64, 64), np.uint8), "PNG"), "blank image"),
    "all-white JPEG": ("white.jpg", lambda: encode(np.full((64, 64), 255, np.uint8), "JPEG"), "blank image"),
    "solid red RGB": ("red.png", lambda: encode(Image.new("RGB", (64, 64), (220, 0, 0)), "PNG"), "blank image"),
    "one bright pixel": ("dot.png", lambda: encode(np.pad(np.full((1, 1), 255, np.uint8), ((40, 40), (40, 40))),
                                                   "PNG"), "blank image"),
    "constant palette PNG": ("pal.png", lambda: encode(Image.new("P", (64, 64), 3), "PNG"), "blank image"),
    "1x1": ("dot.png", lambda: encode(np.full((1, 1), 128, np.uint8), "PNG"), "image too small"),
    "16x16 slice": ("tiny.png", lambda: encode(slice_u8(16), "PNG"), "image too small"),
    "8x4000 strip": ("strip.png", lambda: encode(np.tile(slice_u8(8), (500, 1)), "PNG"), "image too small"),
    "4000x8 strip": ("strip.png", lambda: encode(np.tile(slice_u8(8), (1, 500)), "PNG"), "image too small"),
    "40x400 strip": ("strip.png", lambda: encode(np.tile(slice_u8(40), (10, 1)), "PNG"), "extreme aspect ratio"),
    "400x40 strip": ("strip.jpg", lambda: encode(np.tile(slice_u8(40), (1, 10)), "JPEG"), "extreme aspect ratio"),
    "colour noise PNG": ("noise.png", lambda: encode(colour_noise(), "PNG"), "colour image"),
    "colour noise JPEG": ("noise.jpg", lambda: encode(colour_noise(), "JPEG", quality=90), "colour image"),
    "rainbow picture": ("photo.jpg", lambda: encode(rainbow(), "JPEG", quality=95), "colour image"),
    "grey noise PNG": ("noise.png", lambda: encode(grey_noise(), "PNG"), "random noise"),
    "grey noise JPEG": ("noise.jpg", lambda: encode(grey_noise(256), "JPEG"), "random noise"),
    "16-bit noise PNG": ("noise16.png", lambda: encode(grey_noise().astype(np.uint16) * 250, "PNG"), "random noise"),
    "NaN float TIFF": ("nan.tif", lambda: float_tiff(fill=float("nan")), "invalid pixel values"),
    "partly NaN float TIFF": ("nan.tif", lambda: float_tiff(nan_fraction=0.01), "invalid pixel values"),
    "infinite float TIFF": ("inf.tif", lambda: float_tiff(fill=float("inf")), "invalid pixel values"),
    "DICOM 65535x65535 x 1000 frames, 16 bytes": (
        "bomb.dcm", lambda: dicom(pixel_bytes=b"\0" * 16, rows=65535, cols=65535, frames=1000), "image too large"),
    "DICOM RLE bomb (1 MB, 8192x8192)": ("bomb.dcm", dicom_rle_bomb, "image too large"),
    "DICOM 9000x9000 header": ("huge.dcm", lambda: dicom(pixel_bytes=b"\0" * 16, rows=9000, cols=9000),
                               "image too large"),
    "DICOM without pixel data": ("report.dcm", lambda: dicom(None), "DICOM without pixel data"),
    "DICOM truncated pixel data": ("cut.dcm", lambda: dicom(pixel_bytes=mr_pixels().astype("<u2").tobytes()[:4000]),
                                   "unreadable DICOM pixel data"),
    "DICOM file cut in its header": ("cut.dcm", lambda: dicom(mr_pixels())[:200], "DICOM without pixel data"),
    "DICOM preamble only": ("empty.dcm", lambda: b"\0" * 128 + b"DICM", "DICOM without pixel data"),
    "DICOM garbage transfer syntax": ("odd.dcm", dicom_bad_syntax, "unreadable DICOM pixel data"),
    "DICOM garbage JPEG fragments": ("jpeg.dcm", dicom_garbage_jpeg, "unreadable DICOM pixel data"),
    "DICOM multi-frame": ("cine.dcm", lambda: dicom(np.stack([mr_pixels()] * 4), frames=4), "multi-frame image"),
    "DICOM RGB multi-frame": ("cine.dcm", lambda: dicom(np.stack([np.dstack([slice_u8(64)] * 3)] * 4), frames=4,
                                                        rgb=True), "multi-frame image"),
    "DICOM RGB colour noise": ("noise.dcm", lambda: dicom(colour_noise(64), rgb=True), "colour image"),
    "DICOM constant": ("flat.dcm", lambda: dicom(np.full((64, 64), 900)), "blank image"),
    "DICOM 8x2000": ("strip.dcm", lambda: dicom(np.tile(mr_pixels(8), (250, 1))), "image too small"),
    "DICOM float NaN": ("nan.dcm", lambda: dicom(float_pixels=np.full((64, 64), np.nan, np.float32)),
                        "invalid pixel values"),
    "text named .dcm": ("notes.dcm", lambda: b"this is not a DICOM file\n" * 20, "DICOM without pixel data"),
}


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "pipe.png")
    return d / "pipe.png"


def _socket(d: Path) -> Path:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(d / "s.png"))
    s.close()  # the socket file stays
    return d / "s.png"


def _dangling(d: Path) -> Path:
    (d / "gone.png").symlink_to(d / "missing-target.png")
    return d / "gone.png"


def _loop(d: Path) -> Path:
    (d / "loop.png").symlink_to(d / "loop.png")
    return d / "loop.png"


def _folder(d: Path) -> Path:
    (d / "folder.png").mkdir()
    return d / "folder.png"


def _sparse(d: Path) -> Path:
    with open(d / "huge.png", "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.truncate(images.MAX_FILE_BYTES + 1)  # sparse: no disk used
    return d / "huge.png"


def _unreadable(d: Path) -> Path:
    (d / "secret.png").write_bytes(encode(slice_u8(), "PNG"))
    (d / "secret.png").chmod(0)
    return d / "secret.png"


def _device(name: str) -> Callable[[Path], Path]:
    return lambda d: Path(name)


# name -> (maker of the path in an empty folder, expected reason)
BAD_PATHS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "/dev/zero": (_device("/dev/zero"), "not a regular file"),
    "/dev/urandom": (_device("/dev/urandom"), "not a regular file"),
    "/dev/null": (_device("/dev/null"), "not a regular file"),
    "FIFO": (_fifo, "not a regular file"),
    "socket": (_socket, "not a regular file"),
    "folder": (_folder, "not a regular file"),
    "dangling symlink": (_dangling, "dangling link"),
    "symlink loop": (_loop, "symlink loop"),
    "missing file": (lambda d: d / "missing.png", "unreadable file"),
    "file over the size cap (sparse)": (_sparse, "file too large"),
    "unreadable file (chmod 000)": (_unreadable, "unreadable file"),
}


# ---------------------------------------------------------------- one process that measures every case

_CHILD = r"""
import json, os, resource, sys, time
import numpy, PIL.Image, pydicom  # imported before the baseline is taken
from fedbrain.data import images

spec = json.load(open(sys.argv[1]))
page = os.sysconf("SC_PAGE_SIZE")

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * page

def vm():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * page

def run(case):
    if case["kind"] == "alloc":  # calibration: proves the measurement sees an allocation
        a = numpy.ones(case["bytes"], numpy.uint8)
        return {"type": "none", "sum": int(a[::4096].sum())}
    try:
        if case["kind"] == "bytes":
            with open(case["file"], "rb") as fh:
                data = fh.read()
            images.decode_grayscale(data, case["name"])
        else:
            images.load_grayscale(case["file"])
        return {"type": "none"}
    except images.ImageError as exc:
        return {"type": "ImageError", "reason": exc.reason, "message": str(exc)[:300]}
    except BaseException as exc:
        return {"type": type(exc).__name__, "message": str(exc)[:300]}

results = {}
for case in spec["cases"]:
    r, w = os.pipe()
    base = rss()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        limit = vm() + spec["as_slack"]  # a safety net only: a regression must not take the machine down
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        out = run(case)
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    deadline = t0 + spec["timeout"]
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            done, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.005)
    elapsed = time.monotonic() - t0
    raw = b""
    while chunk := os.read(r, 65536):
        raw += chunk
    os.close(r)
    out = json.loads(raw) if raw else {"type": "killed or crashed", "status": status}
    out.update(elapsed=elapsed, growth=usage.ru_maxrss * 1024 - base)
    results[case["id"]] = out
print(json.dumps(results))
"""


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                out[p] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """Every bad input decoded once in its own forked process: reason, seconds, peak memory growth; and the
    files under the case folder, the cache, TMPDIR and the working folder before and after."""
    root = tmp_path_factory.mktemp("bad_inputs")
    cases_dir, cache, tmp, cwd = root / "cases", root / "cache", root / "tmp", root / "cwd"
    for d in (cases_dir, cache, tmp, cwd):
        d.mkdir()
    cases, paths = [], {}
    for i, (key, (name, make, _)) in enumerate(BAD_BYTES.items()):
        f = cases_dir / f"b{i:03d}-{name}"
        f.write_bytes(make())
        paths[key] = f
        cases.append({"id": f"bytes:{key}", "kind": "bytes", "file": str(f), "name": name})
        cases.append({"id": f"file:{key}", "kind": "path", "file": str(f)})
    for i, (key, (make, _)) in enumerate(BAD_PATHS.items()):
        d = cases_dir / f"p{i:03d}"
        d.mkdir()
        p = make(d)
        paths[key] = p
        cases.append({"id": f"path:{key}", "kind": "path", "file": str(p)})
    cases.append({"id": "calibration", "kind": "alloc", "bytes": 300 << 20})
    spec = root / "spec.json"
    spec.write_text(json.dumps({"cases": cases, "timeout": 20, "as_slack": 3 << 30}))
    watched = (cases_dir, cache, tmp, cwd)
    before = _snapshot(*watched)
    env = {**os.environ, "FEDBRAIN_CACHE": str(cache), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(spec)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"results": json.loads(proc.stdout.strip().splitlines()[-1]), "before": before,
            "after": _snapshot(*watched), "paths": paths}


def _check(result: dict, expected: str) -> None:
    assert result["type"] == "ImageError", result
    assert result["reason"] in images.REASONS and result["reason"] == expected, result
    assert result["elapsed"] < MAX_SECONDS, result
    assert result["growth"] < MAX_GROWTH, result


def test_measurement_sees_an_allocation(measured):
    assert measured["results"]["calibration"]["growth"] > 250 << 20  # the 300 MiB the calibration case touched


def test_nothing_is_written_while_decoding(measured):
    assert measured["after"] == measured["before"]


@pytest.mark.parametrize("key", list(BAD_BYTES))
def test_bad_bytes_are_refused_with_a_reason(key, measured):
    name, _, expected = BAD_BYTES[key]
    _check(measured["results"][f"bytes:{key}"], expected)
    _check(measured["results"][f"file:{key}"], expected)
    data = measured["paths"][key].read_bytes()
    with pytest.raises(ImageError) as exc:
        decode_grayscale(data, name)
    assert exc.value.reason == expected
    from fedbrain.predict import Predictor

    predictor = object.__new__(Predictor)  # image_array needs no model
    with pytest.raises(ImageError) as exc:
        predictor.image_array(data)
    assert exc.value.reason in images.REASONS


@pytest.mark.parametrize("key", list(BAD_PATHS))
def test_bad_paths_are_refused_before_reading(key, measured, monkeypatch):
    _, expected = BAD_PATHS[key]
    path = measured["paths"][key]
    if key.startswith("unreadable file") and IS_ROOT:
        # root reads a chmod 000 file: make opening it fail the way it fails for a user (in this process only)
        real_open = os.open

        def refusing_open(p, *args, **kw):
            if os.fspath(p) == str(path):
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(p, *args, **kw)

        monkeypatch.setattr(os, "open", refusing_open)
    else:
        _check(measured["results"][f"path:{key}"], expected)
    with pytest.raises(ImageError) as exc:
        load_grayscale(path)
    assert exc.value.reason == expected


def test_there_are_at_least_fifty_kinds():
    assert len(BAD_BYTES) + len(BAD_PATHS) >= 50


# ---------------------------------------------------------------- a hospital folder with all of it


def test_hospital_folder_counts_every_bad_file(tmp_path, monkeypatch):
    from fedbrain.data.cache import index_images
    from fedbrain.data.readers import read_folders

    root = tmp_path / "hospital"
    good = []
    for label, seeds in (("yes", range(0, 4)), ("no", range(10, 14))):
        for s in seeds:
            p = root / label / f"good{s}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(encode(slice_u8(seed=s), "JPEG"))
            good.append(str(p))
    expected_bad = {}
    for i, (key, (name, make, reason)) in enumerate(BAD_BYTES.items()):
        if key == "bytes over the size cap":
            continue  # covered by the sparse file below (no 64 MB write)
        p = root / ("yes" if i % 2 else "no") / f"bad{i:03d}{Path(name).suffix}"
        p.write_bytes(make())
        expected_bad[str(p)] = reason
    _sparse(root / "no")
    expected_bad[str(root / "no" / "huge.png")] = "file too large"
    yes, no = root / "yes", root / "no"
    os.mkfifo(yes / "pipe.png")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(no / "sock.png"))
    s.close()
    (yes / "zero.png").symlink_to("/dev/zero")
    (yes / "gone.png").symlink_to(yes / "missing.png")
    (no / "self.png").symlink_to(no / "self.png")
    (no / "back").symlink_to(root)  # a folder loop: back -> the hospital root
    (yes / "here").symlink_to(yes)  # a folder loop: here -> its own folder
    (no / "series").mkdir()
    (no / "series" / "s1.jpg").write_bytes(encode(slice_u8(seed=30), "JPEG"))
    good.append(str(no / "series" / "s1.jpg"))
    (yes / "also-series").symlink_to(no / "series")  # the same folder again, through a link (read once)
    locked = no / "locked"
    locked.mkdir()
    (locked / "x.jpg").write_bytes(encode(slice_u8(seed=40), "JPEG"))
    locked.chmod(0)
    if IS_ROOT:  # root reads any folder: make listing it fail the way it fails for a user
        real_scandir = os.scandir

        def scandir(path="."):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        res = read_folders(root)
    finally:
        locked.chmod(0o755)
    problems = res.problems
    assert problems["not a regular file"] == 3  # FIFO, socket, link to /dev/zero
    assert problems["dangling link"] == 1
    assert problems["symlink loop"] == 3  # self.png, back, here
    assert problems["unreadable folder"] == 1
    assert problems["folder linked twice"] == 1
    listed = {r.path for r in res.records}
    assert listed == set(good) | set(expected_bad)
    index = index_images(sorted(listed), cache_dir=tmp_path / "cache")
    got = {p: (bool(ok), reason) for p, ok, reason in zip(index.paths, index.ok, index.reasons, strict=True)}
    assert {p: got[p] for p in good} == {p: (True, None) for p in good}
    assert {p: got[p] for p in expected_bad} == {p: (False, r) for p, r in expected_bad.items()}
    assert Counter(r for _, r in got.values() if r) == Counter(expected_bad.values())


def test_folder_reader_never_hangs_on_deep_link_chains(tmp_path):
    from fedbrain.data.readers import read_folders

    d = tmp_path / "site" / "glioma"
    d.mkdir(parents=True)
    (d / "a.png").write_bytes(encode(slice_u8(), "PNG"))
    for i in range(30):  # links to links to ... the class folder itself
        (d / f"l{i}").symlink_to(d if i == 0 else d / f"l{i - 1}")
    res = read_folders(tmp_path / "site")
    assert [Path(r.path).name for r in res.records] == ["a.png"]
    assert res.problems["symlink loop"] == 30


# ---------------------------------------------------------------- unusual but good inputs


def _asymmetric() -> np.ndarray:
    """96x64 (HxW) slice that is bright at its top-left only, so rotations show."""
    arr = slice_u8(96)[:, 16:80].copy()
    arr[:24, :16] = 250
    return arr


def exif_jpeg(orientation: int) -> bytes:
    """The upright ``_asymmetric`` slice stored rotated, with the EXIF tag that says how to turn it back."""
    up = Image.fromarray(_asymmetric())
    stored = {6: up.transpose(Image.Transpose.ROTATE_90), 8: up.transpose(Image.Transpose.ROTATE_270),
              3: up.transpose(Image.Transpose.ROTATE_180)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(orientation):
    arr, _ = decode_grayscale(exif_jpeg(orientation), "phone.jpg")
    assert arr.shape == (96, 64)
    assert arr[:24, :16].mean() > 200 and arr[-24:, -16:].mean() < 200


def _lab_slice() -> bytes:
    grey = Image.fromarray(slice_u8())
    return encode(Image.merge("LAB", (grey, Image.new("L", grey.size, 128), Image.new("L", grey.size, 128))), "TIFF")


GOOD: dict[str, tuple[str, Callable[[], bytes], str | None]] = {
    "CMYK JPEG": ("cmyk.jpg", lambda: encode(Image.fromarray(slice_u8()).convert("CMYK"), "JPEG"), "CMYK->L"),
    "palette PNG": ("pal.png", lambda: encode(Image.fromarray(slice_u8()).convert("P"), "PNG"), "P->L"),
    "16-bit PNG": ("deep.png", lambda: encode(slice_u8().astype(np.uint16) * 200, "PNG"), "I;16->L"),
    "RGBA PNG": ("rgba.png", lambda: encode(np.dstack([slice_u8()] * 3 + [np.full((96, 96), 200, np.uint8)]),
                                            "PNG"), "RGBA->L (alpha on black)"),
    "LA PNG": ("la.png", lambda: encode(Image.fromarray(slice_u8()).convert("LA"), "PNG"), "LA->L (alpha on black)"),
    "bilevel PNG": ("mask.png", lambda: encode(Image.fromarray(slice_u8()).convert("1"), "PNG"), "1->L"),
    "greyscale stored as RGB JPEG": ("rgb.jpg", lambda: encode(np.dstack([slice_u8()] * 3), "JPEG"), None),
    "CIELab TIFF": ("lab.tif", _lab_slice, "LAB->L"),
    "YCbCr TIFF": ("ycc.tif", lambda: encode(Image.fromarray(slice_u8()).convert("YCbCr"), "TIFF"), "YCbCr->L"),
    "CMYK TIFF": ("cmyk.tif", lambda: encode(Image.fromarray(slice_u8()).convert("CMYK"), "TIFF"), "CMYK->L"),
    "float TIFF": ("f.tif", float_tiff, "F->L"),
    "32-bit int TIFF": ("i.tif", lambda: encode(Image.fromarray(slice_u8().astype(np.int32) * 1000), "TIFF"), "I->L"),
    "BMP": ("s.bmp", lambda: encode(slice_u8(), "BMP"), None),
    "single-frame GIF": ("s.gif", lambda: encode(slice_u8(), "GIF"), "P->L"),
    "WebP": ("s.webp", lambda: encode(np.dstack([slice_u8()] * 3), "WEBP", lossless=True), None),
    "MPO (JPEG with a second picture)": ("photo.jpg", lambda: frames("MPO", 2), None),
    "DICOM MONOCHROME2": ("mr.dcm", lambda: dicom(mr_pixels()), "DICOM->L"),
    "DICOM RGB greyscale": ("rgb.dcm", lambda: dicom(np.dstack([slice_u8(64)] * 3), rgb=True), "DICOM->L"),
    "DICOM without window": ("nowin.dcm", lambda: dicom(mr_pixels(), window=False), "DICOM->L"),
    "DICOM float": ("f.dcm", lambda: dicom(float_pixels=slice_u8(64).astype(np.float32) / 7), "DICOM->L"),
}


@pytest.mark.parametrize("key", list(GOOD))
def test_unusual_good_inputs_decode(key):
    name, make, note = GOOD[key]
    arr, got = decode_grayscale(make(), name)
    assert arr.dtype == np.uint8 and arr.ndim == 2 and min(arr.shape) >= 64, arr.shape
    assert got == note
    assert arr.std() > 20  # the picture survived the conversion


def test_monochrome1_dicom_is_inverted():
    normal, _ = decode_grayscale(dicom(mr_pixels(), window=False), "a.dcm")
    inverted, _ = decode_grayscale(dicom(mr_pixels(), window=False, photometric="MONOCHROME1"), "b.dcm")
    np.testing.assert_array_equal(inverted, 255 - normal)


def test_the_tests_synthetic_images_still_decode():
    """conftest's 48 px noise+blob images (the compression tests) pass the noise check."""
    from conftest import _draw

    rng = np.random.default_rng(0)
    for c in range(4):
        for _ in range(25):
            arr, _ = decode_grayscale(encode(_draw(c, rng), "PNG"), "x.png")
            assert arr.shape == (48, 48)


@pytest.mark.skipif(not features.check("jpg_2000"), reason="Pillow built without OpenJPEG")
def test_jpeg2000_is_refused_as_unsupported():
    with pytest.raises(ImageError) as exc:
        decode_grayscale(encode(slice_u8(), "JPEG2000"), "scan.jp2")
    assert exc.value.reason == "unsupported image format"
