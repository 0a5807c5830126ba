"""Build NVFlare 2.9 recipes (FedAvg, FedProx, SCAFFOLD) for fedbrain from plain settings."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import fedbrain.fl.site as site_module
from fedbrain.models import create_model

ALGORITHMS = ("fedavg", "fedprox", "scaffold")


class RegistryModel(nn.Module):
    """Server-side model holder: NVFlare rebuilds it from ``class_path`` + JSON-able args.

    It *is* the registry model (same state-dict keys), so sites load the global weights directly.
    """

    def __new__(cls, name: str = "fedbrain_cnn", num_classes: int = 4, model_kwargs: str | None = None):
        kwargs = json.loads(model_kwargs) if model_kwargs else {}
        return create_model(name, num_classes=num_classes, pretrained=False, **kwargs)


@dataclass
class JobSettings:
    algorithm: str = "fedavg"
    model: str = "fedbrain_cnn"
    model_kwargs: dict = field(default_factory=dict)
    image_size: int | None = None
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    fedprox_mu: float = 0.01
    seed: int = 0
    min_clients: int | None = None  # sites that must answer each round (default: all)
    wait_after_min_s: int = 60  # with min_clients < sites: how long a round waits for the others
    threads_per_site: int | None = None
    finetune: str = "all"  # all | head | last-N (see fedbrain.models.apply_finetune)
    pretrained: bool | None = None  # start from ImageNet weights (None: the registry model's default)
    site_weighting: str = "steps"  # FedAvg/FedProx average: by local steps, or every site alike ("equal")
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    cross_site_eval: bool = True
    initial_checkpoint: str | None = None  # a plain {"model": state_dict} file (see simulate.resume)
    start_round: int = 0  # resume: round numbering continues from here
    extra_site_args: str = ""  # appended to every site's args (fault injection in tests)

    def to_dict(self) -> dict:
        return asdict(self)


def site_args(s: JobSettings, split_file: str | None, run_dir: str | None, cache_dir: str | None) -> str:
    a = ["--model", s.model, "--algorithm", s.algorithm,
         "--local-epochs", str(s.local_epochs), "--batch-size", str(s.batch_size), "--lr", str(s.lr),
         "--weight-decay", str(s.weight_decay), "--fedprox-mu", str(s.fedprox_mu), "--seed", str(s.seed)]
    for k, v in s.model_kwargs.items():
        a += ["--model-arg", f"{k}={v}"]
    if s.image_size:
        a += ["--image-size", str(s.image_size)]
    if split_file:
        a += ["--split-file", split_file]
    if run_dir:
        a += ["--run-dir", run_dir]
    if cache_dir:
        a += ["--cache-dir", cache_dir]
    if s.threads_per_site:
        a += ["--threads", str(s.threads_per_site)]
    if s.finetune != "all":
        a += ["--finetune", s.finetune]
    if s.dp_clip > 0:
        a += ["--dp-clip", str(s.dp_clip), "--dp-noise", str(s.dp_noise)]
    return shlex.join(a) + (" " + s.extra_site_args if s.extra_site_args else "")


def build_recipe(s: JobSettings, sites: list[str], split_files: dict[str, str] | None = None,
                 run_dir: str | None = None, cache_dir: str | None = None, name: str | None = None):
    """A recipe with one client app per site (per-site split file), for SimEnv, PocEnv or ProdEnv."""
    from nvflare.recipe import add_cross_site_evaluation

    if s.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {s.algorithm!r}; choose one of {ALGORITHMS}")
    if s.algorithm == "scaffold" and s.site_weighting != "steps":
        raise ValueError("--site-weighting applies to fedavg and fedprox (NVFlare's SCAFFOLD recipe takes no "
                         "custom aggregator)")
    model = {"class_path": f"{RegistryModel.__module__}.RegistryModel",
             "args": {"name": s.model, "num_classes": 4}}
    if s.model_kwargs:
        model["args"]["model_kwargs"] = json.dumps(s.model_kwargs)
    min_clients = s.min_clients or len(sites)
    common = dict(name=name or f"fedbrain-{s.algorithm}", model=model, min_clients=min_clients,
                  num_rounds=s.rounds, train_script=site_module.__file__,
                  train_args=site_args(s, None, run_dir, cache_dir))
    if s.initial_checkpoint:
        common["initial_ckpt"] = str(Path(s.initial_checkpoint).resolve())
    if s.algorithm in ("fedavg", "fedprox"):
        from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
        from nvflare.app_opt.pt.recipes.fedprox import FedProxRecipe

        base = FedAvgRecipe if s.algorithm == "fedavg" else FedProxRecipe
        extra = {"fedprox_mu": s.fedprox_mu} if s.algorithm == "fedprox" else {}
        if min_clients < len(sites) or s.start_round:
            base = _custom_controller(base, min_clients if min_clients < len(sites) else 0, s.wait_after_min_s,
                                      s.start_round)
            common["min_clients"] = len(sites)
        recipe = base(**common, **extra, key_metric="val_score",
                      aggregator=_safe_aggregator(run_dir, s.site_weighting))
    else:
        from nvflare.app_opt.pt.recipes.scaffold import ScaffoldRecipe

        recipe = ScaffoldRecipe(**common)
    if split_files and hasattr(recipe, "set_per_site_config") and s.algorithm != "scaffold":
        recipe.set_per_site_config({
            site: {"train_args": site_args(s, split_files[site], run_dir, cache_dir)} for site in sites
        })
    elif split_files:
        # SCAFFOLD's recipe has no per-site apps: sites find their split under --run-dir/splits/<site>.csv
        pass
    # fedbrain is installed at every site (pip install fedbrain): NVFlare must not copy its modules
    # into the job's custom/ folder, where a partial copy would shadow the installed package.
    recipe._job.set_app_packages(["fedbrain"])
    # NVFlare 2.9's ScaffoldRecipe exposes no persistor id, which add_cross_site_evaluation needs
    if s.cross_site_eval and s.algorithm != "scaffold":
        add_cross_site_evaluation(recipe)
    return recipe


def _custom_controller(recipe_class, min_responses: int, wait_after_min_s: int, start_round: int):
    """The recipe with its FedAvg controller made fault tolerant (min_responses > 0) and/or resumed."""
    from fedbrain.fl.controller import FaultTolerantFedAvg

    class CustomRecipe(recipe_class):
        def _create_controller(self, persistor_id, model_params, model_aggregator):
            ctrl = super()._create_controller(persistor_id, model_params, model_aggregator)
            if min_responses:
                ctrl.__class__ = FaultTolerantFedAvg  # same state, plus the two settings below
                ctrl.min_responses, ctrl.wait_after_min_s = min_responses, wait_after_min_s
            ctrl.start_round = start_round
            return ctrl

    return CustomRecipe


def _safe_aggregator(run_dir: str | None, site_weighting: str = "steps"):
    from fedbrain.fl.aggregator import ValidatingAggregator

    return ValidatingAggregator(audit_file=str(Path(run_dir) / "server_audit.jsonl") if run_dir else None,
                                site_weighting=site_weighting)


def load_global_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from an NVFlare PT persistor file (``FL_global_model.pt``)."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    return {k: torch.as_tensor(v) for k, v in sd.items()}


def job_main(algorithm: str, argv: list[str] | None = None) -> int:
    """``jobs/<algorithm>/job.py``: build the recipe from flags; run it in SimEnv/PocEnv/ProdEnv or export it."""
    import argparse

    from fedbrain.cli import add_federation_args, load_federation
    from fedbrain.fl.cli import add_job_args, job_settings

    p = argparse.ArgumentParser(description=f"fedbrain {algorithm} job (NVFlare recipe)")
    add_federation_args(p)
    add_job_args(p)
    p.add_argument("--env", choices=["sim", "poc", "prod"], default="sim")
    p.add_argument("--startup-kit", help="admin startup kit folder (prod)")
    p.add_argument("--export-to", help="write the NVFlare job folder here instead of running it")
    p.add_argument("--run-dir", default=None, help="where splits and site logs go (default: a new workspace run)")
    args = p.parse_args(argv)
    args.algorithm = algorithm
    settings = job_settings(args)
    fed = load_federation(args, progress=False)
    if args.env == "sim" and not args.export_to:
        from fedbrain.experiment import new_run_dir
        from fedbrain.fl.simulate import run_simulation

        run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(args.workspace, f"{algorithm}-{settings.model}")
        summary = run_simulation(fed, settings, run_dir)
        print(summary.get("rounds_table", ""))
        print(f"run folder: {run_dir}")
        return 3 if summary.get("failed_sites") else 0
    run_dir = Path(args.run_dir or Path(args.workspace) / f"{algorithm}-job").resolve()
    fed.write(run_dir)
    splits = {s: str(run_dir / "splits" / f"{s}.csv") for s in fed.sites}
    recipe = build_recipe(settings, list(fed.sites), splits, run_dir=str(run_dir))
    if args.export_to:
        recipe.export(args.export_to)
        print(f"exported NVFlare job to {args.export_to}")
        return 0
    if args.env == "poc":
        from nvflare.recipe import PocEnv

        env = PocEnv(clients=list(fed.sites))
    else:
        from nvflare.recipe import ProdEnv

        if not args.startup_kit:
            raise SystemExit("--env prod needs --startup-kit (the admin's startup kit folder)")
        env = ProdEnv(startup_kit_location=args.startup_kit)
    run = recipe.execute(env)
    print(f"submitted job {run.get_job_id()}; status {run.get_status()}")
    return 0
