"""Decoding one MRI slice safely into 8-bit greyscale, shared by indexing, training and prediction."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # larger images are refused (decompression bombs)
THUMB = 32


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short, countable phrase."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


def _dicom_to_uint8(data: bytes) -> np.ndarray:
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - pydicom is a core dependency
        raise ImageError("DICOM support needs pydicom") from exc
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise ImageError("unreadable DICOM", str(exc)) from exc
    if "PixelData" not in ds:
        raise ImageError("DICOM without pixel data")
    try:
        arr = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise ImageError("unreadable DICOM pixel data", str(exc)) from exc
    if arr.ndim == 3 and getattr(ds, "NumberOfFrames", 1) not in (None, 1):
        raise ImageError("multi-frame image", f"{arr.shape[0]} frames; export one slice")
    if arr.ndim == 3:  # colour DICOM
        arr = arr.mean(axis=-1)
    arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        lo, hi = center - width / 2, center + width / 2
    else:  # robust window: 0.5th..99.5th percentile
        lo, hi = np.percentile(arr, [0.5, 99.5])
    if hi <= lo:
        raise ImageError("blank image", "constant pixel values")
    return (np.clip((arr - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


def _pil_to_uint8(img: Image.Image) -> tuple[np.ndarray, str | None]:
    """Convert any supported PIL mode to 8-bit greyscale; return the conversion note, if any."""
    mode = img.mode
    note = None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = np.percentile(arr, [0.5, 99.5])
        if hi <= lo:
            raise ImageError("blank image", "constant pixel values")
        return (np.clip((arr - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8), f"{mode}->L"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
        note = f"{mode}->L (alpha on black)"
    elif mode not in ("L", "RGB"):
        note = f"{mode}->L"
    return np.asarray(img.convert("L"), dtype=np.uint8), note


def decode_grayscale(data: bytes, name: str = "") -> tuple[np.ndarray, str | None]:
    """Decode image bytes (JPEG, PNG, BMP, TIFF, DICOM) to an HxW uint8 array.

    Returns ``(array, note)`` where ``note`` names a mode conversion (``RGBA->L``...) or is None.
    Raises :class:`ImageError` with a countable reason for anything unusable.
    """
    if not data:
        raise ImageError("empty file")
    if name.lower().endswith(".dcm") or data[128:132] == b"DICM":
        return _dicom_to_uint8(data), "DICOM->L"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise ImageError("image too large", f"{img.width}x{img.height} pixels")
            if getattr(img, "n_frames", 1) > 1:
                raise ImageError("multi-frame image", f"{img.n_frames} frames; export one slice")
            img.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError("image too large", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise ImageError("not an image") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError("truncated or corrupt image", str(exc)) from exc
    if img.width < 8 or img.height < 8:
        raise ImageError("image too small", f"{img.width}x{img.height}")
    arr, note = _pil_to_uint8(img)
    if int(arr.max()) == int(arr.min()):
        raise ImageError("blank image", "constant pixel values")
    return arr, note


def load_grayscale(path: str | Path) -> tuple[np.ndarray, str | None]:
    """Read a file from disk and decode it (see :func:`decode_grayscale`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError("unreadable file", str(exc)) from exc
    return decode_grayscale(data, str(path))


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
