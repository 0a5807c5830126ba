"""Decoding one MRI slice safely into 8-bit greyscale, shared by indexing, training and prediction.

Every unusable input raises :class:`ImageError` with a short, countable ``reason`` (see :data:`REASONS`); no other
exception escapes :func:`decode_grayscale` or :func:`load_grayscale`.

Formats: DICOM (pydicom) and, through Pillow, only :data:`PIL_FORMATS`: JPEG (and its multi-picture MPO variant,
read as its primary picture), PNG, BMP, TIFF, and single-frame GIF and WebP (what hospital and web exports hold).
Pillow's other ~40 readers (EPS runs Ghostscript, PSD, ICO, PPM, JPEG 2000, ...) are never tried: such files are
refused as "unsupported image format".

Safety, all checked before any pixel is decoded:

- files are read only when they are regular files (not FIFOs, devices, sockets or folders) of at most
  :data:`MAX_FILE_BYTES`, and never more than that many bytes are read;
- the decoded size is capped by the header: at most :data:`MAX_PIXELS` pixels (width x height x frames) and
  :data:`MAX_DECODED_BYTES` of decoded samples, for DICOM (Rows, Columns, NumberOfFrames, SamplesPerPixel,
  BitsAllocated) as for Pillow (``Image.open`` is lazy);
- one slice only: multi-frame files are refused.

After decoding, EXIF orientation is applied and :func:`check_slice` refuses what is plainly not an MRI slice
(too small, extreme aspect ratio, blank, strongly coloured, or near-i.i.d. random noise); its thresholds are the
``SLICE_*`` constants below, chosen with a wide margin on the figshare, Sartaj, Navoneel and Br35H sets.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_FILE_BYTES = 64 * 1024 * 1024  # larger files are refused before they are read
MAX_PIXELS = 64_000_000  # width x height x frames: larger images are refused (decompression bombs)
MAX_DECODED_BYTES = 256 * 1024 * 1024  # decoded samples before conversion (e.g. 64 MP of 32-bit floats)
PIL_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP")  # Pillow readers ever tried (allow-list)
THUMB = 32

# ``check_slice`` thresholds (real sets: sides 150..1920 px, aspect <= 1.8, std >= 20, mean chroma <= 12.3,
# neighbour correlation >= 0.48; the tests' synthetic 48 px noise+blob images have correlation >= 0.24).
SLICE_MIN_SIDE = 32  # px: smaller images are refused ("image too small")
SLICE_MAX_ASPECT = 4.0  # long side / short side
SLICE_MIN_STD = 5.0  # grey levels: below this the image is (almost) constant ("blank image")
SLICE_MAX_CHROMA = 30.0  # mean of max(R,G,B)-min(R,G,B); a greyscale MRI stored as RGB has R=G=B (0)
SLICE_MIN_NEIGHBOUR_CORR = 0.1  # mean correlation of horizontally/vertically adjacent pixels (i.i.d. noise ~0)
_CHECK_PIXELS = 65_536  # the colour and noise statistics use at most this many (block-averaged) pixels

REASONS = (
    "empty file", "file too large", "not a regular file", "unreadable file", "symlink loop", "dangling link",
    "not an image", "unsupported image format", "truncated or corrupt image", "image too large",
    "multi-frame image", "unsupported image mode", "invalid pixel values", "DICOM support needs pydicom",
    "unreadable DICOM", "DICOM without pixel data", "unreadable DICOM pixel data", "image too small",
    "extreme aspect ratio", "blank image", "colour image", "random noise", "undecodable image",
)


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short, countable phrase (one of :data:`REASONS`)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


# ---------------------------------------------------------------- "is it a slice" checks


def _check_geometry(width: int, height: int) -> None:
    if min(width, height) < SLICE_MIN_SIDE:
        raise ImageError("image too small", f"{width}x{height}; an MRI slice is at least {SLICE_MIN_SIDE} px a side")
    if max(width, height) / min(width, height) > SLICE_MAX_ASPECT:
        raise ImageError("extreme aspect ratio", f"{width}x{height}")


def _block_mean(arr: np.ndarray, limit: int = _CHECK_PIXELS) -> np.ndarray:
    """Average ``k x k`` blocks (k chosen so at most ``limit`` pixels remain), as float32 (HxW or HxWxC)."""
    h, w = arr.shape[:2]
    k = max(1, math.ceil(math.sqrt(h * w / limit)))
    if k == 1:
        return arr.astype(np.float32)
    h, w = h // k * k, w // k * k
    a = arr[:h, :w].astype(np.float32)
    return a.reshape(h // k, k, w // k, k, *arr.shape[2:]).mean(axis=(1, 3))


def _neighbour_corr(a: np.ndarray) -> float:
    def corr(x: np.ndarray, y: np.ndarray) -> float:
        x, y = x - x.mean(), y - y.mean()
        d = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
        return float((x * y).sum()) / d if d > 0 else 1.0

    return (corr(a[:, :-1], a[:, 1:]) + corr(a[:-1], a[1:])) / 2


def check_slice(arr: np.ndarray, rgb: np.ndarray | None = None) -> None:
    """Refuse (:class:`ImageError`) a decoded HxW uint8 image that is plainly not an MRI slice.

    ``rgb`` is the colour picture it came from (HxWx3 uint8, any size), when there was one.
    """
    h, w = arr.shape
    _check_geometry(w, h)
    if int(arr.max()) == int(arr.min()):
        raise ImageError("blank image", "constant pixel values")
    small = _block_mean(arr)
    std = float(small.std())
    if std < SLICE_MIN_STD:
        raise ImageError("blank image", f"almost constant pixel values (std {std:.2f})")
    if rgb is not None:
        r, g, b = (_block_mean(rgb[..., i]) for i in range(3))  # per band: numpy reduces a length-3 axis slowly
        chroma = float((np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)).mean())
        if chroma > SLICE_MAX_CHROMA:
            raise ImageError("colour image", f"mean chroma {chroma:.0f}; an MRI slice is greyscale")
    if min(small.shape) >= 2:
        rho = _neighbour_corr(small)
        if rho < SLICE_MIN_NEIGHBOUR_CORR:
            raise ImageError("random noise", f"neighbouring pixels are uncorrelated ({rho:.2f}); not an MRI slice")


# ---------------------------------------------------------------- conversion to 8-bit


def _window(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map ``[lo, hi]`` (default: the 0.5th..99.5th percentile) linearly to uint8; ``arr`` is float32, changed."""
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise ImageError("invalid pixel values", f"{bad} NaN or infinite pixels")
    if lo is None or hi is None:
        flat = arr.ravel()
        sample = flat[:: max(1, flat.size // 4_000_000)]  # exact up to 4 MP, a regular sample beyond
        lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if not hi > lo:
        raise ImageError("blank image", "constant pixel values")
    arr -= np.float32(lo)
    arr *= np.float32(1 / (hi - lo))
    np.clip(arr, 0, 1, out=arr)
    arr *= np.float32(255)
    return np.rint(arr, out=arr).astype(np.uint8)


def _small_rgb(img: Image.Image) -> np.ndarray:
    """A colour image as RGB uint8, nearest-neighbour subsampled to about ``_CHECK_PIXELS`` (for the colour check)."""
    k = max(1, math.ceil(math.sqrt(img.width * img.height / _CHECK_PIXELS)))
    if k > 1:
        img = img.resize((max(1, img.width // k), max(1, img.height // k)), Image.NEAREST)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _pil_to_uint8(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """Convert a loaded PIL image to 8-bit greyscale: ``(grey, rgb or None, conversion note or None)``."""
    mode = img.mode
    try:
        if mode in ("I", "F") or mode.startswith("I;16"):
            return _window(np.array(img, dtype=np.float32)), None, f"{mode}->L"
        if mode in ("RGBA", "LA", "PA", "RGBa") or (mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            composite = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
            rgb = None if mode == "LA" else _small_rgb(composite)
            return np.asarray(composite.convert("L"), dtype=np.uint8), rgb, f"{mode}->L (alpha on black)"
        if mode == "La":  # premultiplied: the L band already is the composite on black
            return np.asarray(img.getchannel(0), dtype=np.uint8), None, "La->L (alpha on black)"
        note = None if mode in ("L", "RGB") else f"{mode}->L"
        if mode in ("L", "1"):
            return np.asarray(img.convert("L"), dtype=np.uint8), None, note
        rgb_img = img if mode in ("RGB", "P", "CMYK", "YCbCr", "RGBX") else img.convert("RGB")  # LAB, HSV, ...
        return np.asarray(rgb_img.convert("L"), dtype=np.uint8), _small_rgb(rgb_img), note
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError("image too large", "out of memory while converting to greyscale") from exc
    except Exception as exc:  # a mode Pillow cannot convert (e.g. LAB in older Pillow)
        raise ImageError("unsupported image mode", f"{mode}: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------- DICOM


def _dicom_to_uint8(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - pydicom is a core dependency
        raise ImageError("DICOM support needs pydicom") from exc
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise ImageError("unreadable DICOM", f"{type(exc).__name__}: {exc}") from exc
    try:
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise ImageError("DICOM without pixel data")
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 16)
        photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError("unreadable DICOM", f"bad image header: {type(exc).__name__}: {exc}") from exc
    if rows <= 0 or cols <= 0 or frames <= 0 or samples not in (1, 3, 4) or bits not in (1, 8, 16, 32, 64):
        raise ImageError("unreadable DICOM pixel data",
                         f"Rows {rows}, Columns {cols}, NumberOfFrames {frames}, SamplesPerPixel {samples}, "
                         f"BitsAllocated {bits}")
    if rows * cols * frames > MAX_PIXELS or rows * cols * frames * samples * max(1, bits // 8) > MAX_DECODED_BYTES:
        raise ImageError("image too large", f"{cols}x{rows} pixels x {frames} frames x {samples} samples")
    if frames > 1:
        raise ImageError("multi-frame image", f"{frames} frames; export one slice")
    _check_geometry(cols, rows)
    try:
        pixels = ds.pixel_array
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            pixels = apply_color_lut(pixels, ds)
        arr = pixels.astype(np.float32)
        del pixels
        if arr.ndim == 3:  # colour: the mean of the channels (R, G, B after pydicom's YBR conversion)
            arr = arr[..., :3]
        if arr.shape[:2] != (rows, cols) or arr.ndim not in (2, 3):
            raise ImageError("unreadable DICOM pixel data", f"decoded shape {arr.shape} for {cols}x{rows}")
        slope = float(ds.get("RescaleSlope") or 1)
        intercept = float(ds.get("RescaleIntercept") or 0)
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is not None and width is not None:
            center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
            width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        else:
            center = width = None
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError("image too large", "out of memory while decoding the DICOM pixel data") from exc
    except Exception as exc:
        raise ImageError("unreadable DICOM pixel data", f"{type(exc).__name__}: {exc}") from exc
    rgb = None
    if arr.ndim == 3:  # the colour check sees the samples scaled to 8 bits
        top = float(arr.max())
        scale = 255 / (255 if top <= 255 else 65535 if top <= 65535 else top)
        rgb = np.clip(_block_mean(arr) * scale, 0, 255).astype(np.uint8)
        arr = arr.mean(axis=-1, dtype=np.float32)
    if slope != 1 or intercept != 0:
        arr *= np.float32(slope)
        arr += np.float32(intercept)
    lo = hi = None
    if center is not None and width is not None and width > 0:
        lo, hi = center - width / 2, center + width / 2
    out = _window(arr, lo, hi)
    if photometric == "MONOCHROME1":  # 0 is white
        out = 255 - out
    return out, rgb


# ---------------------------------------------------------------- Pillow


def _unsupported_format(head: bytes) -> str | None:
    """The name of a Pillow format outside :data:`PIL_FORMATS` whose signature ``head`` has, if any."""
    Image.init()
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt in PIL_FORMATS or accept is None:
            continue
        try:
            if accept(head):
                return fmt
        except Exception:  # a plugin's signature test on odd bytes
            continue
    return None


def _mode_bytes(mode: str) -> int:
    if mode in ("I", "F"):
        return 4
    if mode.startswith("I;16"):
        return 2
    try:
        return Image.getmodebands(mode)
    except Exception:
        return 4


def _decode_pil(data: bytes) -> tuple[np.ndarray, str | None]:
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError("image too large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        fmt = _unsupported_format(data[:16])
        if fmt:
            raise ImageError("unsupported image format", f"{fmt}; use JPEG, PNG, TIFF, BMP or DICOM") from exc
        raise ImageError("not an image") from exc
    except Exception as exc:
        raise ImageError("truncated or corrupt image", f"{type(exc).__name__}: {exc}") from exc
    try:
        width, height = img.size
        if width * height > MAX_PIXELS or width * height * _mode_bytes(img.mode) > MAX_DECODED_BYTES:
            raise ImageError("image too large", f"{width}x{height} pixels")
        _check_geometry(width, height)
        frames = getattr(img, "n_frames", 1)
        if frames > 1 and img.format != "MPO":  # MPO: a JPEG with extra pictures (depth map, preview)
            raise ImageError("multi-frame image", f"{frames} frames; export one slice")
        img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, MemoryError) as exc:
        raise ImageError("image too large", str(exc)) from exc
    except Exception as exc:
        raise ImageError("truncated or corrupt image", f"{type(exc).__name__}: {exc}") from exc
    try:
        ImageOps.exif_transpose(img, in_place=True)  # phones and some viewers store slices rotated
    except Exception:  # malformed EXIF: keep the stored orientation
        pass
    arr, rgb, note = _pil_to_uint8(img)
    img.close()
    check_slice(arr, rgb)
    return arr, note


def _decode(data: bytes, name: str) -> tuple[np.ndarray, str | None]:
    if not data:
        raise ImageError("empty file")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError("file too large", f"{len(data)} bytes; at most {MAX_FILE_BYTES}")
    if name.lower().endswith(".dcm") or data[128:132] == b"DICM":
        arr, rgb = _dicom_to_uint8(data)
        check_slice(arr, rgb)
        return arr, "DICOM->L"
    return _decode_pil(data)


def decode_grayscale(data: bytes, name: str = "") -> tuple[np.ndarray, str | None]:
    """Decode image bytes (JPEG, PNG, BMP, TIFF, single-frame GIF/WebP, DICOM) to an HxW uint8 array.

    Returns ``(array, note)`` where ``note`` names a mode conversion (``RGBA->L``...) or is None.
    Raises :class:`ImageError` with a countable reason for anything unusable, and nothing else.
    """
    try:
        return _decode(bytes(data), name)
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError("image too large", "out of memory while decoding") from exc
    except Exception as exc:  # a decoder failure not anticipated above: still one countable reason
        raise ImageError("undecodable image", f"{type(exc).__name__}: {exc}") from exc


def read_image_file(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; anything else raises :class:`ImageError`.

    The path is checked (``stat``, links followed) before it is opened, and again on the open descriptor, so a
    FIFO, device, socket or folder is never read and an oversized file is never read into memory.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError("symlink loop", str(exc)) from exc
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise ImageError("dangling link", f"{path} -> {os.readlink(path)}") from exc
        raise ImageError("unreadable file", str(exc)) from exc
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file", f"{path} is a {_kind(st.st_mode)}")
    if st.st_size > limit:
        raise ImageError("file too large", f"{st.st_size} bytes; at most {limit}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ImageError("unreadable file", str(exc)) from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())  # the file opened may not be the one checked (replaced meanwhile)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file", f"{path} is a {_kind(st.st_mode)}")
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise ImageError("unreadable file", str(exc)) from exc
    if len(data) > limit:
        raise ImageError("file too large", f"more than {limit} bytes")
    return data


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO (pipe)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


def load_grayscale(path: str | Path) -> tuple[np.ndarray, str | None]:
    """Read a regular file from disk (see :func:`read_image_file`) and decode it (see :func:`decode_grayscale`)."""
    return decode_grayscale(read_image_file(path), str(path))


def resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a greyscale slice to ``size x size`` (the contract's resize)."""
    if arr.shape == (size, size):
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def thumbnail(arr: np.ndarray) -> np.ndarray:
    """Mean-centred, L2-normalised 32x32 thumbnail (the near-duplicate fingerprint)."""
    t = np.asarray(Image.fromarray(arr).resize((THUMB, THUMB), Image.BILINEAR), dtype=np.float32).ravel()
    t -= t.mean()
    n = float(np.linalg.norm(t))
    return t / n if n > 1e-6 else t
