"""``compress``: one checkpoint in, the variants fp32 / pruned / int8 / pruned+int8 and the report out."""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedbrain.checkpoint import deployable, load_checkpoint, save_checkpoint
from fedbrain.compression import report as rep
from fedbrain.compression.data import LocalData, arrays, evenly, normalise, sample
from fedbrain.compression.latency import interleaved, torch_threads
from fedbrain.compression.onnx_export import export_onnx
from fedbrain.compression.prune import finetune, prune_copy, pruned_card
from fedbrain.compression.quantize import quantize_int8
from fedbrain.models import count_macs, count_parameters


@dataclass
class CompressConfig:
    target_macs_ratio: float = 0.55  # pruned MACs <= 55% of fp32 (>= 45% fewer; the goal is >= 40%)
    round_to: int | None = 16  # pruned channel counts are multiples of this (SIMD blocks)
    finetune_epochs: int = 3
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 32
    # the pruned model also learns the unpruned model's soft labels (share of the loss; 0: labels only)
    finetune_distil: float = 1.0
    calib_images: int = 256  # train-split images for int8 calibration
    # where the pruning fine-tune and the int8 calibration read images: one hospital's training split (a real
    # federation has no pooled data), or for calibration the public Br35H set ("embedded"); None: the hospital
    # with the most training images
    finetune_site: str | None = None
    calibration_site: str | None = None
    calib_method: str = "minmax"
    keep_input_conv_fp32: bool = True
    max_eval_images: int | None = None  # evaluate on all test images unless set
    warmup: int = 30
    repeats: int = 300
    threads: tuple[int, ...] = (1, 2)
    torch_latency: bool = False  # also time the .pt variants in torch eager (slower; context only)
    seed: int = 0
    cache_dir: str | None = None
    extra: dict = field(default_factory=dict)


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def compress(checkpoint: str | Path, data: LocalData, out_dir: str | Path, cfg: CompressConfig | None = None,
             log: Callable[[str], None] = _log_default, progress: bool = False) -> dict:
    """Write the four variants and ``report.json``/``report.csv`` into ``out_dir``; return the report."""
    from fedbrain.contract import Augmentation
    from fedbrain.data.dataset import BatchLoader, SliceDataset
    from fedbrain.predict import load_predictor

    cfg = cfg or CompressConfig()
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    model, card = deployable(*load_checkpoint(checkpoint))
    card = card.replace(source_checkpoint=str(checkpoint))
    pre = card.preprocessing
    test_recs = evenly(data.records("test"), cfg.max_eval_images)
    if not test_recs:
        raise ValueError(f"no test images in {data.source}")
    tune_site = one_site(data, cfg.finetune_site)
    train_recs = tune_site.splits["train"]
    if not train_recs:
        raise ValueError(f"no train images at {tune_site.name} (needed for fine-tuning and calibration)")
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)

    # fp32 -------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    fp32_card = card.replace(variant="fp32")  # a pruned input keeps its layer record
    save_checkpoint(out / "fp32.pt", model, fp32_card)
    export_onnx(model, fp32_card, out / "fp32.onnx")
    lap("fp32_export_s", t0)
    log(f"fp32: {count_parameters(model):,} params, {count_macs(model, pre) / 1e6:.1f} MMACs -> {out}")

    # pruned + fine-tune -----------------------------------------------------------------------
    t0 = time.perf_counter()
    pruned, info = prune_copy(model, pre, target_macs_ratio=cfg.target_macs_ratio, round_to=cfg.round_to,
                              num_classes=len(card.classes))
    lap("prune_s", t0)
    log(f"pruned: {info['params_before']:,} -> {info['params_after']:,} params, "
        f"{info['macs_before'] / 1e6:.1f} -> {info['macs_after'] / 1e6:.1f} MMACs "
        f"(conv widths {info['widths_before']} -> {info['widths_after']}); "
        f"fine-tuning {cfg.finetune_epochs} epoch(s) on {len(train_recs)} train images of {tune_site.name}")
    t0 = time.perf_counter()
    ft = {"epochs": 0}
    if cfg.finetune_epochs > 0:
        ds = SliceDataset(train_recs, pre, cache, progress=progress)
        loader = BatchLoader(ds, cfg.finetune_batch_size, train=True, augmentation=Augmentation(),
                             seed=cfg.seed)
        val_recs = tune_site.splits["val"]
        val = BatchLoader(SliceDataset(val_recs, pre, cache), 64, train=False) if val_recs else None
        ft = finetune(pruned, loader, cfg.finetune_epochs, cfg.finetune_lr, seed=cfg.seed, val_loader=val,
                      progress=progress, teacher=model, distil_weight=cfg.finetune_distil)
    lap("finetune_s", t0)
    ft["site"] = tune_site.name
    ft["train_images"] = len(train_recs)
    pcard = pruned_card(card, {**info, "finetune": ft})
    save_checkpoint(out / "pruned.pt", pruned, pcard)
    export_onnx(pruned, pcard, out / "pruned.onnx")

    # int8 -------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    calib_recs, calib_source = calibration_records(data, cfg.calibration_site, tune_site, cache)
    calib_recs = sample(calib_recs, cfg.calib_images, cfg.seed)
    calib = normalise(arrays(calib_recs, pre, cache)[0], pre)
    for src, dst, variant in (("fp32.onnx", "int8.onnx", "int8"),
                              ("pruned.onnx", "pruned_int8.onnx", "pruned+int8")):
        quantize_int8(out / src, out / dst, calib, card.to_onnx_metadata(variant),
                      method=cfg.calib_method, keep_input_conv_fp32=cfg.keep_input_conv_fp32)
    lap("quantize_s", t0)
    log(f"int8: calibrated on {len(calib_recs)} images of {calib_source} ({cfg.calib_method})")

    # evaluation on the test split -------------------------------------------------------------
    t0 = time.perf_counter()
    imgs, targets = arrays(test_recs, pre, cache, progress=progress)
    torch_models = {"fp32": model, "pruned": pruned.eval()}
    arch = {"fp32": model, "pruned": pruned, "int8": model, "pruned+int8": pruned}
    rows, probs = [], {}
    for v in rep.VARIANTS:
        path = out / rep.FILES[v]
        predictor = load_predictor(path, threads=max(cfg.threads))
        metrics, p = rep.evaluate_predictor(predictor, imgs, targets)
        probs[v] = p
        row = {"variant": v, "file": path.name, "params": count_parameters(arch[v]),
               "macs": count_macs(arch[v], pre), "file_bytes": os.path.getsize(path), "n_test": len(targets),
               "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("macro_f1"),
               "tumour_auroc": metrics.get("tumour_auroc"), "tumour_accuracy": metrics.get("tumour_accuracy"),
               "metrics": metrics}
        if v in rep.TORCH_FILES:
            tp_ = load_predictor(out / rep.TORCH_FILES[v])
            pt_probs = np.concatenate([tp_.probabilities(normalise(imgs[i:i + 64], pre))
                                       for i in range(0, len(imgs), 64)])
            row["onnx_vs_torch_max_abs_diff"] = float(np.abs(pt_probs - p).max())
            row["torch_file"] = rep.TORCH_FILES[v]
            row["torch_file_bytes"] = os.path.getsize(out / rep.TORCH_FILES[v])
        rows.append(row)
    for row in rows:
        row["agreement_vs_fp32"] = float((probs[row["variant"]].argmax(1) == probs["fp32"].argmax(1)).mean())
    lap("evaluate_s", t0)

    # latency ----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    inputs = [normalise(imgs[i:i + 1], pre) for i in range(min(16, len(imgs)))]
    for th in cfg.threads:
        preds = {v: load_predictor(out / rep.FILES[v], threads=th) for v in rep.VARIANTS}
        fns = {v: p.logits for v, p in preds.items()}
        import torch

        if cfg.torch_latency:
            for v, m in torch_models.items():
                fns[f"torch:{v}"] = (lambda mod: (lambda x: mod(torch.from_numpy(x))))(m)
        with torch_threads(th), torch.inference_mode():
            lat = interleaved(fns, inputs, cfg.warmup, cfg.repeats)
        for row in rows:
            s = lat[row["variant"]]
            row[f"latency_ms_p50_{th}t"], row[f"latency_ms_p95_{th}t"] = s["p50"], s["p95"]
            if f"torch:{row['variant']}" in lat:
                row[f"torch_latency_ms_p50_{th}t"] = lat[f"torch:{row['variant']}"]["p50"]
    lap("latency_s", t0)
    rep.add_ratios(rows)
    report = {
        "format": "fedbrain-compression-report/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint),
        "model": {"name": card.model, "kwargs": card.model_kwargs},
        "supervised_granularity": card.supervised_granularity,
        "data": {"source": data.source, "sites": [s.name for s in data.sites], "test_images": len(test_recs),
                 "finetune_site": tune_site.name, "train_images": len(train_recs),
                 "calibration": calib_source, "calibration_images": len(calib_recs)},
        "latency": {"batch": 1, "runtime": "onnxruntime CPUExecutionProvider", "warmup": cfg.warmup,
                    "repeats": cfg.repeats, "threads": list(cfg.threads), "interleaved": True,
                    "cpu_count": os.cpu_count(), "load_avg_at_start": _loadavg()},
        "pruning": info, "finetune": ft,
        "quantisation": {"route": "onnxruntime quantize_static QDQ", "activations": "uint8",
                         "weights": "int8 per-channel", "calibration": cfg.calib_method,
                         "input_conv_fp32": cfg.keep_input_conv_fp32},
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "rows": rows,
        "goals": rep.goals(rows),
        "timings_s": {**timings, "total_s": round(time.perf_counter() - t_start, 2)},
        "notes": [
            "latency: ONNX Runtime, batch 1, model forward only, median (p50) and p95 over 'repeats' calls "
            "after 'warmup' calls; variants timed round-robin so machine load affects all alike",
            "params/MACs of int8 variants are those of their fp32 architecture (quantisation keeps it)",
            "file_bytes is the ONNX file on disk; torch_file_bytes the .pt checkpoint",
        ],
    }
    rep.write_report(out, report)
    return report


def one_site(data: LocalData, name: str | None):
    """The hospital whose training split a compression step may read: ``name``, else the one with most images."""
    if name is None:
        return max(data.sites, key=lambda s: len(s.splits["train"]))
    for site in data.sites:
        if site.name == name:
            return site
    raise ValueError(f"unknown site {name!r}; the data has {[s.name for s in data.sites]}")


def calibration_records(data: LocalData, name: str | None, default_site, cache: Path | None) -> tuple[list, str]:
    """The int8 calibration images: one hospital's training split, or the public Br35H set (``"embedded"``)."""
    if name == "embedded":
        from fedbrain.data.federation import build_federation, embedded_spec

        fed = build_federation(embedded_spec(sites=1), cache_dir=cache)
        return [r for s in fed.sites.values() for r in s.splits["train"]], "the public Br35H set (embedded)"
    site = default_site if name is None else one_site(data, name)
    return site.splits["train"], f"the training split of {site.name}"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None
