"""``fedbrain bench models``: every registry model, federated (NVFlare simulator) and centralised, one table.

Each model gets the same :class:`Budget` (input size, rounds x local epochs, training images per site,
fine-tuning depth); the budget is written beside every number. Per (model, mode) row: accuracy,
macro-F1, per-class precision/recall, tumour AUROC on the union of the sites' leak-free test splits;
per model: parameters, MACs, fp32 and int8 ONNX size, int8 macro-F1, and ONNX Runtime batch-1 CPU
latency at 1 and 2 threads.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fedbrain.compression.data import LocalData, sample
from fedbrain.contract import CLASSES
from fedbrain.data.federation import Federation, SiteData
from fedbrain.evaluation import UNION
from fedbrain.experiments.compare import rounds_for_budget
from fedbrain.experiments.pooled import train_pooled
from fedbrain.fl.simulate import run_simulation
from fedbrain.models import (
    apply_finetune,
    count_macs,
    create_model,
    default_preprocessing,
    weights_source,
)
from fedbrain.runs import RunDir, write_json
from fedbrain.settings import JobSettings
from fedbrain.training import TrainConfig

FORMAT = "fedbrain-bench-models/1"
MODES = ("federated", "centralized")
DEFAULT_MODELS = ("fedbrain_cnn", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                  "efficientnet_lite0", "resnet50", "vgg16")
PRODUCTS = ("fedbrain_cnn_v2", "fedbrain_cnn", "fedbrain_cnn_gn")  # fedbrain's own models; the rest are baselines
METRICS = ("accuracy", "macro_f1", "tumour_auroc", "tumour_accuracy", "macro_auroc")
PROFILE = ("params", "trainable_params", "macs", "fp32_onnx_bytes", "int8_onnx_bytes", "int8_macro_f1",
           "latency_ms_fp32_1t", "latency_ms_fp32_2t", "latency_ms_int8_1t", "latency_ms_int8_2t")
BUDGET = ("budget", "image_size", "rounds", "local_epochs", "epochs", "train_images", "max_train_per_site",
          "weights", "finetune")
FIELDS = (["model", "mode", *BUDGET, "teacher", *METRICS]
          + [f"{c}_{k}" for c in CLASSES for k in ("precision", "recall")]
          + ["n_test", *PROFILE, "train_seconds", "hardware", "command", "error", "int8_error", "profile_error"])


@dataclass
class Budget:
    """What every model gets. ``finetune`` applies to models that start from ImageNet weights; a model
    that starts from random weights always trains all layers (frozen random features learn nothing)."""

    image_size: int | None = 128  # None: each model's own default (224 for the ImageNet models)
    rounds: int = 5
    local_epochs: int = 1
    max_train_per_site: int | None = None  # cap on each site's TRAIN split; val/test stay whole
    finetune: str = "all"
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    seed: int = 0
    device: str = TrainConfig.device  # where training runs (latency is always measured on the CPU)
    distil_from: str = ""  # a teacher model file: fedbrain's own models learn from it (baselines never do)

    def train_config(self, epochs: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed, device=self.device)

    @property
    def epochs(self) -> int:
        """Centralised epochs = federated rounds x local epochs (each picture seen equally often)."""
        return self.rounds * self.local_epochs

    def label(self, model: str | None = None) -> str:
        size = self.image_size or (default_preprocessing(model).image_size if model else "default")
        parts = [f"{size}px", f"{self.rounds}x{self.local_epochs} ep"]
        if self.max_train_per_site:
            parts.append(f"<={self.max_train_per_site} train/site")
        if self.lr != Budget.lr or self.batch_size != Budget.batch_size:
            parts.append(f"lr {self.lr:g}, batch {self.batch_size}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def hardware(device: str = "cpu") -> str:
    """'<cpu model>, <n> cores, CPU' (the numbers' hardware, written into every row), and the GPU that trained."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = f"{name}, {os.cpu_count()} cores, CPU"
    from fedbrain.training import resolve_device

    try:
        dev = resolve_device(device)
    except ValueError:  # a device this machine does not have: it did not train here
        return out
    if dev.type == "cuda":
        import torch

        out += f"; trained on {torch.cuda.get_device_name(dev)}"
    return out


def cap_train(fed: Federation, n: int | None, seed: int = 0) -> Federation:
    """The federation with each site's train split cut to ``n`` seeded-random images (val/test untouched)."""
    if not n:
        return fed
    sites = {name: SiteData(s.name, s.scheme, {**s.splits, "train": sample(s.splits["train"], n, seed)}, s.summary)
             for name, s in fed.sites.items()}
    return replace(fed, sites=sites)


def _metric_cells(m: dict) -> dict:
    out = {k: m.get(k) for k in METRICS}
    out["n_test"] = m.get("n")
    for c in CLASSES:
        pc = (m.get("per_class") or {}).get(c, {})
        out[f"{c}_precision"], out[f"{c}_recall"] = pc.get("precision"), pc.get("recall")
    return out


def profile_model(checkpoint: Path, out_dir: Path, train_records: list, test_records: list,
                  cache_dir: Path | None, int8: bool = True, repeats: int = 50, max_seconds: float = 15.0,
                  threads: tuple[int, ...] = (1, 2)) -> dict:
    """ONNX fp32 (and int8) export of a trained checkpoint, their sizes, int8 test macro-F1 and
    batch-1 ONNX Runtime latency (median ms) at each thread count."""
    from fedbrain.checkpoint import load_checkpoint
    from fedbrain.compression import report as rep
    from fedbrain.compression.data import arrays, normalise
    from fedbrain.compression.latency import timed
    from fedbrain.compression.onnx_export import export_onnx
    from fedbrain.compression.quantize import quantize_int8
    from fedbrain.predict import load_predictor

    model, card = load_checkpoint(checkpoint)
    card = card.replace(source_checkpoint=str(checkpoint))
    pre = card.preprocessing
    out: dict = {}
    fp32 = export_onnx(model, card.replace(variant="fp32"), out_dir / "fp32.onnx")
    out["fp32_onnx_bytes"] = os.path.getsize(fp32)
    files = {"fp32": fp32}
    if int8:
        try:
            calib = normalise(arrays(sample(train_records, 64), pre, cache_dir)[0], pre)
            files["int8"] = quantize_int8(fp32, out_dir / "int8.onnx", calib, card.to_onnx_metadata("int8"))
            out["int8_onnx_bytes"] = os.path.getsize(files["int8"])
            imgs, targets = arrays(test_records, pre, cache_dir)
            metrics, _ = rep.evaluate_predictor(load_predictor(files["int8"]), imgs, targets)
            out["int8_macro_f1"] = metrics.get("macro_f1")
        except Exception as exc:  # the compression pipeline does not support every graph
            out["int8_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    imgs, _ = arrays(test_records[:8], pre, cache_dir)
    inputs = [normalise(imgs[i:i + 1], pre) for i in range(len(imgs))]
    for th in threads:
        for variant, path in files.items():
            fn = load_predictor(path, threads=th).logits
            out[f"latency_ms_{variant}_{th}t"] = timed(fn, inputs, warmup=5, repeats=repeats,
                                                       max_seconds=max_seconds)["p50"]
    return out


def bench_one(fed: Federation, name: str, budget: Budget, run: RunDir, modes: tuple[str, ...] = MODES,
              cache_dir: Path | None = None, int8: bool = True, latency_repeats: int = 50,
              progress: bool = True) -> list[dict]:
    """One model: its profile, then one row per mode (errors land in the row, never stop the others)."""
    mdir = run.child(name)
    mdir.root.mkdir(parents=True, exist_ok=True)
    pre = default_preprocessing(name, budget.image_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = create_model(name)  # the registry's default: ImageNet weights for baselines where available
    for w in caught:
        if "RANDOM" in str(w.message) and progress:
            print(f"   {name}: {w.message}", flush=True)
    weights = weights_source(model)
    finetune = budget.finetune if weights != "random" else "all"
    tuned = apply_finetune(model, name, finetune)
    base = {"model": name, "budget": budget.label(name), "image_size": pre.image_size, "rounds": budget.rounds,
            "local_epochs": budget.local_epochs, "epochs": budget.epochs,
            "train_images": sum(len(s.splits["train"]) for s in fed.sites.values()),
            "max_train_per_site": budget.max_train_per_site, "weights": weights, "finetune": finetune,
            "params": tuned["params"], "trainable_params": tuned["trainable_params"],
            "macs": count_macs(model, pre), "hardware": hardware(budget.device)}
    teacher = budget.distil_from if name in PRODUCTS else ""
    base["teacher"] = ""
    if teacher:
        from fedbrain.checkpoint import read_card

        base["teacher"] = teacher_label(read_card(teacher))
    rows, best_ckpt = [], None
    for mode in modes:
        if progress:
            print(f"\n== {name} / {mode}: {base['budget']}, weights {weights}, fine-tune {finetune} "
                  f"({tuned['trainable_params']:,} of {tuned['params']:,} params train)", flush=True)
        t0 = time.perf_counter()
        row = {**base, "mode": mode}
        try:
            mode_run = mdir.child(mode)
            if mode == "federated":
                # the default federation at the same budget in epochs; the server takes the budget's lr
                settings = JobSettings.create(
                    "fedavg", train={"batch_size": budget.batch_size, "seed": budget.seed, "device": budget.device},
                    model=name, image_size=budget.image_size, cross_site_eval=False, finetune=finetune,
                    server_lr=budget.lr, distil_from=teacher)  # ImageNet start if any
                settings.rounds = rounds_for_budget(settings, fed, budget.epochs)
                row["rounds"] = settings.rounds
                summary = run_simulation(fed, settings, mode_run, cache_dir=cache_dir)
                if summary.get("failed_sites") or "test" not in summary:
                    raise RuntimeError(str(summary.get("failed_sites") or summary.get("error"))[:400])
                test = summary["test"]
            else:
                cfg = budget.train_config(budget.epochs)
                fed.write(mode_run.root)
                mode_run.write_config(kind="centralized", model=name, train=cfg.to_dict(),
                                      federation=fed.spec.to_dict(), image_size=budget.image_size,
                                      finetune=finetune, weights=weights)
                test = train_pooled(fed, name, cfg, mode_run, image_size=budget.image_size, pretrained=None,
                                    finetune=finetune, cache_dir=cache_dir, progress=progress,
                                    teacher=teacher or None)["test"]
            row.update(_metric_cells(test[UNION]))
            best_ckpt = best_ckpt or mode_run.best
        except Exception as exc:  # one failing model or mode must not cost the rest of the table
            row["error"] = f"{type(exc).__name__}: {exc}"
            if progress:
                print(f"   {name} / {mode} FAILED: {row['error']}", flush=True)
        row["train_seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
    if best_ckpt is not None:
        if progress:
            print(f"   {name}: ONNX export, int8 and CPU latency", flush=True)
        local = LocalData(list(fed.sites.values()), str(run))
        try:
            prof = profile_model(best_ckpt, mdir.root / "onnx", local.records("train"), local.records("test"),
                                 cache_dir, int8=int8, repeats=latency_repeats)
        except Exception as exc:
            prof = {"profile_error": f"{type(exc).__name__}: {exc}"}
        prof["profiled_checkpoint"] = str(best_ckpt)
        for row in rows:
            row.update(prof)
    return rows


def teacher_label(card) -> str:
    """How a row names its teacher: the teacher's model and how it was trained."""
    mode = (card.training or {}).get("mode", "")
    return f"{card.model} ({'federated' if mode == 'federated' else 'centralized' if mode else 'file'})"


def run_rows(run: RunDir, fed: Federation, cache_dir: Path | None = None, latency_repeats: int = 50,
             progress: bool = True) -> list[dict]:
    """A row for a finished ``fedbrain simulate`` or ``fedbrain train`` run (e.g. a teacher trained earlier, or
    on a GPU): its union test metrics and budget from its own files, profiled like the table's own rows."""
    from fedbrain.checkpoint import read_card
    from fedbrain.experiments.compare import budget_epochs

    config = run.read_config()
    results = json.loads(run.results.read_text())
    card = read_card(run.best)
    if config.get("kind") == "federated":
        settings = JobSettings.from_dict(config["job"])
        mode, epochs, rounds = "federated", budget_epochs(settings, fed), settings.rounds
        train = settings.train
    elif config.get("kind") == "centralized":
        train = TrainConfig.from_dict(config["train"])
        mode, epochs, rounds = "centralized", train.epochs, train.epochs
    else:
        raise ValueError(f"{run.root}: not a federated or centralised run (kind {config.get('kind')!r})")
    budget = Budget(image_size=card.preprocessing.image_size, rounds=epochs, local_epochs=1,
                    batch_size=train.batch_size, lr=train.lr if mode == "centralized" else settings.server_lr)
    model = card.build_model()
    teacher = (card.training or {}).get("distil_from")
    row = {"model": card.model, "mode": mode, "budget": budget.label(card.model), "image_size": budget.image_size,
           "rounds": rounds, "local_epochs": 1, "epochs": epochs,
           "train_images": sum(len(s.splits["train"]) for s in fed.sites.values()), "max_train_per_site": None,
           "weights": _weights_of(card), "finetune": (card.training or {}).get("finetune", "all"),
           "params": sum(p.numel() for p in model.parameters()),
           "trainable_params": None, "macs": count_macs(model, card.preprocessing),
           "hardware": hardware(), "teacher": teacher_label(read_card(teacher)) if teacher and
           Path(teacher).is_file() else ("yes" if teacher else ""),
           "train_seconds": None, "source_run": run.root.name, **_metric_cells(results["test"][UNION])}
    if progress:
        print(f"   {card.model} / {mode} from {run.root.name}: ONNX export, int8 and CPU latency", flush=True)
    local = LocalData(list(fed.sites.values()), str(run))
    try:
        prof = profile_model(run.best, run.root / "onnx", local.records("train"), local.records("test"), cache_dir,
                             repeats=latency_repeats)
    except Exception as exc:
        prof = {"profile_error": f"{type(exc).__name__}: {exc}"}
    prof["profiled_checkpoint"] = str(run.best)
    return [{**row, **prof}]


def _weights_of(card) -> str:
    """Where a run's model started: what its card recorded, else the registry default unless it said no."""
    from fedbrain.models import model_info

    training = card.training or {}
    if training.get("weights"):
        return training["weights"]
    pretrained = training.get("pretrained")
    return "imagenet" if (model_info(card.model).pretrained_default if pretrained is None else pretrained) \
        else "random"


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows with the same (model, mode, budget, fine-tuning, teacher) replaced in place by ``new`` ones;
    other new rows are appended."""
    key = lambda r: (r.get("model"), r.get("mode"), r.get("budget"), r.get("finetune"),  # noqa: E731
                     r.get("teacher") or "")
    fresh = {key(r): r for r in new}
    merged = [fresh.pop(key(r), r) for r in old]
    return merged + [r for r in new if key(r) in fresh]


def write_table(path: Path, rows: list[dict], meta: dict) -> tuple[Path, Path]:
    """``path`` (JSON: rows + meta + goal) and the same rows as CSV beside it."""
    path = Path(path)
    commands = list(dict.fromkeys(r["command"] for r in rows if r.get("command")))
    write_json(path, {"format": FORMAT, **meta, "commands": commands, "rows": rows, "goal": goal(rows)})
    csv_path = path.with_suffix(".csv")
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(FIELDS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path, csv_path


def read_table(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    doc = json.loads(p.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{p} is not a `fedbrain bench models` table (format {FORMAT})")
    return doc["rows"]


def _ratio(a, b) -> float | None:
    return round(a / b, 1) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None


def goal(rows: list[dict]) -> list[dict]:
    """Per (mode, budget): fedbrain's best own model (a distilled one counts) against the best baseline by
    macro-F1. Goal (issue 12): within 2 pp, >= 10x fewer parameters, and >= 10x lower 1-thread latency both
    fp32 against fp32 and int8 against int8; its int8 >= 2x faster than its fp32."""
    out = []
    for mode, budget in dict.fromkeys((r["mode"], r["budget"]) for r in rows):
        same = [r for r in rows if r["mode"] == mode and r["budget"] == budget and r.get("macro_f1") is not None]
        own = [r for r in same if r["model"] in PRODUCTS]
        others = [r for r in same if r["model"] not in PRODUCTS]
        if not own or not others:
            continue
        ours = max(own, key=lambda r: r["macro_f1"])
        best = max(others, key=lambda r: r["macro_f1"])
        gap = ours["macro_f1"] - best["macro_f1"]
        params_x = best["params"] / ours["params"]
        fp32_x = _ratio(best.get("latency_ms_fp32_1t"), ours.get("latency_ms_fp32_1t"))
        int8_x = _ratio(best.get("latency_ms_int8_1t"), ours.get("latency_ms_int8_1t"))
        int8_gain = _ratio(ours.get("latency_ms_fp32_1t"), ours.get("latency_ms_int8_1t"))
        out.append({"mode": mode, "budget": budget, "ours": ours["model"], "teacher": ours.get("teacher") or "",
                    "best_baseline": best["model"], "macro_f1_gap_pp": round(100 * gap, 2),
                    "params_ratio": round(params_x, 1), "latency_ratio_1t": fp32_x, "int8_latency_ratio_1t": int8_x,
                    "int8_speedup_1t": int8_gain,
                    "met": bool(gap >= -0.02 and params_x >= 10 and (fp32_x or 0) >= 10 and (int8_x or 0) >= 10
                                and (int8_gain or 0) >= 2)})
    return out


def _f(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and v == v else "-"


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The comparison table (one line per model and mode), with each row's budget."""
    cols = [("model", "model", "s"), ("mode", "mode", "s"), ("budget", "budget", "s"),
            ("weights", "init", "s"), ("finetune", "fine-tune", "s"), ("teacher", "distilled from", "s"),
            ("accuracy", "acc", ".3f"),
            ("macro_f1", "macro-F1", ".3f"), ("tumour_auroc", "tumour AUROC", ".3f"),
            ("params", "params (M)", "p"), ("macs", "GMACs", "g"), ("fp32_onnx_bytes", "fp32 MB", "mb"),
            ("int8_onnx_bytes", "int8 MB", "mb"), ("latency_ms_fp32_1t", "ms 1t", ".2f"),
            ("latency_ms_fp32_2t", "ms 2t", ".2f"), ("latency_ms_int8_1t", "int8 ms 1t", ".2f"),
            ("train_seconds", "train s", ".0f")]

    def cell(r: dict, key: str, fmt: str) -> str:
        v = r.get(key)
        if key == "macro_f1" and r.get("error"):
            return "FAILED"
        if fmt == "p":
            return _f(v / 1e6 if isinstance(v, (int, float)) else None, ".3f")
        if fmt == "g":
            return _f(v / 1e9 if isinstance(v, (int, float)) else None, ".3f")
        if fmt == "mb":
            return _f(v / 1e6 if isinstance(v, (int, float)) else None, ".2f")
        if fmt == "s":
            return str(v) if v else "-"
        return _f(v, fmt)

    grid = [[cell(r, k, f) for k, _, f in cols] for r in rows]
    head = [h for _, h, _ in cols]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(g) + " |" for g in grid]
        return "\n".join(lines)
    widths = [max(len(h), *(len(g[i]) for g in grid)) if grid else len(h) for i, h in enumerate(head)]
    fmt_line = lambda cells: "  ".join(c.rjust(w) if i > 5 else c.ljust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([fmt_line(head), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [fmt_line(g) for g in grid])


def format_goal(g: list[dict]) -> str:
    lines = []
    for x in g:
        lat = f"{x['latency_ratio_1t']}x" if x.get("latency_ratio_1t") else "n/a"
        int8 = f"{x['int8_latency_ratio_1t']}x" if x.get("int8_latency_ratio_1t") else "n/a"
        gain = f"{x['int8_speedup_1t']}x" if x.get("int8_speedup_1t") else "n/a"
        ours = x.get("ours", "fedbrain_cnn") + (f" (distilled from {x['teacher']})" if x.get("teacher") else "")
        lines.append(f"goal ({x['mode']}, {x['budget']}): {ours} vs best baseline {x['best_baseline']}: "
                     f"macro-F1 {x['macro_f1_gap_pp']:+.2f} pp, {x['params_ratio']}x fewer params, "
                     f"{lat} lower 1-thread latency (fp32; int8 {int8}), its int8 {gain} faster than its fp32 "
                     f"-> {'MET' if x['met'] else 'NOT met'}")
    return "\n".join(lines)


def run_bench(fed: Federation, models: list[str], budget: Budget, run: RunDir, outs: tuple[Path, ...] = (),
              modes: tuple[str, ...] = MODES, cache_dir: Path | None = None, int8: bool = True,
              latency_repeats: int = 50, command: str = "", progress: bool = True,
              include_runs: tuple[RunDir, ...] = ()) -> list[dict]:
    """All ``models`` under one budget; rows saved after every model into the run's ``bench_models.json``
    and merged into each of ``outs`` (rows of the same model, mode and budget are replaced)."""
    fed = cap_train(fed, budget.max_train_per_site, budget.seed)
    fed.write(run.root)
    meta = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "federation": fed.spec.to_dict(), "sites": list(fed.sites), "evaluated_on": "union of the sites' test "
            "splits (leak-free: duplicate clusters never cross splits)", "hardware": hardware()}
    run.write_config(kind="bench-models", models=models, modes=list(modes), budget=budget.to_dict(),
                     command=command, **meta)
    rows: list[dict] = []
    jobs = [("run", r) for r in include_runs] + [("model", name) for name in models]
    for kind, what in jobs:
        if kind == "run":
            rows += [{**r, "command": command} for r in run_rows(what, fed, cache_dir, latency_repeats, progress)]
        else:
            rows += [{**r, "command": command}
                     for r in bench_one(fed, what, budget, run, modes, cache_dir, int8, latency_repeats, progress)]
        write_table(run.bench_models_json, rows, meta)
        for out in outs:
            write_table(out, merge_rows(_safe_read(out), rows), meta)
    return rows


def retime(run: RunDir, outs: tuple[Path, ...] = (), latency_repeats: int = 50, cache_dir: Path | None = None,
           progress: bool = True) -> list[dict]:
    """Measure size and latency again for every model of a finished benchmark run (e.g. on a quiet machine,
    or on the deployment hardware); its accuracy columns are kept."""
    doc = json.loads(run.bench_models_json.read_text())
    rows = doc["rows"]
    local = LocalData.of_run(run, str(run))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        ckpt = next((r.get("profiled_checkpoint") for r in mine if r.get("profiled_checkpoint")), None)
        if not ckpt or not Path(ckpt).is_file():
            continue
        if progress:
            print(f"   {name}: timing {ckpt}", flush=True)
        prof = profile_model(Path(ckpt), run.child(name).root / "onnx", local.records("train"), local.records("test"),
                             cache_dir, int8=True, repeats=latency_repeats)
        for r in mine:
            r.update(prof, hardware=hardware())
    meta = {k: v for k, v in doc.items() if k not in ("rows", "goal", "format", "commands")}
    meta["retimed"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_table(run.bench_models_json, rows, meta)
    for out in outs:
        write_table(out, merge_rows(_safe_read(out), rows), meta)
    return rows


def _safe_read(path: Path) -> list[dict]:
    try:
        return read_table(path)
    except (ValueError, json.JSONDecodeError, KeyError):
        return []


__all__ = ["Budget", "run_bench", "bench_one", "format_table", "format_goal", "goal", "read_table", "merge_rows"]
