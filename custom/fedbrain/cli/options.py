"""Options shared by several commands, and how they turn into fedbrain objects (written once)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedbrain.runs import DEFAULT_WORKSPACE


class UsageError(Exception):
    """A user-fixable problem: printed as one line, exit code 2."""


# ---------------------------------------------------------------- data


def add_federation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (default: the embedded Br35H set as simulated hospitals)")
    g.add_argument("--data-root", help="benchmark federation: folder holding figshare_cheng/, sartaj/, navoneel/")
    g.add_argument("--site-config", help="TOML file declaring the hospitals (see jobs/sites.example.toml)")
    g.add_argument("--num-sites", type=int, default=3, help="simulated hospitals for the embedded set (default 3)")
    g.add_argument("--sites", help="comma-separated subset of the declared hospitals to use")
    g.add_argument("--alpha", type=float, default=1.0,
                   help="Dirichlet label-skew of the simulated hospitals; smaller = more skew (default 1.0)")
    g.add_argument("--max-images-per-site", type=int, default=None, help="subsample each site (quick runs)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cache-dir", default=None, help="decoded-image cache (default ~/.cache/fedbrain)")


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


def cache_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.cache_dir) if getattr(args, "cache_dir", None) else None


def load_federation(args: argparse.Namespace, progress: bool = True):
    from fedbrain.data.federation import build_federation

    return build_federation(federation_spec(args), cache_dir=cache_dir(args), progress=progress)


def add_workspace_arg(p) -> None:
    p.add_argument("--workspace", default=str(DEFAULT_WORKSPACE), help="where runs are written (default %(default)s)")


# ---------------------------------------------------------------- models and training


def add_model_args(g, what: str = "ImageNet weights for baselines") -> None:
    from fedbrain.models import FINETUNE_HELP, list_models

    g.add_argument("--model", default="fedbrain_cnn", choices=list_models())
    g.add_argument("--image-size", type=int, default=None, help="input size (default: the model's)")
    g.add_argument("--pretrained", choices=["auto", "yes", "no"], default="auto",
                   help=f"{what} (auto: the model's default)")
    add_finetune_arg(g, FINETUNE_HELP)


def add_finetune_arg(g, help_text: str | None = None) -> None:
    from fedbrain.models import FINETUNE_HELP

    g.add_argument("--finetune", default="all", help=(help_text or FINETUNE_HELP) + " (default all)")


def add_optimizer_args(g, epochs_flag: str | None = "--epochs", epochs_default: int | None = None) -> None:
    """Training options; defaults are None and come from TrainConfig / the algorithm table when unset."""
    from fedbrain.training import TrainConfig

    if epochs_flag:
        g.add_argument(epochs_flag, dest="epochs", type=int, default=epochs_default,
                       help=f"default {epochs_default if epochs_default is not None else TrainConfig.epochs}")
    g.add_argument("--batch-size", type=int, default=None, help=f"default {TrainConfig.batch_size}")
    g.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {TrainConfig.lr:g} for AdamW; each algorithm's own default: "
                        "see fedbrain.settings.ALGORITHM_DEFAULTS)")
    g.add_argument("--weight-decay", type=float, default=None, help=f"default {TrainConfig.weight_decay:g}")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default=None,
                   help=f"local optimiser (default {TrainConfig.optimizer}, SCAFFOLD: sgd)")
    g.add_argument("--device", default=None,
                   help=f"auto (CUDA when present), cpu, cuda or cuda:N (default {TrainConfig.device})")


def train_overrides(args: argparse.Namespace) -> dict:
    """The training settings the user gave explicitly (None = keep the default)."""
    keys = ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "device")
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
    from fedbrain.settings import ALGORITHMS, JobSettings

    rounds = JobSettings.rounds if rounds is None else rounds
    g = p.add_argument_group("federated job")
    g.add_argument("--algorithm", choices=ALGORITHMS, default="fedavg")
    add_model_args(g, "start the federation from ImageNet weights")
    g.add_argument("--rounds", type=int, default=rounds, help=f"default {rounds}")
    add_optimizer_args(g, "--local-epochs", 1)
    g.add_argument("--fedprox-mu", type=float, default=JobSettings.fedprox_mu)
    g.add_argument("--min-clients", type=int, default=None, help="sites that must answer each round (default all)")
    g.add_argument("--site-weighting", choices=["steps", "equal"], default=JobSettings.site_weighting,
                   help="FedAvg/FedProx average weighted by each site's local steps (default) or equal per site")
    g.add_argument("--dp-clip", type=float, default=0.0, help="differential privacy: L2 clip of each update")
    g.add_argument("--dp-noise", type=float, default=0.0, help="differential privacy: noise multiplier")
    g.add_argument("--no-cross-site-eval", action="store_true")
    g.add_argument("--resume", metavar="RUN", help="an interrupted run folder: finish it in place from its last "
                   "finished round; a finished run (or a checkpoint): start a new run from its last global model, "
                   "numbering rounds after it")
    g.add_argument("--threads-per-site", type=int, default=None)
    add_workspace_arg(g)


def job_settings(args: argparse.Namespace):
    """The :class:`JobSettings` the job flags describe (validated)."""
    from fedbrain.runs import RunDir
    from fedbrain.settings import JobSettings

    check_finetune(args.finetune)
    if args.algorithm == "scaffold" and args.site_weighting != "steps":
        raise UsageError("--site-weighting applies to fedavg and fedprox, not scaffold")
    if getattr(args, "resume", None):
        p = Path(args.resume)
        if not (p.is_file() or RunDir(p).last.is_file() or RunDir(p).rounds.is_dir()):
            raise UsageError(f"--resume {args.resume!r}: neither a checkpoint nor a run folder with a global model")
    try:
        return JobSettings.create(
            args.algorithm, train=train_overrides(args), model=args.model, image_size=args.image_size,
            rounds=args.rounds, fedprox_mu=args.fedprox_mu, min_clients=args.min_clients,
            threads_per_site=args.threads_per_site, dp_clip=args.dp_clip, dp_noise=args.dp_noise,
            cross_site_eval=not args.no_cross_site_eval,
            pretrained=pretrained_flag(args), finetune=args.finetune, site_weighting=args.site_weighting)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
