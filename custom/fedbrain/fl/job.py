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
    min_clients: int | None = None  # default: all sites
    threads_per_site: int | None = None
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    cross_site_eval: bool = True
    initial_checkpoint: str | None = None
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
    if s.dp_clip > 0:
        a += ["--dp-clip", str(s.dp_clip), "--dp-noise", str(s.dp_noise)]
    return shlex.join(a) + (" " + s.extra_site_args if s.extra_site_args else "")


def build_recipe(s: JobSettings, sites: list[str], split_files: dict[str, str] | None = None,
                 run_dir: str | None = None, cache_dir: str | None = None, name: str | None = None):
    """A recipe with one client app per site (per-site split file), for SimEnv, PocEnv or ProdEnv."""
    from nvflare.recipe import add_cross_site_evaluation

    if s.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {s.algorithm!r}; choose one of {ALGORITHMS}")
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
    if s.algorithm == "fedavg":
        from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

        recipe = FedAvgRecipe(**common, key_metric="val_score", aggregator=_safe_aggregator(run_dir))
    elif s.algorithm == "fedprox":
        from nvflare.app_opt.pt.recipes.fedprox import FedProxRecipe

        recipe = FedProxRecipe(**common, key_metric="val_score", fedprox_mu=s.fedprox_mu,
                               aggregator=_safe_aggregator(run_dir))
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
    if s.cross_site_eval:
        add_cross_site_evaluation(recipe)
    return recipe


def _safe_aggregator(run_dir: str | None):
    from fedbrain.fl.aggregator import ValidatingAggregator

    return ValidatingAggregator(audit_file=str(Path(run_dir) / "server_audit.jsonl") if run_dir else None)


def load_global_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from an NVFlare PT persistor file (``FL_global_model.pt``)."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    return {k: torch.as_tensor(v) for k, v in sd.items()}
