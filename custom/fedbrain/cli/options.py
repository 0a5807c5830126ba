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


# ---------------------------------------------------------------- the job configuration


# argparse dest -> the configuration keys the flag sets (fedbrain.config); help texts state these keys' defaults
CONFIG_FLAGS: dict[str, tuple[str, ...]] = {
    "data_root": ("data.root",), "site_config": ("data.site_config",), "cache_dir": ("data.cache_dir",),
    "seed": ("data.seed", "local.seed", "train.seed"), "device": ("local.device", "train.device"),
    "algorithm": ("algorithm",), "model": ("model",), "rounds": ("rounds",), "dp_epsilon": ("dp_epsilon",),
    "image_size": ("image_size",), "finetune": ("finetune",), "model_kwargs": ("model_kwargs",),
    "distil_from": ("distil_from",), "distil_weight": ("distil_weight",),
    "distil_temperature": ("distil_temperature",),
    "epochs": ("train.epochs",), "batch_size": ("train.batch_size",), "lr": ("train.lr",),
    "weight_decay": ("train.weight_decay",), "optimizer": ("train.optimizer",), "momentum": ("train.momentum",),
    "augmentation": ("train.augmentation",), "threads": ("train.threads",),
}


def config_default(key: str):
    """The default of a configuration key (what ``--help`` states)."""
    from fedbrain.config import keys

    return keys()[key]


def default_text(key: str) -> str:
    value = config_default(key)
    return "none" if value in (None, "") else f"{value:g}" if isinstance(value, float) else str(value)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--set KEY=VALUE``: every job setting, beyond the everyday flags."""
    if "--config" in p._option_string_actions:
        return
    g = p.add_argument_group("job configuration (`fedbrain config show` prints every key, its value and source)")
    g.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="a TOML job configuration (jobs/*.toml, or a run's config.toml to run it again); repeatable, "
                        "later files win")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_values",
                   help="one setting on top of the files and flags, e.g. --set local.steps=4 --set server_lr=1e-3")


def run_config(args: argparse.Namespace):
    """The :class:`fedbrain.config.RunConfig` of the command line (defaults < files < flags < --set); cached."""
    from fedbrain.config import ConfigError, load

    cached = getattr(args, "_run_config", None)
    if cached is not None:
        return cached
    flags = {}
    for dest, keys in CONFIG_FLAGS.items():
        value = getattr(args, dest, None)
        if dest == "model_kwargs" and value is not None:
            value = model_kwargs(args)
        for key in keys:
            flags[key] = (value, f"--{dest.replace('_', '-')}")
    pretrained = getattr(args, "pretrained", "auto")
    if pretrained != "auto":
        flags["pretrained"] = (pretrained == "yes", "--pretrained")
    for key, value in getattr(args, "_command_defaults", {}).items():
        flags.setdefault(key, (value, f"{args.command} default"))
        if flags[key][0] is None:
            flags[key] = (value, f"{args.command} default")
    try:
        cfg = load(getattr(args, "config", None) or [], getattr(args, "set_values", None) or [], flags)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    args._run_config = cfg
    return cfg


# ---------------------------------------------------------------- data


def add_federation_args(p: argparse.ArgumentParser, job: bool = False) -> None:
    """The data flags (``[data]`` keys); commands that do not run a job also get the image cache."""
    g = p.add_argument_group("data (default: the embedded Br35H set as simulated hospitals; more in [data])")
    g.add_argument("--data-root", help="benchmark federation: folder holding figshare_cheng/, sartaj/, navoneel/")
    g.add_argument("--site-config", help="TOML file declaring the hospitals (see jobs/sites.example.toml)")
    g.add_argument("--seed", type=int, default=None,
                   help=f"the splits' and the training's seed (default {default_text('data.seed')})")
    if not job:
        add_cache_arg(g)
    add_config_args(p)


def data_given(args: argparse.Namespace) -> bool:
    """Did the user name a federation (rather than relying on a run's recorded splits)?"""
    data = run_config(args).data
    return bool(data.root or data.site_config or getattr(args, "embedded", False))


def federation_spec(args: argparse.Namespace):
    from fedbrain.data.federation import benchmark_spec, embedded_spec, load_site_config

    data = run_config(args).data
    extra = {"max_images_per_site": data.max_images_per_site or None}
    if data.site_config:
        spec = load_site_config(data.site_config, data.root or None)
        spec.seed = data.seed
        if data.max_images_per_site:
            spec.max_images_per_site = data.max_images_per_site
    elif data.root:
        spec = benchmark_spec(data.root, seed=data.seed, **extra)
    else:
        spec = embedded_spec(sites=data.num_sites, alpha=data.alpha, seed=data.seed, **extra)
    if data.sites:
        wanted = [s.strip() for s in data.sites if s.strip()]
        if spec.partition:
            raise UsageError("data.sites selects declared hospitals; the embedded set takes data.num_sites instead")
        unknown = set(wanted) - {s.name for s in spec.sites}
        if unknown:
            raise UsageError(f"unknown data.sites {sorted(unknown)}; declared: {[s.name for s in spec.sites]}")
        spec.sites = [s for s in spec.sites if s.name in wanted]
    return spec


def add_cache_arg(p) -> None:
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default ~/.cache/fedbrain)")


def cache_dir(args: argparse.Namespace) -> Path | None:
    if getattr(args, "cache_dir", None):
        return Path(args.cache_dir)
    if hasattr(args, "set_values"):
        given = run_config(args).data.cache_dir
        return Path(given) if given else None
    return None


def load_federation(args: argparse.Namespace, progress: bool = True):
    from fedbrain.data.federation import build_federation

    fed = build_federation(federation_spec(args), cache_dir=cache_dir(args), progress=progress)
    twins_of = run_config(args).data.exclude_twins_of
    if twins_of:
        exclude_twins(fed, twins_of, cache_dir(args))
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
        raise UsageError(f"data.exclude_twins_of {run_path!r}: {exc}") from exc
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

    g.add_argument("--model", default=None, choices=list_models(), help=f"default {default_text('model')}")
    g.add_argument("--image-size", type=int_at_least(32), default=None, help="input size (default: the model's)")
    g.add_argument("--pretrained", choices=["auto", "yes", "no"], default="auto",
                   help=f"{what} (auto: the model's default)")
    g.add_argument("--model-kwargs", type=json_object, default=None, metavar="JSON",
                   help="architecture arguments of the registry model, saved in its card, e.g. "
                        "'{\"stem\": 4, \"depths\": [1, 2, 2]}' for fedbrain_cnn_v2")
    add_finetune_arg(g, FINETUNE_HELP, default=None)


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


def model_kwargs(args: argparse.Namespace, model: str | None = None) -> dict:
    """``--model-kwargs``, checked by building the model once (a bad argument is one line, before any run)."""
    kwargs = getattr(args, "model_kwargs", None) or {}
    return check_model_kwargs(model or getattr(args, "model", None) or default_text("model"), kwargs)


def check_model_kwargs(model: str, kwargs: dict) -> dict:
    if kwargs:
        from fedbrain.models import architecture, create_model

        known = set(architecture(model))
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UsageError(f"model_kwargs: {model} takes {sorted(known) or 'no arguments'}, not {unknown}")
        try:
            create_model(model, pretrained=False, **kwargs)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"model_kwargs {kwargs} do not build {model}: {exc}") from exc
    return kwargs


def add_finetune_arg(g, help_text: str | None = None, default: str | None = "all") -> None:
    from fedbrain.models import FINETUNE_HELP

    shown = default or default_text("finetune")
    if shown == "none":  # JobSettings.trained_layers decides by the model
        shown = "the model's: head with ImageNet weights, all from scratch"
    g.add_argument("--finetune", default=default, help=(help_text or FINETUNE_HELP) + f" (default {shown})")


def add_optimizer_args(g) -> None:
    """Centralised / local-only training options (``[train]`` keys; unset: the configuration's values)."""
    from fedbrain.contract import AUGMENTATIONS

    g.add_argument("--epochs", type=POSITIVE_INT, default=None, help=f"default {default_text('train.epochs')}")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=None,
                   help=f"default {default_text('train.batch_size')}")
    g.add_argument("--lr", type=POSITIVE, default=None, help=f"AdamW's learning rate (default "
                   f"{default_text('train.lr')})")
    g.add_argument("--weight-decay", type=NON_NEGATIVE, default=None,
                   help=f"default {default_text('train.weight_decay')}")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default=None,
                   help=f"default {default_text('train.optimizer')}")
    g.add_argument("--momentum", type=MOMENTUM, default=None,
                   help=f"SGD momentum (default {default_text('train.momentum')})")
    add_device_arg(g)
    g.add_argument("--augmentation", choices=sorted(AUGMENTATIONS), default=None,
                   help=f"train-only augmentation policy (default {default_text('train.augmentation')}; "
                        "'standard' is the policy before the robustness measurements, 'robust' also widens the "
                        "scale range)")


def train_config(args: argparse.Namespace):
    """The centralised training config (``[train]``) of the command line."""
    return run_config(args).train


def check_finetune(spec: str) -> None:
    from fedbrain.models import parse_finetune

    try:
        parse_finetune(spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def pretrained_flag(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[args.pretrained]


# ---------------------------------------------------------------- federated jobs


def add_job_args(p: argparse.ArgumentParser, rounds: int | None = None, algorithm: bool = True,
                 resume: bool = True) -> None:
    """The everyday flags of a federated job; every other setting is a configuration key (``--set``)."""
    from fedbrain.models import list_models
    from fedbrain.settings import ALGORITHMS

    add_config_args(p)
    g = p.add_argument_group("federated job")
    if algorithm:
        g.add_argument("--algorithm", choices=ALGORITHMS, default=None,
                       help=f"default {default_text('algorithm')}")
    g.add_argument("--model", default=None, choices=list_models(), help=f"default {default_text('model')}")
    g.add_argument("--rounds", type=POSITIVE_INT, default=None,
                   help="federated rounds (default: " + (str(rounds) if rounds else "as many as the key "
                        f"budget_epochs, {default_text('budget_epochs')} passes over the training data, needs")
                   + ")")
    if rounds:
        p.set_defaults(_command_defaults={"rounds": rounds})
    g.add_argument("--dp-epsilon", type=epsilon_budget, default=None,
                   help="DP-SGD at every site: the (ε, δ) budget of the whole job per training image (default "
                        f"{default_text('dp_epsilon')}: off; inf: the same schedule without clipping or noise)")
    if "--device" not in p._option_string_actions:
        add_device_arg(g)
    if resume:
        g.add_argument("--resume", metavar="RUN", help="an interrupted run folder: finish it in place from its last "
                       "finished round; a finished run (or a checkpoint): start a new run from its last global "
                       "model, numbering rounds after it")
    add_workspace_arg(g)


def epsilon_budget(text: str) -> float:
    """A DP budget: a number ≥ 0, or inf."""
    if text.strip().lower() in ("inf", "infinity"):
        return float("inf")
    return NON_NEGATIVE(text)


def add_distillation_args(p: argparse.ArgumentParser) -> None:
    """Centralised training's distillation flags (a federated job sets the distil_* keys)."""
    g = p.add_argument_group("knowledge distillation (e.g. from a federated EfficientNet-Lite0 into fedbrain_cnn_v2)")
    g.add_argument("--distil-from", metavar="RUN_OR_MODEL", default=None,
                   help="a teacher: a run folder (its best model) or a .pt model file; the student also learns the "
                        "teacher's soft labels")
    g.add_argument("--distil-weight", type=float_in(0.0, 1.0), default=None,
                   help=f"the distillation term's share of the loss (default {default_text('distil_weight')})")
    g.add_argument("--distil-temperature", type=POSITIVE, default=None,
                   help=f"softmax temperature of the distillation term (default "
                        f"{default_text('distil_temperature')})")


def teacher_path(given: str) -> str:
    """A teacher run or model file, checked and made absolute (before any run starts)."""
    from fedbrain.checkpoint import CheckpointError, read_card
    from fedbrain.distillation import teacher_checkpoint

    try:
        path = teacher_checkpoint(given).resolve()
        read_card(path)
    except (FileNotFoundError, CheckpointError) as exc:
        raise UsageError(str(exc)) from exc
    return str(path)


CLIENT_DP_MIN_SITES = 100  # client-level DP's noise is averaged over the sites: useful only with many of them


def job_settings(args: argparse.Namespace, fed=None):
    """The :class:`JobSettings` of the command line's configuration (validated). Without a ``rounds`` key, the
    rounds give ``budget_epochs`` passes over ``fed``'s training data (without ``fed``: JobSettings' default)."""
    from dataclasses import replace

    from fedbrain.runs import RunDir

    cfg = run_config(args)
    settings = replace(cfg.job)
    check_finetune(settings.trained_layers)
    check_model_kwargs(settings.model, settings.model_kwargs)
    if settings.distil_from:
        settings.distil_from = teacher_path(settings.distil_from)
    if getattr(args, "resume", None):
        p = Path(args.resume)
        if not (p.is_file() or RunDir(p).last.is_file() or RunDir(p).rounds.is_dir()):
            raise UsageError(f"--resume {args.resume!r}: neither a checkpoint nor a run folder with a global model")
    try:
        settings.check_server_settings()
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if settings.dp_clip > 0 and fed is not None and len(fed.sites) < CLIENT_DP_MIN_SITES:
        print(f"warning: dp_clip is client-level DP: it protects a whole hospital's participation, which needs "
              f"hundreds of sites; with {len(fed.sites)} it destroys the model long before ε is meaningful, and it "
              "does not protect single patients' scans (docs/deployment.md, 'What leaves a site')", file=sys.stderr)
    if not cfg.given("rounds") and fed is not None:
        from fedbrain.experiments.compare import rounds_for_budget

        settings.rounds = rounds_for_budget(settings, fed, cfg.budget_epochs)
        cfg.sources["rounds"] = f"budget_epochs = {cfg.budget_epochs:g} on this federation"
    if fed is not None and not cfg.given("validations"):  # as many validated models as centralised has epochs
        from fedbrain.experiments.compare import budget_epochs

        settings.validations = budget_epochs(settings, fed)
    cfg.job = settings
    return settings


def save_config(args: argparse.Namespace, run) -> Path:
    """Write the run's effective configuration (``--config`` it to run it again) into its folder."""
    from fedbrain.config import CONFIG_FILE

    return run_config(args).write(Path(getattr(run, "root", run)) / CONFIG_FILE)
