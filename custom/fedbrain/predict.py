"""One inference API for every model variant: a torch checkpoint or an ONNX file from ``fedbrain compress``.

>>> p = load_predictor("workspace/<run>/compression/int8.onnx")
>>> r = p.predict("slice.png")          # a path, raw bytes, or an HxW uint8 array
>>> r.probabilities, r.tumour_probability, r.predicted, r.latency_ms, r.warnings

Probabilities are calibrated by the calibration the model card carries (``fedbrain.calibration``).

The model card (:class:`fedbrain.checkpoint.ModelCard`) is read from the model file (checkpoint fields or
ONNX ``metadata_props``) and its preprocessing applied exactly as in evaluation: decode to 8-bit
greyscale, bilinear resize, normalise.
Unreadable images raise :class:`fedbrain.data.images.ImageError`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedbrain.calibration import Calibrator
from fedbrain.checkpoint import CheckpointError, ModelCard, load_checkpoint
from fedbrain.contract import NO_TUMOR, Preprocessing
from fedbrain.data.images import ImageError, check_slice, decode_grayscale, load_grayscale, resize

__all__ = ["Prediction", "Predictor", "load_predictor", "ImageError"]


@dataclass
class Prediction:
    probabilities: dict[str, float]  # all four classes
    tumour_probability: float  # 1 - p(no_tumor)
    predicted: str  # argmax class; "tumour" / "no_tumor" for binary-supervised models
    latency_ms: float  # model forward only
    variant: str
    calibration: dict = field(default_factory=dict)  # the calibration's parameters ({}: uncalibrated)
    warnings: list[str] = field(default_factory=list)  # why the input may lie outside the training data

    def to_dict(self) -> dict:
        return asdict(self)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """A loaded model plus its contract. Build it with :func:`load_predictor`."""

    def __init__(self, card: ModelCard, kind: str, torch_model=None, session=None, path: str | Path | None = None,
                 threads: int | None = None):
        self.card = card
        self.kind = kind
        self.torch_model = torch_model
        self.session = session
        self.path = Path(path) if path is not None else None
        self.threads = threads
        self._input_name = session.get_inputs()[0].name if session is not None else None

    # ------------------------------------------------------------ contract

    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.card.preprocessing

    @property
    def variant(self) -> str:
        return self.card.variant

    @property
    def calibrator(self) -> Calibrator:
        """The model card's fitted calibration, applied to every probability this predictor returns."""
        return self.card.calibrator

    def __repr__(self) -> str:
        return f"Predictor({self.card.model}, variant={self.variant}, kind={self.kind})"

    # ------------------------------------------------------------ inputs

    def image_array(self, image) -> np.ndarray:
        """A path, raw bytes or array -> HxW uint8 greyscale (raises ImageError)."""
        if isinstance(image, (str, Path)):
            return load_grayscale(image)[0]
        if isinstance(image, (bytes, bytearray, memoryview)):
            return decode_grayscale(bytes(image))[0]
        if isinstance(image, np.ndarray):
            arr = image
            if arr.ndim == 3 and arr.shape[2] in (1, 3, 4) and arr.dtype == np.uint8:
                from PIL import Image

                arr = np.asarray(Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).convert("L"))
            if arr.ndim != 2 or arr.dtype != np.uint8:
                raise ImageError("unsupported array",
                                 f"expected an HxW uint8 array, got {arr.dtype} {arr.shape}")
            check_slice(arr)  # the same "is it a slice" checks as a decoded file
            return arr
        raise ImageError("unsupported input",
                         f"expected a path, bytes or a numpy array, got {type(image).__name__}")

    def preprocess(self, arr: np.ndarray) -> np.ndarray:
        """HxW uint8 greyscale -> ``(1, C, H, W)`` float32 normalised by the contract."""
        from fedbrain.data.dataset import to_tensor

        pre = self.preprocessing
        a = resize(arr, pre.image_size)
        if not a.flags.writeable:  # decoded PIL buffers are read-only
            a = a.copy()
        return to_tensor(a[None], pre).numpy()

    # ------------------------------------------------------------ model

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw model outputs for a preprocessed batch ``(N, C, H, W)``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.kind == "onnx":
            return self.session.run(None, {self._input_name: x})[0]
        import torch

        with torch.inference_mode():
            return self.torch_model(torch.from_numpy(x)).float().numpy()

    def probabilities(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Calibrated class probabilities ``(N, classes)`` for a preprocessed batch (evaluated in chunks)."""
        return self.calibrator.apply(self.raw_probabilities(x, batch_size))

    def raw_probabilities(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The model's own softmax probabilities, before calibration."""
        if len(x) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.concatenate([_softmax(self.logits(x[i:i + batch_size]).astype(np.float64))
                               for i in range(0, len(x), batch_size)]).astype(np.float32)

    def warm_up(self, calls: int = 3) -> None:
        """A few forward passes on a synthetic slice, so the first timed prediction is a steady-state one."""
        dummy = np.tile((np.arange(64, dtype=np.uint16) * 4).astype(np.uint8), (64, 1))
        for _ in range(calls):
            self.logits(self.preprocess(dummy))

    def reported_probabilities(self, prediction: Prediction) -> dict[str, float]:
        """What the model's labels support: tumour / no tumour only for a binary-supervised model, else every
        class (the dashboard's Predict page shows the same)."""
        if self.card.binary_only:
            return {"tumour": prediction.tumour_probability, "no_tumor": 1.0 - prediction.tumour_probability}
        return dict(prediction.probabilities)

    def predict(self, image) -> Prediction:
        """Classify one image (path, raw bytes, or HxW uint8 array)."""
        arr = self.image_array(image)
        x = self.preprocess(arr)
        t0 = time.perf_counter()
        out = self.logits(x)
        latency = (time.perf_counter() - t0) * 1e3
        probs = self.calibrator.apply(_softmax(out.astype(np.float64))).astype(np.float64)[0]
        classes = self.classes
        no_tumor = classes.index("no_tumor") if "no_tumor" in classes else NO_TUMOR
        p_tumour = float(1.0 - probs[no_tumor])
        if self.card.binary_only:
            predicted = "tumour" if p_tumour >= 0.5 else "no_tumor"
        else:
            predicted = classes[int(np.argmax(probs))]
        return Prediction({c: float(p) for c, p in zip(classes, probs, strict=True)}, p_tumour, predicted,
                          latency, self.variant, self.calibrator.params(), self.input_warnings(arr))

    def input_warnings(self, arr: np.ndarray) -> list[str]:
        """Why a decoded slice lies outside the model's training images (the card's input profile)."""
        from fedbrain.input_check import check_input

        return check_input(arr, self.card.extra.get("input_profile"), self.preprocessing)


def _onnx_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{str(path)!r} is not a loadable ONNX model: {first}") from exc


def load_predictor(path: str | Path, threads: int | None = None) -> Predictor:
    """Load a fedbrain ``.pt`` checkpoint (plain or pruned) or an ``.onnx`` from ``fedbrain compress``.

    ``threads``: ONNX Runtime intra-op threads (default 1); for torch models, ``torch.set_num_threads``
    is called only when ``threads`` is given (it is process-wide).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {str(path)!r} does not exist")
    if path.suffix.lower() == ".onnx":
        session = _onnx_session(path, threads or 1)
        card = ModelCard.from_onnx_metadata(session.get_modelmeta().custom_metadata_map, str(path))
        return Predictor(card, "onnx", session=session, path=path, threads=threads or 1)
    model, card = load_checkpoint(path)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return Predictor(card, "torch", torch_model=model, path=path, threads=threads)
