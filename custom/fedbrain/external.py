"""External validation: any model file scored on a folder that never took part in training.

The folder is read by the same readers as a hospital's data (:mod:`fedbrain.data.readers`), unreadable images are
counted and left out (never scored as black), and every image is checked against the training images of the
model's run with the near-duplicate fingerprint of the federation's leakage control: the metrics come with and
without the images that have a twin in training.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedbrain.data.readers import DataLayoutError, Record, read_source

LAYOUTS = ("yesno", "folders", "sartaj", "figshare", "csv")
TWIN_THRESHOLD = 0.98  # the federation's group threshold (FederationSpec.group_threshold): same slice or adjacent


@dataclass
class ExternalSet:
    """The usable labelled images of an external folder and what was left out."""

    root: str
    layout: str
    scheme: str
    records: list[Record]
    skipped: Counter = field(default_factory=Counter)  # reason -> count


def relabel(records: list[Record], scheme: str) -> list[Record]:
    """Labels as ``scheme`` allows: ``binary`` keeps only tumour / no_tumor, ``tumour_type`` drops no_tumor."""
    if scheme == "binary":
        return [Record(r.path, "no_tumor" if r.label == "no_tumor" else "tumour", r.official_split, r.patient_id)
                for r in records]
    if scheme == "tumour_type":
        return [r for r in records if r.label not in ("no_tumor", "tumour")]
    return list(records)


def read_external(root: str | Path, layout: str, scheme: str | None = None, cache_dir: Path | None = None,
                  progress: bool = False) -> ExternalSet:
    """The external folder's readable, labelled images (``scheme``: as the labels are, unless given)."""
    from fedbrain.data.cache import index_images
    from fedbrain.data.readers import infer_scheme

    if layout not in LAYOUTS:
        raise DataLayoutError(f"unknown --layout {layout!r}; choose one of {list(LAYOUTS)}")
    read = read_source(layout, Path(root) / "manifest.csv" if layout == "csv" and Path(root).is_dir() else
                       Path(root))
    records = read.records
    if not records:
        raise DataLayoutError(f"{layout}: no labelled images under {str(root)!r}")
    scheme = scheme or infer_scheme(records)
    if scheme == "multiclass" and any(r.label == "tumour" for r in records):
        raise DataLayoutError("--scheme multiclass needs typed labels, but this folder labels tumour / no tumour "
                              "only; use --scheme binary")
    records = relabel(records, scheme)
    skipped = Counter(read.problems)
    index = index_images([r.path for r in records], cache_dir, progress)
    keep = []
    for r, ok, reason in zip(records, index.ok, index.reasons, strict=True):
        if ok:
            keep.append(r)
        else:
            skipped[f"unreadable image ({reason})"] += 1
    if not keep:
        raise DataLayoutError(f"{layout}: none of the {len(records)} images under {str(root)!r} can be read")
    return ExternalSet(str(root), layout, scheme, keep, skipped)


def training_twins(external: list[Record], training: list[Record], cache_dir: Path | None = None,
                   threshold: float = TWIN_THRESHOLD) -> np.ndarray:
    """For every external image, whether a training image is its near-duplicate (as it is or mirrored)."""
    from fedbrain.data.cache import index_images
    from fedbrain.data.dedup import flip_thumbs

    if not training or not external:
        return np.zeros(len(external), bool)
    ext = index_images([r.path for r in external], cache_dir)
    train = index_images([r.path for r in training], cache_dir)
    t = np.ascontiguousarray(train.thumbs[train.ok], np.float32)
    if not len(t):
        return np.zeros(len(external), bool)
    e = np.ascontiguousarray(ext.thumbs, np.float32)
    twin = np.zeros(len(external), bool)
    for start in range(0, len(e), 1024):
        block = e[start:start + 1024]
        sim = np.maximum(block @ t.T, flip_thumbs(block) @ t.T).max(axis=1)
        twin[start:start + 1024] = sim >= threshold
    return twin & ext.ok


def model_run(model_path: Path):
    """The run a model file belongs to (``<run>/checkpoints/*.pt``, ``<run>/compression/*``), or None."""
    from fedbrain.runs import RunDir

    return RunDir.of_model_file(model_path)


def evaluate_external(predictor, ext: ExternalSet, training: list[Record] | None, cache_dir: Path | None = None,
                      n_boot: int = 1000) -> dict:
    """Metrics on every usable external image and, when some have a twin in training, without those."""
    from fedbrain.data.arrays import arrays, normalise
    from fedbrain.evaluation import scored

    imgs, targets = arrays(ext.records, predictor.preprocessing, cache_dir)
    probs = predictor.raw_probabilities(normalise(imgs, predictor.preprocessing))
    cal = predictor.calibrator
    twins = training_twins(ext.records, training or [], cache_dir)
    out = {"external": ext.root, "layout": ext.layout, "scheme": ext.scheme, "n_images": len(ext.records),
           "skipped": dict(ext.skipped), "twin_check": "run training split" if training else
           "not done: the model's run (its splits/) is unknown; pass --train-run RUN",
           "n_training_twins": int(twins.sum()), "twin_threshold": TWIN_THRESHOLD,
           "calibration": cal.params(), "results": {"all images": scored(probs, targets, n_boot, calibrator=cal)}}
    if twins.any() and (~twins).any():
        out["results"]["without training twins"] = scored(probs[~twins], targets[~twins], n_boot, calibrator=cal)
    return out


def refit_calibration(predictor, ext: ExternalSet, cache_dir: Path | None = None) -> dict:
    """The model's calibration refitted on a hospital's own labelled images (the folder ``ext``): each level with
    enough images of its outcomes is fitted anew, the others keep the model's current fit."""
    from fedbrain import calibration
    from fedbrain.data.arrays import arrays, normalise

    imgs, targets = arrays(ext.records, predictor.preprocessing, cache_dir)
    probs = predictor.raw_probabilities(normalise(imgs, predictor.preprocessing))
    fitted_on = (f"local: {len(targets)} labelled images of the folder {Path(ext.root).name!r} "
                 f"(layout {ext.layout}, labels {ext.scheme})")
    return calibration.keep_unfitted(calibration.fit(probs, targets, fitted_on), predictor.card.calibration)


def save_with_calibration(model_file: str | Path, out: str | Path, record: dict) -> Path:
    """A copy of a model file (.pt or .onnx) whose card carries ``record``; the original is left untouched."""
    import shutil

    from fedbrain.checkpoint import ModelCard, load_checkpoint, save_checkpoint

    model_file, out = Path(model_file), Path(out)
    if model_file.suffix.lower() == ".onnx":
        import onnx

        from fedbrain.checkpoint import set_metadata

        props = {p.key: p.value for p in onnx.load(str(model_file)).metadata_props}
        card = ModelCard.from_onnx_metadata(props, str(model_file)).replace(calibration=record)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_file, out)
        set_metadata(out, card.to_onnx_metadata())
        return out
    model, card = load_checkpoint(model_file)
    return save_checkpoint(out, model, card.replace(calibration=record))


__all__ = ["LAYOUTS", "ExternalSet", "read_external", "training_twins", "evaluate_external", "model_run", "relabel",
           "refit_calibration", "save_with_calibration"]
