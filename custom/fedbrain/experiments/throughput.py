"""Throughput benchmarks: training images/s per registry model, and the simulator's overhead."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from fedbrain.data.dataset import SiteLoaders
from fedbrain.data.federation import Federation
from fedbrain.fl.simulate import run_simulation
from fedbrain.models import (
    apply_finetune,
    count_macs,
    count_parameters,
    create_model,
    default_preprocessing,
)
from fedbrain.runs import RunDir, write_json
from fedbrain.settings import JobSettings
from fedbrain.training import TrainConfig, evaluate, make_optimizer, train_epochs


def train_throughput(names: list[str], batch_size: int = 32, steps: int = 3, image_size: int | None = None,
                     finetune: str = "all", device: str = "auto"):
    """Yield one row per model: params, MACs and training images/s on synthetic inputs (after one warm-up)."""
    for name in names:
        pre = default_preprocessing(name, image_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = create_model(name, pretrained=False)
        trainable = apply_finetune(model, name, finetune)["trainable_params"]
        x = torch.randn(batch_size, pre.channels, pre.image_size, pre.image_size)
        y = torch.randint(0, 4, (batch_size,))
        cfg = TrainConfig(batch_size=batch_size, class_weighting=False, device=device)
        train_epochs(model, [(x, y)], cfg, epochs=1)  # warm-up
        stats = train_epochs(model, [(x, y)], cfg, epochs=steps)
        yield {"model": name, "image_size": pre.image_size, "params": count_parameters(model),
               "trainable_params": trainable, "finetune": finetune, "macs": count_macs(model.cpu(), pre),
               "images_per_s": stats["images_per_s"]}


def simulator_overhead(fed: Federation, settings: JobSettings, run: RunDir, cache_dir: Path | None = None) -> dict:
    """Simulator wall time against the same local epochs trained without NVFlare (one process, site by site)."""
    summary = run_simulation(fed, settings, run, cache_dir=cache_dir)
    if summary.get("failed_sites"):
        return {"failed_sites": summary["failed_sites"]}
    pre = default_preprocessing(settings.model, settings.image_size)
    cfg = settings.train
    t0 = time.perf_counter()
    for site in fed.sites.values():  # the same work the sites did: rounds x (eval val + local epochs)
        loaders = SiteLoaders(site, pre, cfg.batch_size, cache_dir=cache_dir)
        model = create_model(settings.model, pretrained=False)
        opt = make_optimizer(model, cfg)
        for rnd in range(settings.rounds):
            if site.splits["val"]:
                evaluate(model, loaders.eval("val"))
            train_epochs(model, loaders.train(seed=rnd), cfg, optimizer=opt)
    local = time.perf_counter() - t0
    wall = summary["wall_seconds"]
    out = {"simulator_wall_s": wall, "plain_local_s": local, "ratio": wall / local, "rounds": settings.rounds,
           "local_epochs": settings.local_epochs, "sites": list(fed.sites), "model": settings.model}
    write_json(run.bench_federation_json, out)
    return out
