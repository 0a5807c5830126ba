"""Self-describing checkpoints: the weights plus everything needed to use them correctly."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import torch
from torch import nn

from fedbrain.contract import CLASSES, Preprocessing
from fedbrain.models import create_model

FORMAT = "fedbrain-checkpoint/1"


class CheckpointError(ValueError):
    pass


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    preprocessing: Preprocessing,
    supervised_granularity: str,
    label_schemes: dict[str, str] | None = None,
    model_kwargs: dict | None = None,
    training: dict | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write weights with the I/O contract, label granularity, training config and metrics."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model_name, "kwargs": dict(model_kwargs or {})},
        "classes": list(CLASSES),
        "preprocessing": preprocessing.to_dict(),
        "supervised_granularity": supervised_granularity,
        "label_schemes": dict(label_schemes or {}),
        "training": training or {},
        "metrics": metrics or {},
        "extra": extra or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable fedbrain checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a fedbrain checkpoint (format {FORMAT})")
    return payload


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model from its checkpoint, pruned or not; returns ``(model in eval mode, metadata)``.

    A pruned checkpoint (``fedbrain compress``) records its layer sizes in ``extra["pruned"]``; the
    registry model is shrunk to them before the weights are loaded.
    """
    payload = read_checkpoint(path)
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    pruned = (meta.get("extra") or {}).get("pruned")
    try:
        model = create_model(meta["model"]["name"], num_classes=len(meta["classes"]), pretrained=False,
                             **meta["model"].get("kwargs", {}))
        if pruned:
            from fedbrain.compression.prune import shrink_to

            shrink_to(model, pruned["layers"])
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{str(path)!r}: weights do not fit the recorded architecture: "
                              f"{str(exc).splitlines()[0]}") from exc
    model.eval()
    meta["preprocessing"] = Preprocessing.from_dict(meta["preprocessing"])
    return model, meta
