"""NVFlare 2.9 recipes (FedAvg, FedProx, SCAFFOLD) for fedbrain, built from one :class:`JobSettings`."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from torch import nn

import fedbrain.fl.site as site_module
from fedbrain.models import create_model
from fedbrain.settings import ALGORITHMS, JobSettings


class RegistryModel(nn.Module):
    """Server-side model holder: NVFlare rebuilds it from ``class_path`` + JSON-able args.

    It *is* the registry model (same state-dict keys), so sites load the global weights directly. Its random
    initialisation is drawn from ``seed`` (the job's training seed), so a federation is reproducible from its
    flags, as centralised training is.
    """

    def __new__(cls, name: str = "fedbrain_cnn", num_classes: int = 4, model_kwargs: str | None = None,
                seed: int | None = None):
        import torch

        kwargs = json.loads(model_kwargs) if model_kwargs else {}
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
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


TASK_REQUEST_INTERVAL_S = 0.05
SITE_TASKS = ["train", "validate", "submit_model"]  # every task a fedbrain job gives a site (filters name them)


@functools.cache
def _site_script_runner():
    """NVFlare's ScriptRunner, but the executor names the installed site module (``fedbrain.fl.site``) and the
    fedbrain version the job was built with, never a script: the job carries configuration only (and data files
    such as a distillation teacher), and each site runs its own installed fedbrain (:mod:`fedbrain.fl.executor`)."""
    from nvflare.client.config import ExchangeFormat
    from nvflare.job_config.script_runner import ScriptRunner

    import fedbrain
    from fedbrain.fl.executor import SITE_MODULE, FedbrainClientAPIExecutor

    class SiteScriptRunner(ScriptRunner):
        def add_to_fed_job(self, job, ctx, **kwargs):
            if self._launch_external_process:
                return super().add_to_fed_job(job, ctx, **kwargs)
            executor = FedbrainClientAPIExecutor(
                task_script_path=SITE_MODULE, fedbrain_version=fedbrain.__version__,
                task_script_args=self._script_args, execution_mode=self._execution_mode,
                params_exchange_format=self._params_exchange_format or ExchangeFormat.PYTORCH,
                server_expected_format=self._server_expected_format, params_transfer_type=self._params_transfer_type,
                memory_gc_rounds=self._memory_gc_rounds, cuda_empty_cache=self._cuda_empty_cache)
            job.add_executor(executor, tasks=kwargs.get("tasks", ["*"]), ctx=ctx)
            resources = getattr(self, "fedbrain_resources", [])  # data the job carries (a teacher), never code
            if resources:
                job.add_resources(resources=list(resources), ctx=ctx)
            return {}

    return SiteScriptRunner


def _recipe_class():
    """NVFlare's PyTorch FedAvgRecipe with fedbrain's controller (every algorithm) and portable site script."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

    from fedbrain.fl.controller import FedbrainController

    class FedbrainRecipe(FedAvgRecipe):
        def __init__(self, *, controller_args: dict, site_resources: list[str] = (), **kwargs):
            self._fedbrain_controller_args = controller_args
            self._fedbrain_site_resources = list(site_resources)
            super().__init__(**kwargs)

        def _create_controller(self, persistor_id, model_params, model_aggregator):
            # the arguments NVFlare's FedAvgRecipe gives its FedAvg controller, plus fedbrain's
            return FedbrainController(
                num_clients=self.min_clients, num_rounds=self.num_rounds, persistor_id=persistor_id,
                model=model_params, save_filename=self.save_filename, aggregator=model_aggregator,
                stop_cond=self.stop_cond, patience=self.patience, task_name="train", exclude_vars=self.exclude_vars,
                aggregation_weights=self.aggregation_weights, memory_gc_rounds=self.server_memory_gc_rounds,
                enable_tensor_disk_offload=self.enable_tensor_disk_offload, task_check_period=0.1,
                **self._get_controller_kwargs(), **self._fedbrain_controller_args)

        def _create_client_runner(self, site_config):
            runner = super()._create_client_runner(site_config)
            runner.__class__ = _site_script_runner()
            runner.fedbrain_resources = self._fedbrain_site_resources
            return runner

    return FedbrainRecipe


def build_recipe(s: JobSettings, sites: list[str], split_files: dict[str, str] | None = None,
                 run_dir: str | None = None, cache_dir: str | None = None, name: str | None = None,
                 log_dirs: dict[str, str] | None = None, checkpoint_dir: str | None = None):
    """One recipe for FedAvg, FedProx and SCAFFOLD: a client app per site (its own split file and log
    folder), fedbrain's validating aggregator and controller; for SimEnv, PocEnv or ProdEnv.

    ``run_dir`` / ``checkpoint_dir`` are folders on the *server* (audit, round log, round checkpoints;
    default: the server's job folder); ``split_files`` and ``log_dirs`` are paths on each site's machine.
    """
    from nvflare.recipe import add_cross_site_evaluation

    from fedbrain.runs import RunDir

    if s.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {s.algorithm!r}; choose one of {ALGORITHMS}")
    from fedbrain.secagg import secure_aggregation_on

    s.secure_aggregation = secure_aggregation_on(s, len(sites))  # the one rule (None: on with 3 or more sites)
    s.check_server_settings()
    model = {"class_path": f"{RegistryModel.__module__}.RegistryModel",
             "args": {"name": s.model, "num_classes": 4, "seed": s.train.seed}}
    if s.model_kwargs:
        model["args"]["model_kwargs"] = json.dumps(s.model_kwargs)
    run = RunDir(run_dir) if run_dir else None
    min_clients = s.min_clients or len(sites)
    controller_args = {
        "min_responses": min_clients if min_clients < len(sites) else 0, "wait_after_min_s": s.wait_after_min_s,
        "checkpoint_dir": checkpoint_dir or (str(run.rounds) if run else ""), "scaffold": s.algorithm == "scaffold",
        "num_sites": len(sites), "start_round": s.start_round,
        "initial_control": str(Path(s.initial_checkpoint).resolve()) if s.initial_checkpoint else "",
        "fedprox_mu": s.fedprox_mu if s.algorithm == "fedprox" else None,
        "server_lr": s.server_lr, "server_momentum": s.server_momentum, "server_optimizer": s.server_optimizer,
        "server_eps": s.server_eps, "server_weight_decay": s.server_weight_decay, "server_warmup": s.server_warmup,
        "plan_start_round": s.plan_start_round, "validations": s.validations,
        "stop_file": str(run.stop_request) if run else "",
        "secure_aggregation": s.secure_aggregation,
    }
    from fedbrain.fl.aggregator import ValidatingAggregator

    aggregator = ValidatingAggregator(audit_file=str(run.server_audit) if run else None,
                                      rounds_file=str(run.server_log) if run else None,
                                      weighting=s.site_weighting, scaffold=s.algorithm == "scaffold",
                                      secure_sites=list(sites) if s.secure_aggregation else None)
    recipe_cls = _recipe_class()
    kwargs = dict(name=name or f"fedbrain-{s.algorithm}", model=model, min_clients=len(sites),
                  num_rounds=s.rounds, train_script=site_module.__file__,
                  train_args=site_args(s, None, run_dir, cache_dir), aggregator=aggregator,
                  key_metric="val_score", controller_args=controller_args,
                  site_resources=[str(Path(s.distil_from).resolve())] if s.distil_from else [])
    if s.initial_checkpoint:
        kwargs["initial_ckpt"] = str(Path(s.initial_checkpoint).resolve())
    recipe = recipe_cls(**kwargs)
    if split_files or log_dirs:
        recipe.set_per_site_config({
            site: {"train_args": site_args(s, (split_files or {}).get(site), run_dir, cache_dir,
                                           (log_dirs or {}).get(site))} for site in sites
        })
    # fedbrain is installed at every site (pip install fedbrain): NVFlare must not copy its modules
    # into the job's custom/ folder, where a partial copy would shadow the installed package.
    recipe._job.set_app_packages(["fedbrain"])
    # between rounds a site asks for its next task every task_request_interval s (NVFlare's default 2 s is
    # most of a short round's wall time)
    recipe._job._deploy_map["server"].add_params({"server": {"task_request_interval": TASK_REQUEST_INTERVAL_S}})
    if s.cross_site_eval:
        add_cross_site_evaluation(recipe)
        if s.secure_aggregation:  # the sites' own models stay home: every site evaluates the global model only
            global_model_evaluation_only(recipe)
    if s.tracking == "mlflow":
        add_mlflow_tracking(recipe, s, run)
    return recipe


def global_model_evaluation_only(recipe) -> None:
    """Cross-site evaluation without the submit-model task: no site's local model is asked for or sent."""
    from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval

    found = [c for c in _server_components(recipe._job) if isinstance(c, CrossSiteModelEval)]
    if not found:
        raise RuntimeError("no cross-site evaluation workflow in the recipe to restrict")
    for workflow in found:
        workflow._submit_model_task_name = ""


def _server_components(job) -> list:
    app = job._deploy_map["server"]
    app = getattr(app, "app_config", app)
    return [getattr(w, "controller", w) for w in getattr(app, "workflows", [])]


def mlflow_tracking_uri(s: JobSettings, run=None) -> str:
    """The job's MLflow store: ``tracking_uri``, else a SQLite file in the run folder (simulator), else
    NVFlare's default (a SQLite file in the server's job folder)."""
    if s.tracking_uri:
        return s.tracking_uri
    return f"sqlite:///{Path(run.mlflow_db).resolve()}" if run is not None else ""


def add_mlflow_tracking(recipe, s: JobSettings, run=None) -> None:
    """NVFlare's experiment tracking: an MLflow receiver on the server; sites log through ``MLflowWriter``."""
    import importlib.util

    from nvflare.recipe.utils import add_experiment_tracking

    missing = [m for m in ("mlflow", "sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"tracking = mlflow needs {', '.join(missing)}: pip install 'fedbrain[mlflow]'")
    config = {"kw_args": {"experiment_name": "fedbrain", "run_name": Path(run.root).name if run else "fedbrain"}}
    uri = mlflow_tracking_uri(s, run)
    if uri:
        config["tracking_uri"] = uri
    add_experiment_tracking(recipe, "mlflow", config)


__all__ = ["RegistryModel", "build_recipe", "site_args"]
