"""Run folders and the non-federated modes (centralised, local-only) over the training core.

A run lands in ``workspace/<run-id>/`` (schema in ``workspace/README.md``): ``config.json``,
``metrics.jsonl``, ``checkpoints/{best,last}.pt``, ``data_summary.json``, ``splits/<site>.csv``,
``results.json`` and ``tensorboard/``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedbrain.checkpoint import save_checkpoint
from fedbrain.contract import Augmentation, Preprocessing, supervised_granularity
from fedbrain.data.dataset import BatchLoader, SliceDataset
from fedbrain.data.federation import SPLITS, Federation, SiteData
from fedbrain.models import apply_finetune, create_model, default_preprocessing, weights_source
from fedbrain.training import TrainConfig, evaluate, seed_everything, train_keep_best

UNION = "union"


def new_run_dir(workspace: str | Path, prefix: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(workspace) / f"{prefix}-{stamp}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = Path(f"{base}-{k}")
    path.mkdir(parents=True)
    return path


class MetricsLog:
    """Append-only JSONL of scalar metrics: one line per (round, site, split)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except Exception:  # tensorboard missing: JSONL stays the source of truth
                self.tb = None

    def log(self, round_: int, site: str, split: str, metrics: dict, **extra) -> None:
        row = {"round": round_, "site": site, "split": split, **extra, **flat_scalars(metrics)}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in flat_scalars(metrics).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"{site}/{split}/{k}", v, round_)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def flat_scalars(metrics: dict) -> dict:
    """The scalar metrics of :func:`fedbrain.training.compute_metrics` (drops nested tables)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class SiteLoaders:
    """Loaders of one site's splits at one preprocessing (decoded once, cached on disk)."""

    site: SiteData
    pre: Preprocessing
    cfg: TrainConfig
    augmentation: Augmentation = field(default_factory=Augmentation)
    cache_dir: Path | None = None
    _ds: dict = field(default_factory=dict)

    def dataset(self, split: str) -> SliceDataset:
        if split not in self._ds:
            self._ds[split] = SliceDataset(self.site.splits[split], self.pre, self.cache_dir)
        return self._ds[split]

    def train(self, seed: int = 0) -> BatchLoader:
        return BatchLoader(self.dataset("train"), self.cfg.batch_size, True, self.augmentation, seed)

    def eval(self, split: str) -> BatchLoader:
        return BatchLoader(self.dataset(split), max(64, self.cfg.batch_size), False)


def pooled_site(name: str, sites: list[SiteData]) -> SiteData:
    """All given sites' splits pooled into one (the centralised baseline's data)."""
    splits = {s: [r for site in sites for r in site.splits[s]] for s in SPLITS}
    return SiteData(name, "mixed", splits, {})


def evaluate_everywhere(model: torch.nn.Module, loaders: dict[str, SiteLoaders], split: str = "test") -> dict:
    """Metrics on every site's split and on their union."""
    out = {}
    for name, sl in loaders.items():
        if sl.site.splits[split]:
            out[name] = evaluate(model, sl.eval(split))
    return out


def train_pooled(
    fed: Federation,
    model_name: str,
    cfg: TrainConfig,
    run_dir: Path,
    sites: list[str] | None = None,
    image_size: int | None = None,
    pretrained: bool | None = None,
    model_kwargs: dict | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    log_every: int = 1,
    finetune: str = "all",
) -> dict:
    """Centralised (all ``sites`` pooled) or local-only (one site) training with validation-based selection.

    Evaluates the best checkpoint on every site's test split and on the union of them.
    """
    seed_everything(cfg.seed)
    names = sites or list(fed.sites)
    unknown = set(names) - set(fed.sites)
    if unknown:
        raise KeyError(f"unknown site(s) {sorted(unknown)}; this federation has {list(fed.sites)}")
    pre = default_preprocessing(model_name, image_size)
    model = create_model(model_name, pretrained=pretrained, **(model_kwargs or {}))
    tuned = apply_finetune(model, model_name, finetune)
    train_site = pooled_site("+".join(names), [fed.sites[n] for n in names])
    pool = SiteLoaders(train_site, pre, cfg, cache_dir=cache_dir)
    every = {n: SiteLoaders(s, pre, cfg, cache_dir=cache_dir) for n, s in fed.sites.items()}
    every[UNION] = SiteLoaders(pooled_site(UNION, list(fed.sites.values())), pre, cfg, cache_dir=cache_dir)
    if not train_site.splits["train"]:
        raise ValueError(f"no training images at {names}")
    granularity = supervised_granularity([fed.sites[n].scheme for n in names])
    schemes = {n: fed.sites[n].scheme for n in names}
    log = MetricsLog(run_dir / "metrics.jsonl", run_dir / "tensorboard")

    def on_epoch(epoch: int, stats: dict, val: dict, score: float) -> None:
        log.log(epoch + 1, train_site.name, "train", stats)
        if val:
            log.log(epoch + 1, train_site.name, "val", val)
        if progress:
            print(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {stats['loss']:.4f}  val {score:.4f}  "
                  f"{stats['images_per_s']:.0f} img/s", flush=True)

    t0 = time.perf_counter()
    best, best_score, history = train_keep_best(
        model, lambda epoch: pool.train(seed=cfg.seed + epoch), cfg,
        val_loader=pool.eval("val") if train_site.splits["val"] else None, on_epoch=on_epoch,
        progress="epoch" if progress else None)
    train_seconds = time.perf_counter() - t0
    ckpt_args = dict(model_name=model_name, preprocessing=pre, supervised_granularity=granularity,
                     label_schemes=schemes, model_kwargs=model_kwargs,
                     training={**cfg.to_dict(), "mode": "pooled", "sites": names, "finetune": finetune,
                               "weights": weights_source(model), "trainable_params": tuned["trainable_params"],
                               "augmentation": pool.augmentation.to_dict()})
    save_checkpoint(run_dir / "checkpoints" / "last.pt", model, **ckpt_args)
    if best is not None:
        model.load_state_dict(best)
    results = evaluate_everywhere(model, every)
    for name, m in results.items():
        log.log(cfg.epochs, name, "test", m, checkpoint="best")
    log.close()
    save_checkpoint(run_dir / "checkpoints" / "best.pt", model, metrics={"test": results, "val_score": best_score},
                    **ckpt_args)
    out = {"test": results, "history": history, "train_seconds": train_seconds, "best_val_score": best_score}
    (run_dir / "results.json").write_text(json.dumps(out, indent=2))
    return out


def write_config(run_dir: Path, **config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))


def results_table(results: dict[str, dict]) -> str:
    """Per-site test table: n, macro-F1, accuracy, tumour accuracy, tumour AUROC."""
    hdr = f"{'site':<18}{'n':>6}{'macro-F1':>10}{'accuracy':>10}{'tumour acc':>12}{'tumour AUROC':>14}"
    lines = [hdr, "-" * len(hdr)]

    def f(v):
        return f"{v:.4f}" if isinstance(v, (int, float)) else "-"

    for name, m in results.items():
        lines.append(f"{name:<18}{m.get('n', 0):>6}{f(m.get('macro_f1')):>10}{f(m.get('accuracy')):>10}"
                     f"{f(m.get('tumour_accuracy')):>12}{f(m.get('tumour_auroc')):>14}")
    return "\n".join(lines)

