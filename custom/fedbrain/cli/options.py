"""Options shared by several commands, and how they turn into fedbrain objects (written once)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedbrain.runs import DEFAULT_WORKSPACE


class UsageError(Exception):
    """A user-fixable problem: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``fedbrain simulate: error: argument --rounds: ...``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


# ---------------------------------------------------------------- numeric flag types (checked by the parser)


def int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, not {value}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def float_in(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """A float in [lo, hi] (``lo_open`` / ``hi_open``: excluding that end); finite."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
        low_bad = value <= lo if lo_open else value < lo
        high_bad = hi is not None and (value >= hi if hi_open else value > hi)
        if not math.isfinite(value) or low_bad or high_bad:
            rng = ("> " if lo_open else ">= ") + f"{lo:g}" + (
                f" and {'<' if hi_open else '<='} {hi:g}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"must be {rng}, not {text}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE_INT = int_at_least(1)
NON_NEGATIVE_INT = int_at_least(0)
POSITIVE = float_in(0.0, lo_open=True)
NON_NEGATIVE = float_in(0.0)
MOMENTUM = float_in(0.0, 1.0, hi_open=True)


def PORT(text: str) -> int:  # noqa: N802 (a type, like int)
    value = int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), not {value}")
    return value


def DEVICE(text: str) -> str:  # noqa: N802 (a type, like int)
    """A ``--device`` value that exists on this machine (fedbrain.training.resolve_device: the one rule)."""
    from fedbrain.training import resolve_device

    try:
        resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_device_arg(g) -> None:
    from fedbrain.training import DEVICE_HELP, TrainConfig

    g.add_argument("--device", type=DEVICE, default=None, help=f"{DEVICE_HELP} (default {TrainConfig.device}); "
                   "on CUDA: mixed precision (bf16, else fp16) and channels-last")


# ---------------------------------------------------------------- data


def add_federation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (default: the embedded Br35H set as simulated hospitals)")
    g.add_argument("--data-root", help="benchmark federation: folder holding figshare_cheng/, sartaj/, navoneel/")
    g.add_argument("--site-config", help="TOML file declaring the hospitals (see jobs/sites.example.toml)")
    g.add_argument("--num-sites", type=POSITIVE_INT, default=3,
                   help="simulated hospitals for the embedded set (default 3)")
    g.add_argument("--sites", help="comma-separated subset of the declared hospitals to use")
    g.add_argument("--alpha", type=POSITIVE, default=1.0,
                   help="Dirichlet label-skew of the simulated hospitals; smaller = more skew (default 1.0)")
    g.add_argument("--max-images-per-site", type=POSITIVE_INT, default=None, help="subsample each site (quick runs)")
    g.add_argument("--seed", type=int, default=0)
    add_cache_arg(g)
    g.add_argument("--exclude-twins-of", metavar="RUN", default=None,
                   help="leave out every image that is a near-duplicate of any image RUN recorded (its splits): "
                        "e.g. pretrain on the public Br35H set without the benchmark hospitals' scans")


def data_given(args: argparse.Namespace) -> bool:
    """Did the user name a federation (rather than relying on a run's recorded splits)?"""
    return bool(getattr(args, "data_root", None) or getattr(args, "site_config", None)
                or getattr(args, "embedded", False))


def federation_spec(args: argparse.Namespace):
    from fedbrain.data.federation import benchmark_spec, embedded_spec, load_site_config

    extra = {"max_images_per_site": args.max_images_per_site}
    if args.site_config:
        spec = load_site_config(args.site_config, args.data_root)
        spec.seed = args.seed
        if args.max_images_per_site:
            spec.max_images_per_site = args.max_images_per_site
    elif args.data_root:
        spec = benchmark_spec(args.data_root, seed=args.seed, **extra)
    else:
        spec = embedded_spec(sites=args.num_sites, alpha=args.alpha, seed=args.seed, **extra)
    if getattr(args, "sites", None):
        wanted = [s.strip() for s in args.sites.split(",") if s.strip()]
        if spec.partition:
            raise UsageError("--sites selects declared hospitals; the embedded set takes --num-sites instead")
        unknown = set(wanted) - {s.name for s in spec.sites}
        if unknown:
            raise UsageError(f"unknown --sites {sorted(unknown)}; declared: {[s.name for s in spec.sites]}")
        spec.sites = [s for s in spec.sites if s.name in wanted]
    return spec


def add_cache_arg(p) -> None:
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default ~/.cache/fedbrain)")


def cache_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.cache_dir) if getattr(args, "cache_dir", None) else None


def load_federation(args: argparse.Namespace, progress: bool = True):
    from fedbrain.data.federation import build_federation

    fed = build_federation(federation_spec(args), cache_dir=cache_dir(args), progress=progress)
    if getattr(args, "exclude_twins_of", None):
        exclude_twins(fed, args.exclude_twins_of, cache_dir(args))
    return fed


def exclude_twins(fed, run_path: str, cache: Path | None = None) -> None:
    """Drop, in place, every image of ``fed`` that is a near-duplicate of an image of the run's splits; the data
    summary says how many left each site and split."""
    from fedbrain.data.federation import Federation
    from fedbrain.data.readers import DataLayoutError
    from fedbrain.external import training_twins
    from fedbrain.runs import RunDir

    try:
        other = Federation.read(RunDir(run_path))
    except DataLayoutError as exc:
        raise UsageError(f"--exclude-twins-of {run_path!r}: {exc}") from exc
    theirs = [r for site in other.sites.values() for split in site.splits.values() for r in split]
    dropped: dict[str, dict[str, int]] = {}
    for name, site in fed.sites.items():
        for split, records in site.splits.items():
            twin = training_twins(records, theirs, cache)
            site.splits[split] = [r for r, t in zip(records, twin, strict=True) if not t]
            dropped.setdefault(name, {})[split] = int(twin.sum())
    fed.summary["excluded_twins"] = {"of": RunDir(run_path).name, "dropped": dropped}
    print(f"left out near-duplicates of {RunDir(run_path).name}'s images: "
          + ", ".join(f"{n} {sum(d.values())}" for n, d in dropped.items()), flush=True)


def add_workspace_arg(p) -> None:
    p.add_argument("--workspace", default=str(DEFAULT_WORKSPACE), help="where runs are written (default %(default)s)")


# ---------------------------------------------------------------- models and training


def add_model_args(g, what: str = "ImageNet weights for baselines") -> None:
    from fedbrain.models import FINETUNE_HELP, list_models
    from fedbrain.settings import FEDERATED_MODEL

    g.add_argument("--model", default=FEDERATED_MODEL, choices=list_models(), help="default %(default)s")
    g.add_argument("--image-size", type=int_at_least(32), default=None, help="input size (default: the model's)")
    g.add_argument("--pretrained", choices=["auto", "yes", "no"], default="auto",
                   help=f"{what} (auto: the model's default)")
    g.add_argument("--model-kwargs", type=json_object, default=None, metavar="JSON",
                   help="architecture arguments of the registry model, saved in its card, e.g. "
                        "'{\"stem\": 4, \"depths\": [1, 2, 2]}' for fedbrain_cnn_v2")
    add_finetune_arg(g, FINETUNE_HELP)


def json_object(text: str) -> dict:
    """A ``--model-kwargs`` value: a JSON object."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, not {text!r}")
    return value


def model_kwargs(args: argparse.Namespace) -> dict:
    """``--model-kwargs``, checked by building the model once (a bad argument is one line, before any run)."""
    kwargs = getattr(args, "model_kwargs", None) or {}
    if kwargs:
        from fedbrain.models import architecture, create_model

        known = set(architecture(args.model))
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UsageError(f"--model-kwargs: {args.model} takes {sorted(known) or 'no arguments'}, not {unknown}")
        try:
            create_model(args.model, pretrained=False, **kwargs)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--model-kwargs {kwargs} do not build {args.model}: {exc}") from exc
    return kwargs


def add_finetune_arg(g, help_text: str | None = None) -> None:
    from fedbrain.models import FINETUNE_HELP

    g.add_argument("--finetune", default="all", help=(help_text or FINETUNE_HELP) + " (default all)")


def add_optimizer_args(g, epochs_flag: str | None = "--epochs", epochs_default: int | None = None,
                       local: bool = False) -> None:
    """Training options; defaults are None and come from TrainConfig / the algorithm table when unset."""
    from fedbrain.contract import AUGMENTATIONS
    from fedbrain.training import TrainConfig

    if epochs_flag:
        g.add_argument(epochs_flag, dest="epochs", type=POSITIVE_INT, default=epochs_default,
                       help=f"default {epochs_default if epochs_default is not None else TrainConfig.epochs}")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=None, help=f"default {TrainConfig.batch_size}")
    g.add_argument("--lr", type=POSITIVE, default=None,
                   help=f"learning rate (default {TrainConfig.lr:g} for AdamW; each algorithm's own default: "
                        "see fedbrain.settings.ALGORITHM_DEFAULTS)")
    g.add_argument("--weight-decay", type=NON_NEGATIVE, default=None, help=f"default {TrainConfig.weight_decay:g}")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default=None,
                   help=f"local optimiser (default {TrainConfig.optimizer}, SCAFFOLD: sgd)")
    g.add_argument("--momentum", type=MOMENTUM, default=None, help=f"SGD momentum (default {TrainConfig.momentum})")
    add_device_arg(g)
    g.add_argument("--augmentation", choices=sorted(AUGMENTATIONS), default=None,
                   help=f"train-only augmentation policy (default {TrainConfig.augmentation}; 'standard' is the "
                        "policy before the robustness measurements, 'robust' also widens the scale range)")
    if local:
        g.add_argument("--local-steps", dest="steps", type=POSITIVE_INT, default=None,
                       help="local work per round as optimiser steps, the same at every site (instead of "
                            "--local-epochs)")



def train_overrides(args: argparse.Namespace) -> dict:
    """The training settings the user gave explicitly (None = keep the default)."""
    keys = ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "momentum", "device", "steps", "augmentation")
    out = {k: getattr(args, k, None) for k in keys}
    out["seed"] = getattr(args, "seed", None)
    out["threads"] = getattr(args, "threads", None)
    return {k: v for k, v in out.items() if v is not None}


def train_config(args: argparse.Namespace):
    from fedbrain.training import TrainConfig

    return TrainConfig(**train_overrides(args))


def check_finetune(spec: str) -> None:
    from fedbrain.models import parse_finetune

    try:
        parse_finetune(spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def pretrained_flag(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[args.pretrained]


# ---------------------------------------------------------------- federated jobs


def add_job_args(p: argparse.ArgumentParser, rounds: int | None = None) -> None:
    from fedbrain.settings import ALGORITHMS, BUDGET_EPOCHS, LEVER_CHOICES, JobSettings

    g = p.add_argument_group("federated job")
    g.add_argument("--algorithm", choices=ALGORITHMS, default="fedavg")
    add_model_args(g, "start the federation from ImageNet weights")
    g.add_argument("--rounds", type=POSITIVE_INT, default=rounds,
                   help="federated rounds (default: " + (str(rounds) if rounds else "as many as --budget-epochs "
                        "needs on this federation") + ")")
    g.add_argument("--budget-epochs", type=POSITIVE, default=BUDGET_EPOCHS,
                   help="without --rounds: the training budget in passes over the federation's training data "
                        "(default %(default)s)")
    add_optimizer_args(g, "--local-epochs", 1, local=True)
    g.add_argument("--fedprox-mu", type=NON_NEGATIVE, default=JobSettings.fedprox_mu)
    levers = p.add_argument_group("levers against label skew (defaults: fedbrain.settings.JobSettings)")
    levers.add_argument("--batch-split", choices=["site", "proportional"], default=None,
                        help="proportional: the --batch-size images of a round are split across sites in proportion "
                             "to their training-set sizes (the round's average is a pooled-data gradient)")
    levers.add_argument("--legacy", action="store_true",
                        help="the federation as fedbrain ran it before these levers (1 local epoch, steps-weighted, "
                             "batch BatchNorm, site class weights); explicit flags still apply on top")
    levers.add_argument("--class-balance", choices=["site", "federation"], default=None,
                        help="class weights from each site's own label counts, or the federation's pooled counts "
                             "(sites send their counts; the server sends back the sum)")
    levers.add_argument("--missing-classes", choices=["keep", "restrict"], default=None,
                        help="restrict: a site's softmax covers only the classes its labels can show")
    levers.add_argument("--reset-optimizer", action=argparse.BooleanOptionalAction, default=None,
                        help="restart the local optimiser every round")
    levers.add_argument("--bn-statistics", choices=["batch", "pooled", "frozen", "renorm"], default=None,
                        help="BatchNorm across sites: batch statistics; the pooled statistics re-estimated every "
                             "round; frozen (FixBN: pooled once, at --bn-freeze-round, then fixed); or renorm "
                             "(batch renormalisation by the server's running pooled statistics)")
    levers.add_argument("--bn-freeze-round", type=NON_NEGATIVE_INT, default=None,
                        help="with --bn-statistics frozen: the round the statistics are pooled (default: 1/4 in)")
    levers.add_argument("--server-optimizer", choices=LEVER_CHOICES["server_optimizer"], default=None,
                        help="how the server applies the averaged update: sgd (FedAvg / FedAvgM), adam (FedAdam) or "
                             "adamw (centralised's AdamW and lr schedule over the rounds; the default)")
    levers.add_argument("--server-lr", type=POSITIVE, default=None, help="server step on the averaged update")
    levers.add_argument("--server-momentum", type=MOMENTUM, default=None, help="FedAvgM server momentum")
    add_distillation_args(p)
    g.add_argument("--min-clients", type=POSITIVE_INT, default=None,
                   help="sites that must answer each round (default all)")
    g.add_argument("--site-weighting", choices=["steps", "samples", "equal"], default=None,
                   help="the average (and SCAFFOLD's control update) weighted by each site's local steps, its "
                        "training images, or "
                        f"equally (default {JobSettings.site_weighting})")
    add_dp_sgd_args(p)
    g.add_argument("--dp-clip", type=NON_NEGATIVE, default=0.0,
                   help="client-level DP (needs hundreds of sites; see --dp-epsilon): L2 clip of each whole update")
    g.add_argument("--dp-noise", type=NON_NEGATIVE, default=0.0, help="client-level DP: noise multiplier")
    g.add_argument("--no-cross-site-eval", action="store_true")
    g.add_argument("--secure-aggregation", action="store_true",
                   help="pairwise-masked secure aggregation: each site masks its weighted update with secrets it "
                        "shares with the other sites, so the server sees only the sum (needs every site every round "
                        "and --no-cross-site-eval; keys come with the sites' kits)")
    g.add_argument("--tracking", choices=["mlflow"], default=None,
                   help="also stream every site's round metrics to MLflow through NVFlare's experiment tracking "
                        "(pip install 'fedbrain[mlflow]'); JSONL and TensorBoard are always written")
    g.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: a SQLite store, <run>/mlflow.db, or the server's job folder "
                        "when deployed)")
    g.add_argument("--resume", metavar="RUN", help="an interrupted run folder: finish it in place from its last "
                   "finished round; a finished run (or a checkpoint): start a new run from its last global model, "
                   "numbering rounds after it")
    g.add_argument("--threads-per-site", type=POSITIVE_INT, default=None)
    add_workspace_arg(g)


def add_dp_sgd_args(p: argparse.ArgumentParser) -> None:
    from fedbrain.dp import DPSGDConfig

    g = p.add_argument_group("record-level differential privacy (DP-SGD at each site; a site's own policy, "
                             "local/fedbrain_privacy.json, may impose a stricter budget)")
    g.add_argument("--dp-epsilon", type=epsilon_budget, default=0.0,
                   help="the (ε, δ) budget of the whole job at each site, per training image (0: off; inf: the same "
                        "schedule without clipping or noise, DP's reference). The noise is set so the planned rounds "
                        "spend it; a site whose budget is spent stops training")
    g.add_argument("--dp-delta", type=float_in(0.0, 1.0, lo_open=True, hi_open=True), default=DPSGDConfig.delta,
                   help="δ (default %(default)s)")
    g.add_argument("--dp-max-grad-norm", type=POSITIVE, default=DPSGDConfig.max_grad_norm,
                   help="each image's gradient is clipped to this L2 norm (default %(default)s)")
    g.add_argument("--dp-sample-rate", type=float_in(0.0, 1.0, lo_open=True), default=DPSGDConfig.sample_rate,
                   help="the chance that an image is in a step's batch (Poisson sampling; default %(default)s). "
                        "With --budget-epochs, the rounds are the epochs divided by it")


def epsilon_budget(text: str) -> float:
    """A DP budget: a number ≥ 0, or inf."""
    if text.strip().lower() in ("inf", "infinity"):
        return float("inf")
    return NON_NEGATIVE(text)


def dp_sgd_settings(args: argparse.Namespace) -> dict:
    """The JobSettings fields of the DP-SGD flags (the sampling and clipping also shape compare's --dp-curve)."""
    if not hasattr(args, "dp_epsilon"):
        return {}
    return {"dp_epsilon": args.dp_epsilon, "dp_delta": args.dp_delta, "dp_max_grad_norm": args.dp_max_grad_norm,
            "dp_sample_rate": args.dp_sample_rate}


def add_distillation_args(p: argparse.ArgumentParser, pooled: bool = False) -> None:
    from fedbrain.distillation import DistillConfig

    g = p.add_argument_group("knowledge distillation (e.g. from a federated EfficientNet-Lite0 into fedbrain_cnn_v2)")
    g.add_argument("--distil-from", metavar="RUN_OR_MODEL", default=None,
                   help="a teacher: a run folder (its best model) or a .pt model file. The job carries it to every "
                        "site, where the student also learns the teacher's soft labels on the site's own batches")
    g.add_argument("--distil-weight", type=float_in(0.0, 1.0), default=DistillConfig.weight,
                   help="the distillation term's share of the loss (default %(default)s)")
    g.add_argument("--distil-temperature", type=POSITIVE, default=DistillConfig.temperature,
                   help="softmax temperature of the distillation term (default %(default)s)")
    if not pooled:
        from fedbrain.settings import LEVER_CHOICES, JobSettings

        g.add_argument("--distil-teacher-bn", choices=LEVER_CHOICES["distil_teacher_bn"], default=None,
                       help="a BatchNorm teacher normalises by statistics each site estimates on its own training "
                            f"images (site; they never leave it) or by its own (global) (default "
                            f"{JobSettings.distil_teacher_bn})")


def distillation_settings(args: argparse.Namespace) -> dict:
    """The JobSettings fields of the distillation flags; the teacher is checked here, before any run starts."""
    if not getattr(args, "distil_from", None):
        return {}
    from fedbrain.checkpoint import CheckpointError, read_card
    from fedbrain.distillation import teacher_checkpoint

    try:
        path = teacher_checkpoint(args.distil_from).resolve()
        read_card(path)
    except (FileNotFoundError, CheckpointError) as exc:
        raise UsageError(str(exc)) from exc
    given = {k: getattr(args, k) for k in ("distil_weight", "distil_temperature", "distil_teacher_bn")
             if getattr(args, k, None) is not None}
    return {"distil_from": str(path), **given}


CLIENT_DP_MIN_SITES = 100  # client-level DP's noise is averaged over the sites: useful only with many of them


def job_settings(args: argparse.Namespace, fed=None):
    """The :class:`JobSettings` the job flags describe (validated). Without ``--rounds``, the rounds give
    ``--budget-epochs`` passes over ``fed``'s training data (without ``fed``: JobSettings' default rounds)."""
    from fedbrain.runs import RunDir
    from fedbrain.settings import JobSettings, legacy_overrides

    check_finetune(args.finetune)
    base = legacy_overrides() if getattr(args, "legacy", False) else {"train": {}}
    levers = {k: v for k, v in base.items() if k != "train"}
    levers.update({k: getattr(args, k) for k in ("class_balance", "missing_classes", "reset_optimizer",
                                                 "server_lr", "server_momentum", "site_weighting",
                                                 "server_optimizer", "bn_statistics", "bn_freeze_round",
                                                 "batch_split")
                   if getattr(args, k, None) is not None})
    if getattr(args, "resume", None):
        p = Path(args.resume)
        if not (p.is_file() or RunDir(p).last.is_file() or RunDir(p).rounds.is_dir()):
            raise UsageError(f"--resume {args.resume!r}: neither a checkpoint nor a run folder with a global model")
    try:
        settings = JobSettings.create(
            args.algorithm, train={**base["train"], **train_overrides(args)}, model=args.model,
            model_kwargs=model_kwargs(args), image_size=args.image_size,
            fedprox_mu=args.fedprox_mu, min_clients=args.min_clients,
            threads_per_site=args.threads_per_site, dp_clip=args.dp_clip, dp_noise=args.dp_noise,
            cross_site_eval=not args.no_cross_site_eval,
            secure_aggregation=getattr(args, "secure_aggregation", False),
            tracking=getattr(args, "tracking", None) or "",
            tracking_uri=getattr(args, "tracking_uri", None) or "",
            pretrained=pretrained_flag(args), finetune=args.finetune, **distillation_settings(args),
            **dp_sgd_settings(args), **levers)
        settings.check_server_settings()
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if settings.dp_clip > 0 and fed is not None and len(fed.sites) < CLIENT_DP_MIN_SITES:
        print(f"warning: --dp-clip is client-level DP: it protects a whole hospital's participation, which needs "
              f"hundreds of sites; with {len(fed.sites)} it destroys the model long before ε is meaningful, and it "
              "does not protect single patients' scans (docs/deployment.md, 'What leaves a site')", file=sys.stderr)
    if args.rounds is not None:
        if args.rounds < 1:
            raise UsageError(f"--rounds must be at least 1, not {args.rounds}")
        settings.rounds = args.rounds
    elif fed is not None:
        from fedbrain.experiments.compare import rounds_for_budget

        if not args.budget_epochs > 0:
            raise UsageError(f"--budget-epochs must be positive, not {args.budget_epochs}")
        settings.rounds = rounds_for_budget(settings, fed, args.budget_epochs)
    if fed is not None:  # as many validated models as centralised training has epochs at this budget
        from fedbrain.experiments.compare import budget_epochs

        settings.validations = budget_epochs(settings, fed)
    return settings
