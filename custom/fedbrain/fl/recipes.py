"""NVFlare 2.9 recipes (FedAvg, FedProx, SCAFFOLD) for fedbrain, built from one :class:`JobSettings`."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

import fedbrain.fl.site as site_module
from fedbrain.models import create_model
from fedbrain.settings import ALGORITHMS, JobSettings


class RegistryModel(nn.Module):
    """Server-side model holder: NVFlare rebuilds it from ``class_path`` + JSON-able args.

    It *is* the registry model (same state-dict keys), so sites load the global weights directly.
    """

    def __new__(cls, name: str = "fedbrain_cnn", num_classes: int = 4, model_kwargs: str | None = None):
        kwargs = json.loads(model_kwargs) if model_kwargs else {}
        return create_model(name, num_classes=num_classes, pretrained=False, **kwargs)


def site_args(s: JobSettings, split_file: str | None = None, run_dir: str | None = None,
              cache_dir: str | None = None, log_dir: str | None = None) -> str:
    """The site script's arguments: the job's site settings as one JSON word, plus where this site's files are.

    NVFlare splits these on whitespace, so no value may contain any.
    """
    a = ["--job", s.site_json()]
    for flag, value in (("--split-file", split_file), ("--run-dir", run_dir), ("--cache-dir", cache_dir),
                        ("--log-dir", log_dir)):
        if value:
            if any(c.isspace() for c in str(value)):
                raise ValueError(f"{flag} {value!r}: NVFlare cannot pass paths containing whitespace to sites")
            a += [flag, str(value)]
    if s.threads_per_site:
        a += ["--threads", str(s.threads_per_site)]
    return " ".join(a) + (" " + s.extra_site_args if s.extra_site_args else "")


def build_recipe(s: JobSettings, sites: list[str], split_files: dict[str, str] | None = None,
                 run_dir: str | None = None, cache_dir: str | None = None, name: str | None = None,
                 log_dirs: dict[str, str] | None = None):
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
            site: {"train_args": site_args(s, split_files[site], run_dir, cache_dir,
                                           (log_dirs or {}).get(site))} for site in sites
        })
    # SCAFFOLD's recipe has no per-site apps: sites find their split under --run-dir/splits/<site>.csv
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
    from fedbrain.runs import RunDir

    return ValidatingAggregator(audit_file=str(RunDir(run_dir).server_audit) if run_dir else None,
                                site_weighting=site_weighting)


__all__ = ["RegistryModel", "build_recipe", "site_args"]
