"""The model-file format, written once: a typed :class:`ModelCard` plus weights, in ``.pt`` and ONNX files.

A checkpoint (``fedbrain-checkpoint/1``) is a ``torch.save`` dict of plain tensors and JSON-like values,
read with ``weights_only=True`` only: the card's fields, then ``state_dict``. A pruned variant records its
layer sizes in the card (``pruned["layers"]``), so :func:`load_checkpoint` rebuilds the registry model,
shrinks those layers and loads the weights strictly. An ONNX variant carries the same card as
``metadata_props`` (:meth:`ModelCard.to_onnx_metadata`); :func:`fedbrain.predict.load_predictor` reads both.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from fedbrain.calibration import Calibrator
from fedbrain.contract import CLASSES, Preprocessing
from fedbrain.models import create_model

FORMAT = "fedbrain-checkpoint/1"
ONNX_FORMAT = "fedbrain-onnx/1"
ONNX_INPUT = "input"
ONNX_OUTPUT = "logits"


class CheckpointError(ValueError):
    """A model file that is missing, unreadable or does not fit its recorded architecture."""


MAX_MODEL_NUMBERS = 200_000_000  # weights + buffers a model card may ask for (0.8 GB in float32; VGG16: 134 M)


@dataclass
class ModelCard:
    """Everything needed to use a model correctly: architecture, classes, input contract, provenance."""

    model: str
    preprocessing: Preprocessing
    supervised_granularity: str  # what the model may claim to know: multiclass | tumour_type | binary
    model_kwargs: dict = field(default_factory=dict)
    classes: tuple[str, ...] = CLASSES
    label_schemes: dict = field(default_factory=dict)  # site -> label scheme it trained on
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    variant: str = "fp32"  # fp32 | pruned | int8 | pruned+int8
    pruned: dict | None = None  # pruning record; "layers" holds every resized layer's sizes
    source_checkpoint: str = ""  # the checkpoint a compressed variant was made from
    extra: dict = field(default_factory=dict)
    created: str = ""
    calibration: dict = field(default_factory=dict)  # the calibration record (fedbrain.calibration)

    def __post_init__(self) -> None:
        from fedbrain.models import architecture, list_models

        if self.model in list_models():  # the full architecture, defaults included, travels with the weights
            self.model_kwargs = architecture(self.model, self.model_kwargs)

    def replace(self, **changes) -> ModelCard:
        return replace(self, **changes)

    @property
    def calibrator(self) -> Calibrator:
        """The fitted calibration of the probabilities (identity when the card carries none)."""
        return Calibrator.from_record(self.calibration)

    @property
    def binary_only(self) -> bool:
        return self.supervised_granularity == "binary"

    # -------------------------------------------------------------- .pt payload

    def to_payload(self) -> dict:
        """The checkpoint dict without weights (the on-disk layout of format 1)."""
        extra = dict(self.extra)
        extra["variant"] = self.variant
        if self.pruned is not None:
            extra["pruned"] = self.pruned
        if self.source_checkpoint:
            extra["source_checkpoint"] = self.source_checkpoint
        return {
            "format": FORMAT,
            "created": self.created or _now(),
            "model": {"name": self.model, "kwargs": dict(self.model_kwargs)},
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_dict(),
            "supervised_granularity": self.supervised_granularity,
            "label_schemes": dict(self.label_schemes),
            "training": dict(self.training),
            "metrics": dict(self.metrics),
            "calibration": dict(self.calibration),
            "extra": extra,
        }

    @classmethod
    def from_payload(cls, payload: dict, where: str = "") -> ModelCard:
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{where or 'this file'} is not a fedbrain checkpoint (format {FORMAT})")
        try:
            extra = dict(payload.get("extra") or {})
            return cls(
                model=payload["model"]["name"],
                model_kwargs=dict(payload["model"].get("kwargs") or {}),
                classes=tuple(payload["classes"]),
                preprocessing=Preprocessing.from_dict(payload["preprocessing"]),
                supervised_granularity=str(payload["supervised_granularity"]),
                label_schemes=dict(payload.get("label_schemes") or {}),
                training=dict(payload.get("training") or {}),
                metrics=dict(payload.get("metrics") or {}),
                variant=str(extra.pop("variant", "fp32")),
                pruned=extra.pop("pruned", None),
                source_checkpoint=str(extra.pop("source_checkpoint", "") or ""),
                extra=extra,
                created=str(payload.get("created", "")),
                calibration=dict(payload.get("calibration") or {}),
            )
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{where or 'this file'}: incomplete model card ({exc})") from exc

    # -------------------------------------------------------------- ONNX metadata_props

    def to_onnx_metadata(self, variant: str | None = None) -> dict[str, str]:
        """The string ``metadata_props`` written into every ONNX variant."""
        return {
            "fedbrain_format": ONNX_FORMAT,
            "variant": variant or self.variant,
            "classes": json.dumps(list(self.classes)),
            "preprocessing": json.dumps(self.preprocessing.to_dict()),
            "supervised_granularity": self.supervised_granularity,
            "model": json.dumps({"name": self.model, "kwargs": self.model_kwargs}),
            "label_schemes": json.dumps(self.label_schemes),
            "source_checkpoint": self.source_checkpoint,
            "calibration": json.dumps(self.calibration),
            "input_profile": json.dumps(self.extra.get("input_profile") or {}),
            "output": ONNX_OUTPUT,
        }

    @classmethod
    def from_onnx_metadata(cls, props: dict[str, str], where: str = "") -> ModelCard:
        if props.get("fedbrain_format") != ONNX_FORMAT:
            raise CheckpointError(f"{where or 'this ONNX file'} carries no fedbrain contract (metadata "
                                  f"'fedbrain_format' != {ONNX_FORMAT!r}); export it with `fedbrain compress`")
        try:
            arch = json.loads(props["model"])
            return cls(model=arch["name"], model_kwargs=dict(arch.get("kwargs") or {}),
                       classes=tuple(json.loads(props["classes"])),
                       preprocessing=Preprocessing.from_dict(json.loads(props["preprocessing"])),
                       supervised_granularity=props["supervised_granularity"],
                       label_schemes=json.loads(props.get("label_schemes") or "{}"),
                       variant=props.get("variant", "onnx"), source_checkpoint=props.get("source_checkpoint", ""),
                       calibration=json.loads(props.get("calibration") or "{}"),
                       extra={"input_profile": json.loads(props.get("input_profile") or "{}")})
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where or 'this ONNX file'}: unreadable fedbrain metadata ({exc})") from exc

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        return d

    # -------------------------------------------------------------- the model

    def _create(self) -> nn.Module:
        model = create_model(self.model, num_classes=len(self.classes), pretrained=False, **self.model_kwargs)
        if self.pruned:
            shrink_to(model, self.pruned["layers"])
        return model

    def parameter_count(self) -> int:
        """Numbers in the model this card describes (weights and buffers), counted on PyTorch's meta device:
        nothing is allocated."""
        with torch.device("meta"):
            model = self._create()
        return sum(t.numel() for t in (*model.parameters(), *model.buffers()))

    def build_model(self) -> nn.Module:
        """The registry model this card describes, shrunk to its pruned layer sizes (random weights); a card whose
        architecture asks for more than ``MAX_MODEL_NUMBERS`` is refused before any memory is allocated."""
        try:
            n = self.parameter_count()
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - a malformed architecture, whatever the builder raised
            raise CheckpointError(f"the model card's architecture cannot be built: {exc}") from exc
        if n > MAX_MODEL_NUMBERS:
            raise CheckpointError(f"the model card asks for a {self.model} of {n:,} numbers (at most "
                                  f"{MAX_MODEL_NUMBERS:,}): refused before allocating it")
        return self._create()


def training_card(model: str, model_kwargs: dict | None, image_size: int | None, label_schemes: dict[str, str],
                  training: dict) -> ModelCard:
    """The card of a model fedbrain trained (pooled, simulated or deployed): its architecture, the contract's
    preprocessing for it, what its sites' labels let it claim (with no scheme known: tumour / no tumour only), the
    sites' schemes and how it was trained."""
    from fedbrain.contract import supervised_granularity
    from fedbrain.models import default_preprocessing

    return ModelCard(model=model, model_kwargs=dict(model_kwargs or {}),
                     preprocessing=default_preprocessing(model, image_size),
                     supervised_granularity=supervised_granularity(list(label_schemes.values()) or ["binary"]),
                     label_schemes=dict(label_schemes), training=training)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def set_metadata(path: str | Path, props: dict[str, str]) -> None:
    """Replace the model's metadata_props with ``props`` (other keys are dropped)."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.producer_name = "fedbrain"
    onnx.save(model, str(path))


def save_checkpoint(path: str | Path, model: nn.Module, card: ModelCard) -> Path:
    """Write ``card`` and the model's weights atomically; a pruned card gets the model's current layer sizes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if card.pruned is not None:
        card = card.replace(pruned={**card.pruned, "layers": layer_shapes(model)})
    payload = card.to_payload()
    payload["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_weights(path: str | Path) -> dict:
    """A ``torch.save`` file read with ``weights_only=True`` (plain tensors and containers, never code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{str(path)!r} is not a readable weights file: {first}") from exc


def read_checkpoint(path: str | Path) -> tuple[ModelCard, dict]:
    """``(card, state_dict)`` of a fedbrain checkpoint, without building the model."""
    payload = load_weights(path)
    card = ModelCard.from_payload(payload, repr(str(path)))
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds no weights")
    return card, state


def read_card(path: str | Path) -> ModelCard:
    return read_checkpoint(path)[0]


def load_checkpoint(path: str | Path) -> tuple[nn.Module, ModelCard]:
    """Rebuild the model of a checkpoint (plain or pruned); returns ``(model in eval mode, card)``."""
    card, state = read_checkpoint(path)
    try:
        model = card.build_model()
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r}: weights do not fit the recorded architecture: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    model.eval()
    return model, card


def deployable(model: nn.Module, card: ModelCard) -> tuple[nn.Module, ModelCard]:
    """The model as it is exported, pruned and quantised: weight-standardised convolutions folded into plain ones
    (the same outputs; the card then describes the plain architecture, ``norm="none"``). Other models unchanged."""
    from fedbrain.models import WSConv2d, fold_weight_standardisation

    if not any(isinstance(m, WSConv2d) for m in model.modules()):
        return model, card
    import copy

    folded = fold_weight_standardisation(copy.deepcopy(model)).eval()
    return folded, card.replace(model_kwargs={**card.model_kwargs, "norm": "none"})


def global_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from an NVFlare PT persistor file (``FL_global_model.pt``: ``{"model": state_dict, ...}``)."""
    obj = load_weights(path)
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict):
        raise CheckpointError(f"{str(path)!r} holds no state dict")
    return {k: torch.as_tensor(v) for k, v in sd.items()}


# ---------------------------------------------------------------- pruned layer sizes

_DIMS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.BatchNorm2d: ("num_features",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    nn.Linear: ("in_features", "out_features"),
}


def _dims(m: nn.Module) -> tuple[str, ...] | None:
    """The size attributes of a resizable layer (subclasses included, e.g. a same-padding Conv2d), else None."""
    return next((attrs for kind, attrs in _DIMS.items() if isinstance(m, kind)), None)


def layer_shapes(model: nn.Module) -> dict[str, dict]:
    """Sizes of every Conv2d / BatchNorm2d / GroupNorm / Linear, by module name (what :func:`shrink_to` needs)."""
    out = {}
    for name, m in model.named_modules():
        attrs = _dims(m)
        if attrs:
            out[name] = {"type": type(m).__name__, **{a: int(getattr(m, a)) for a in attrs}}
    return out


def _resize(m: nn.Module, spec: dict) -> None:
    """Give layer ``m`` the recorded sizes in place (its class, padding and flags kept; weights to be loaded)."""
    def param(*shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape))

    if isinstance(m, nn.Conv2d):
        m.in_channels, m.out_channels, m.groups = spec["in_channels"], spec["out_channels"], spec["groups"]
        m.weight = param(m.out_channels, m.in_channels // m.groups, *m.kernel_size)
    elif isinstance(m, nn.BatchNorm2d):
        m.num_features = spec["num_features"]
        if m.affine:
            m.weight = param(m.num_features)
        if m.track_running_stats:
            m.running_mean, m.running_var = torch.zeros(m.num_features), torch.ones(m.num_features)
    elif isinstance(m, nn.GroupNorm):
        m.num_groups, m.num_channels = spec["num_groups"], spec["num_channels"]
        if m.affine:
            m.weight = param(m.num_channels)
    else:
        m.in_features, m.out_features = spec["in_features"], spec["out_features"]
        m.weight = param(m.out_features, m.in_features)
    if getattr(m, "bias", None) is not None:
        m.bias = param(m.weight.shape[0])


def shrink_to(model: nn.Module, shapes: dict[str, dict]) -> nn.Module:
    """Resize the layers of a freshly built model to the recorded sizes (in place)."""
    for name, spec in shapes.items():
        try:
            m = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"pruned layer {name!r} does not exist in the rebuilt model") from exc
        attrs = _dims(m)
        if attrs is None or type(m).__name__ != spec.get("type"):
            raise CheckpointError(f"pruned layer {name!r} is a {type(m).__name__}, "
                                  f"checkpoint says {spec.get('type')}")
        if any(int(getattr(m, a)) != int(spec[a]) for a in attrs):
            _resize(m, spec)
    return model


__all__ = ["ModelCard", "CheckpointError", "MAX_MODEL_NUMBERS", "save_checkpoint", "load_checkpoint",
           "read_checkpoint", "read_card", "load_weights", "global_state", "layer_shapes", "shrink_to", "FORMAT",
           "ONNX_FORMAT"]
