"""Throughput benchmarks: training images/s per registry model, and the simulator's overhead."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace
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
from fedbrain.runs import RunDir, read_metrics, write_json
from fedbrain.settings import JobSettings
from fedbrain.training import TrainConfig, derived_seed, evaluate, make_optimizer, train_epochs


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
            train_epochs(model, loaders.train(seed=derived_seed(cfg.seed, rnd, site.name)), cfg, optimizer=opt)
    local = time.perf_counter() - t0
    wall = summary["wall_seconds"]
    out = {"simulator_wall_s": wall, "plain_local_s": local, "ratio": wall / local, "rounds": settings.rounds,
           "local_epochs": settings.local_epochs, "sites": list(fed.sites), "model": settings.model}
    write_json(run.bench_federation_json, out)
    return out


def device_check(device: str = "cuda", image_sizes: tuple[int, ...] = (128, 224), steps: int = 5,
                 batch_size: int = 32, models: list[str] | None = None, log=print) -> dict:
    """The accelerator check (``fedbrain bench gpu``): what the device is, that training really runs there (every
    trainable parameter and the loss on it, mixed precision as the rule says), that checkpoints come back
    device-free, and training images/s per registry model at each input size."""
    import tempfile

    from fedbrain.checkpoint import ModelCard, save_checkpoint
    from fedbrain.models import GREY, list_models
    from fedbrain.training import autocast_dtype, predict_proba, resolve_device

    dev = resolve_device(device)
    info = {"device": str(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
            "autocast": str(autocast_dtype(dev)).replace("torch.", "") if autocast_dtype(dev) else "fp32"}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1))
    log(f"device {info['device']} ({info.get('name', 'CPU')}), torch {info['torch']}, CUDA {info['cuda']}, "
        f"mixed precision {info['autocast']}")
    # placement: train the product model two steps, predict, save
    model = create_model("fedbrain_cnn_v2")
    x, y = torch.randn(16, 1, 64, 64), torch.randint(0, 5, (16,))
    stats = train_epochs(model, [(x, y)], TrainConfig(epochs=2, device=str(dev), class_weighting=False))
    on_device = sorted({p.device.type for p in model.parameters()})
    probs, _ = predict_proba(model, [(x, y)])
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp) / "m.pt", model, ModelCard("fedbrain_cnn_v2", GREY, "multiclass"))
        saved = torch.load(path, weights_only=True)["state_dict"]
        saved_devices = sorted({v.device.type for v in saved.values()})
    placement = {"parameters_on": on_device, "loss_finite": bool(stats["loss"] == stats["loss"]),
                 "probabilities_finite": bool(probs.size and (probs == probs).all()),
                 "checkpoint_tensors_on": saved_devices}
    placement["ok"] = (on_device == [dev.type] and placement["loss_finite"] and placement["probabilities_finite"]
                       and saved_devices == ["cpu"])
    log(f"placement: parameters on {on_device}, checkpoint tensors on {saved_devices} -> "
        f"{'ok' if placement['ok'] else 'FAILED'}")
    rows = []
    for size in image_sizes:
        for row in train_throughput(models or list_models(), batch_size, steps, size, device=str(dev)):
            rows.append(row)
            log(f"  {row['model']:<22}{size:>5} px {row['images_per_s']:>10.1f} img/s")
    return {**info, "placement": placement, "throughput": rows}


def update_bytes(audit_row: dict) -> int:
    """The bytes of one update's weights, from the server's structural audit (``array:<dtype>:[shape]``)."""
    import numpy as np

    total = 0
    for kind in (audit_row.get("params") or {}).values():
        if kind.startswith("array:"):
            _, dtype, shape = kind.split(":", 2)
            total += int(np.prod(json.loads(shape) or [1])) * np.dtype(dtype).itemsize
    return total


def masking_ms(state: dict, sites: list[str], repeats: int = 5) -> float:
    """Milliseconds one site spends masking one round's update of ``state`` (median of ``repeats``; key
    agreement with every peer included once, as at a site)."""
    import statistics
    import tempfile

    from fedbrain.secagg import SiteMasker

    with tempfile.TemporaryDirectory() as tmp:
        maskers = {s: SiteMasker(s, Path(tmp) / s) for s in sites}
        keys = {s: m.announcement() for s, m in maskers.items()}
        delta = {k: v.double().numpy() * 1e-3 for k, v in state.items()}
        times = []
        for rnd in range(repeats):
            t0 = time.perf_counter()
            maskers[sites[0]].mask(delta, 1000.0, "bench", rnd, keys)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def secure_aggregation_cost(fed: Federation, settings: JobSettings, run: RunDir,
                            cache_dir: Path | None = None) -> dict:
    """The same job plain and with pairwise-masked secure aggregation: wall time, bytes each site sends per round,
    and how far apart the two global models end. The masks cancel exactly; what is left is fixed-point rounding,
    which the rounds amplify as they amplify any float rounding: a third run, plain again with one more thread
    per site (another summation order), measures that floor."""
    from fedbrain.checkpoint import global_state
    from fedbrain.fl.simulate import finished_rounds

    out: dict = {"rounds": settings.rounds, "sites": list(fed.sites), "model": settings.model,
                 "server_optimizer": settings.server_optimizer}
    models = {}
    threads = settings.threads_per_site or 1
    jobs = (("plain", False, threads), ("secure", True, threads), ("plain-threads", False, threads + 1))
    for mode, secure, t in jobs:
        child = run.child(mode)
        s = replace(settings, secure_aggregation=secure, cross_site_eval=False, threads_per_site=t)
        summary = run_simulation(fed, s, child, cache_dir=cache_dir, evaluate=False)  # the wire and the models
        if summary.get("failed_sites") or not finished_rounds(child):
            return {"failed_sites": summary.get("failed_sites") or {mode: "no global model"}}
        audit = read_metrics(child.server_audit)
        models[mode] = global_state(child.round_model(finished_rounds(child)[-1]))
        out[mode] = {"wall_s": summary["wall_seconds"],
                     "bytes_per_site_round": max(update_bytes(r) for r in audit),
                     "dtypes": sorted({k.split(":")[1] for r in audit for k in (r.get("params") or {}).values()})}

    def diff(a: str, b: str) -> float:
        return max(float((models[a][k].double() - models[b][k].double()).abs().max()) for k in models[a])

    out["mask_ms_per_site_round"] = masking_ms(models["plain"], list(fed.sites))
    # the round's wall time here includes the job's start: an upper bound, so the share is a lower bound
    out["round_wall_s"] = out["secure"]["wall_s"] / max(1, settings.rounds)
    out["mask_share_of_round"] = out["mask_ms_per_site_round"] / 1000 / out["round_wall_s"]
    out.update({"max_abs_difference": diff("plain", "secure"), "float_floor": diff("plain", "plain-threads"),
                "wall_ratio": out["secure"]["wall_s"] / out["plain"]["wall_s"],
                "bytes_ratio": out["secure"]["bytes_per_site_round"] / out["plain"]["bytes_per_site_round"]})
    write_json(run.bench_secure_aggregation_json, out)
    return out
