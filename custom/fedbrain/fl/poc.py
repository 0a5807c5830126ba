"""NVFlare POC mode (every participant a local process) that stays on 127.0.0.1 and can run fedbrain jobs.

NVFlare's own ``nvflare poc`` names its server ``server`` and listens on every interface, and its kits
allow neither fedbrain's classes nor NVFlare's ``PTFileModelPersistor``. :func:`loopback_poc_env` provisions
the POC project like ``fedbrain provision --server-host localhost`` (mutual TLS, the server bound to
loopback) and adds fedbrain's job components to every kit's allow-list before the kits start.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedbrain.fl.deploy import ProjectSpec, allow_components, recipe_component_classes, write_project_yml

POC_ADMIN = "admin@fedbrain.local"


def loopback_poc_env(sites: list[str], workspace: str | Path, fed_port: int = 8002, admin_port: int = 8003):
    """A ``PocEnv`` for ``sites`` whose POC workspace is ``workspace`` (a fresh folder), bound to 127.0.0.1."""
    from nvflare.recipe import PocEnv
    from nvflare.recipe.poc_env import SERVICE_START_TIMEOUT
    from nvflare.recipe.utils import collect_non_local_scripts
    from nvflare.tool.poc.poc_commands import _start_poc, get_prod_dir, prepare_poc_provision

    workspace = Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    spec = ProjectSpec(sites=list(sites), server_host="localhost", fed_port=fed_port, admin_port=admin_port,
                       admin=POC_ADMIN, project="fedbrain-poc", org="fedbrain").validate()
    project_yml = write_project_yml(spec, workspace / "conf")

    class LoopbackPocEnv(PocEnv):
        """PocEnv whose kits are fedbrain-ready before they start (see the module docstring)."""

        def deploy(self, job) -> str:
            missing = collect_non_local_scripts(job)
            if missing:
                raise ValueError(f"scripts missing on this machine: {missing}")
            if self._check_poc_running():
                self.stop(clean_up=True)
            prepare_poc_provision(clients=list(sites), number_of_clients=len(sites), workspace=self.poc_workspace,
                                  docker_image=None, project_conf_path=self.project_conf_path, examples_dir=None)
            classes = recipe_component_classes()
            prod = Path(get_prod_dir(self.poc_workspace, spec.project))
            allow_components(prod / spec.server_host, classes["server"])
            for site in sites:
                allow_components(prod / site, classes["client"])
            _start_poc(poc_workspace=self.poc_workspace, gpu_ids=self.gpu_ids, excluded=[self.username],
                       services_list=[])
            time.sleep(SERVICE_START_TIMEOUT)
            return self._get_session_manager().submit_job(job)

    env = LoopbackPocEnv(clients=list(sites), project_conf_path=str(project_yml), username=POC_ADMIN)
    env.poc_workspace = str(workspace / "poc")
    return env


def poc_admin_kit(env) -> Path:
    """The admin startup kit of a :func:`loopback_poc_env` (for the admin API: job progress, aborting)."""
    from nvflare.tool.poc.poc_commands import get_prod_dir

    return Path(get_prod_dir(env.poc_workspace, "fedbrain-poc")) / POC_ADMIN


__all__ = ["loopback_poc_env", "poc_admin_kit", "POC_ADMIN"]
