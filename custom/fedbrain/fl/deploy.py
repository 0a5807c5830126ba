"""Multi-site deployment on NVFlare 2.9: provision a project, run its startup kits, submit with ProdEnv.

* :func:`provision` writes ``project.yml`` (one server, one client per hospital, one project admin) and
  provisions it with NVFlare's own provisioner: mutual-TLS startup kits signed by a fresh project CA.
* :func:`wait_for_clients` / :func:`shutdown_all` talk to the running system through the admin kit.
* :func:`submit` builds the same recipe as ``fedbrain simulate`` and runs it with
  ``ProdEnv(startup_kit_location=<admin kit>)``; each hospital's ``--split-file`` is a path on *its*
  machine. It waits (bounded), downloads the job result and extracts the global model.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedbrain.runs import RunDir

DEFAULT_PROJECT = "fedbrain"
DEFAULT_ORG = "fedbrain"
DEFAULT_ADMIN = "admin@fedbrain.local"
DEFAULT_FED_PORT = 8002
DEFAULT_ADMIN_PORT = 8003
# Names a client may not take: NVFlare job targets reserved for the server and for "every site".
RESERVED_SITE_NAMES = {"server", "@all", "all"}
# Python packages whose classes a fedbrain job asks the server and the sites to build.
ALLOWED_PACKAGES = ("fedbrain.",)
PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


class DeployError(Exception):
    """A user-fixable deployment problem (bad name, nvflare missing, job failed, ...)."""


# ---------------------------------------------------------------- names and project.yml


def nvflare_version() -> str:
    """The installed NVFlare version; a clear error when it is not installed."""
    try:
        import nvflare
    except ImportError as exc:
        raise DeployError(f"NVFlare is not installed in this Python environment ({sys.executable}); "
                          "install it with: pip install 'nvflare==2.9.0'") from exc
    return str(getattr(nvflare, "__version__", "unknown"))


def _name_problem(name: str, kind: str) -> str | None:
    from nvflare.apis.utils.format_check import name_check

    bad, _reason = name_check(name, kind)
    return "ill-formed" if bad else None


def check_site_name(name: str) -> str:
    """A hospital's NVFlare client name: letters, digits, '-' and '_' only (NVFlare's own rule)."""
    nvflare_version()
    if not name or _name_problem(name, "client") or name.lower() in RESERVED_SITE_NAMES:
        raise DeployError(f"invalid site name {name!r}: NVFlare client names may use only letters, digits, "
                          f"'-' and '_' (and not {sorted(RESERVED_SITE_NAMES)})")
    return name


def parse_sites(text: str | list[str]) -> list[str]:
    """``"hospital-a,hospital-b"`` -> validated, unique site names."""
    items = text.split(",") if isinstance(text, str) else list(text)
    sites = [s.strip() for s in items if s.strip()]
    if not sites:
        raise DeployError("no site given: pass --sites hospital-a,hospital-b,...")
    for s in sites:
        check_site_name(s)
    dupes = sorted({s for s in sites if sites.count(s) > 1})
    if dupes:
        raise DeployError(f"site names must be unique, repeated: {dupes}")
    return sites


@dataclass
class ProjectSpec:
    """What ``fedbrain provision`` asks NVFlare for: one server, one client per hospital, one admin."""

    sites: list[str]
    server_host: str = "localhost"
    fed_port: int = DEFAULT_FED_PORT
    admin_port: int = DEFAULT_ADMIN_PORT
    admin: str = DEFAULT_ADMIN
    project: str = DEFAULT_PROJECT
    org: str = DEFAULT_ORG

    def validate(self) -> ProjectSpec:
        nvflare_version()
        self.sites = parse_sites(self.sites)
        if _name_problem(self.server_host, "server"):
            raise DeployError(f"invalid --server-host {self.server_host!r}: it must be a host name or IPv4 "
                              "address that every hospital can reach (NVFlare uses it as the server's name "
                              "and TLS identity)")
        if self.server_host in self.sites:
            raise DeployError(f"the server host {self.server_host!r} cannot also be a site name")
        if _name_problem(self.admin, "admin"):
            raise DeployError(f"invalid --admin {self.admin!r}: NVFlare admin names are e-mail addresses "
                              "(e.g. admin@fedbrain.local)")
        if _name_problem(self.org, "org"):
            raise DeployError(f"invalid org {self.org!r}: letters, digits and '_' only")
        if not PROJECT_NAME.match(self.project or ""):
            raise DeployError(f"invalid --project {self.project!r}: letters, digits, '-' and '_' "
                              "(at most 63)")
        for label, port in (("--fed-port", self.fed_port), ("--admin-port", self.admin_port)):
            if not 1 <= int(port) <= 65535:
                raise DeployError(f"{label} {port} is not a TCP port (1-65535)")
        if int(self.fed_port) == int(self.admin_port):
            raise DeployError("--fed-port and --admin-port must differ")
        return self

    def to_project_dict(self) -> dict:
        """The NVFlare ``project.yml`` content (api_version 3, provisioned defaults: mutual TLS)."""
        participants = [{"name": self.server_host, "type": "server", "org": self.org,
                         "fed_learn_port": int(self.fed_port), "admin_port": int(self.admin_port)}]
        participants += [{"name": s, "type": "client", "org": self.org} for s in self.sites]
        participants.append({"name": self.admin, "type": "admin", "org": self.org, "role": "project_admin"})
        return {
            "api_version": 3,
            "name": self.project,
            "description": "fedbrain: federated brain-tumour MRI classification",
            "participants": participants,
            "builders": [
                {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
                 "args": {"template_file": ["master_template.yml"]}},
                {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder",
                 "args": {"config_folder": "config"}},
                {"path": "nvflare.lighter.impl.cert.CertBuilder"},
                {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
            ],
        }


def write_project_yml(spec: ProjectSpec, out_dir: str | Path) -> Path:
    import yaml

    out = Path(out_dir) / "project.yml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# written by `fedbrain provision`; re-provision with `nvflare provision -p project.yml`\n"
                   + yaml.safe_dump(spec.to_project_dict(), sort_keys=False))
    return out


# ---------------------------------------------------------------- startup kits


@dataclass
class Kits:
    """The startup kits of one provisioning run (``<workspace>/<project>/prod_NN``)."""

    root: Path
    server: Path
    clients: dict[str, Path] = field(default_factory=dict)
    admins: dict[str, Path] = field(default_factory=dict)

    @property
    def admin(self) -> Path:
        return next(iter(self.admins.values()))

    @property
    def admin_user(self) -> str:
        return next(iter(self.admins))

    @classmethod
    def from_dir(cls, path: str | Path) -> Kits:
        """Kits of a ``prod_NN`` folder, or the newest one under a provisioning workspace / ``--out`` DIR."""
        path = Path(path).resolve()
        prods = [path] if path.name.startswith("prod_") else sorted(
            (p for p in path.rglob("prod_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[-1]))
        if not prods:
            raise DeployError(f"no provisioned startup kits (prod_NN folder) under {str(path)!r}")
        root = prods[-1]
        server, clients, admins = None, {}, {}
        for kit in sorted(p for p in root.iterdir() if (p / "startup").is_dir()):
            startup = kit / "startup"
            if (startup / "fed_server.json").is_file():
                server = kit
            elif (startup / "fed_client.json").is_file():
                clients[kit.name] = kit
            elif (startup / "fed_admin.json").is_file():
                admins[kit.name] = kit
        if server is None or not admins:
            raise DeployError(f"{str(root)!r} lacks a server or an admin startup kit")
        return cls(root, server, clients, admins)

    def describe(self) -> str:
        lines = [f"server kit:  {self.server}"]
        lines += [f"site kit:    {kit}   ({name})" for name, kit in self.clients.items()]
        lines += [f"admin kit:   {kit}   ({name})" for name, kit in self.admins.items()]
        return "\n".join(lines)


def provision(spec: ProjectSpec, out_dir: str | Path, server_storage: str | Path | None = None) -> Kits:
    """Write ``out_dir/project.yml`` and provision it into ``out_dir/workspace`` (NVFlare's provisioner,
    the same code as ``nvflare provision -p out_dir/project.yml -w out_dir/workspace``)."""
    spec.validate()
    from nvflare.lighter.constants import CtxKey, WorkDir
    from nvflare.lighter.provision import prepare_builders, prepare_packager, prepare_project
    from nvflare.lighter.provisioner import Provisioner

    out_dir = Path(out_dir).resolve()
    project_yml = write_project_yml(spec, out_dir)
    project_dict = spec.to_project_dict()
    project_dict["gen_scripts"] = False
    try:
        project = prepare_project(project_dict)
    except ValueError as exc:
        raise DeployError(f"NVFlare rejected the project: {exc}") from exc
    provisioner = Provisioner(str(out_dir / "workspace"), prepare_builders(project_dict),
                              prepare_packager(project_dict))
    ctx = provisioner.provision(project)
    if ctx.get(CtxKey.BUILD_ERROR):
        raise DeployError("NVFlare provisioning failed: " + "; ".join(ctx.get(CtxKey.ERRORS, [])))
    kits = Kits.from_dir(ctx.get(WorkDir.CURRENT_PROD_DIR) or out_dir / "workspace")
    classes = recipe_component_classes()
    allow_components(kits.server, classes["server"])
    for kit in kits.clients.values():
        allow_components(kit, classes["client"])
    if server_storage:
        set_server_storage(kits.server, server_storage)
    write_site_privacy_files(kits)
    (out_dir / "kits.json").write_text(json.dumps({
        "project_yml": str(project_yml), "root": str(kits.root), "server": str(kits.server),
        "clients": {k: str(v) for k, v in kits.clients.items()},
        "admins": {k: str(v) for k, v in kits.admins.items()}}, indent=2))
    return kits


POLICY_TEMPLATE = {"dp_epsilon": 0, "dp_delta": 1e-5, "lifetime_epsilon": 0, "max_eval_queries": None,
                   "comment": "this hospital's own privacy policy, applied to every job: dp_epsilon > 0 trains every "
                              "job by DP-SGD with at most this (epsilon, delta) per training image (0: the job "
                              "decides); lifetime_epsilon > 0 bounds the epsilon of all jobs together (the ledger "
                              "beside this file adds them up); max_eval_queries bounds how often any model is "
                              "scored on this site's validation and test images (null: no bound)"}


def write_site_privacy_files(kits: Kits) -> None:
    """Into each site kit's ``local/``: a privacy policy for its admin to set (off until edited), and NVFlare's
    ``privacy.json`` whose default scope runs that policy as a filter on every task result. No secure-aggregation
    key: each site makes its own on first use (fedbrain.secagg), beside its kit."""
    from fedbrain.fl.policy_filter import PRIVACY_JSON
    from fedbrain.runs import SITE_POLICY_FILE

    for site in sorted(kits.clients):
        local = kits.clients[site] / "local"
        # NVFlare's site privacy scope: the policy filter sees every result of every job before it leaves
        (local / "privacy.json").write_text(json.dumps(PRIVACY_JSON, indent=1))
        policy = local / SITE_POLICY_FILE
        if not policy.exists():
            policy.write_text(json.dumps(POLICY_TEMPLATE, indent=1))


def _edit_resources(kit: str | Path, edit) -> Path:
    """Apply ``edit(dict)`` to a kit's ``local/resources.json`` (created from ``resources.json.default``)."""
    local = Path(kit) / "local"
    path = local / "resources.json"
    res = json.loads((path if path.is_file() else local / "resources.json.default").read_text())
    edit(res)
    path.write_text(json.dumps(res, indent=2))
    return path


def _component_paths(obj, out: set[str]) -> set[str]:
    if isinstance(obj, dict):
        for key in ("path", "class_path"):
            v = obj.get(key)
            if isinstance(v, str) and "." in v and "/" not in v:
                out.add(v)
        for v in obj.values():
            _component_paths(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _component_paths(v, out)
    return out


def job_component_classes(job_dir: str | Path) -> dict[str, set[str]]:
    """Classes an exported NVFlare job asks the server (``server``) and the sites (``client``) to build."""
    out: dict[str, set[str]] = {"server": set(), "client": set()}
    for cfg in Path(job_dir).rglob("config_fed_*.json"):
        role = "server" if cfg.name == "config_fed_server.json" else "client"
        _component_paths(json.loads(cfg.read_text()), out[role])
    return out


def recipe_component_classes() -> dict[str, set[str]]:
    """Every class any fedbrain recipe (FedAvg, FedProx, SCAFFOLD; with and without cross-site evaluation)
    asks the server and the sites to build: exported once here, so provisioning tracks the recipes."""
    import tempfile

    from fedbrain.fl.recipes import build_recipe
    from fedbrain.settings import ALGORITHMS, JobSettings

    out: dict[str, set[str]] = {"server": set(), "client": set()}
    for algorithm in ALGORITHMS:
        for cse in (True, False):
            try:
                recipe = build_recipe(JobSettings.create(algorithm, cross_site_eval=cse),
                                      ["site-a", "site-b"], {"site-a": "/a.csv", "site-b": "/b.csv"})
            except ValueError:  # a combination the recipes do not offer (e.g. SCAFFOLD + cross-site eval)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                recipe.export(job_dir=tmp)
                for role, classes in job_component_classes(tmp).items():
                    out[role] |= classes
    return out


def allow_components(kit: str | Path, classes: set[str] | list[str] = (),
                     prefixes: tuple[str, ...] = ALLOWED_PACKAGES) -> Path:
    """Add fedbrain's job components to the kit's ``class_allow_list``: NVFlare 2.9 builds only listed
    classes, and its provisioned default lists neither fedbrain's classes nor, e.g., PTFileModelPersistor."""
    extra = list(prefixes) + sorted(c for c in classes if not any(c.startswith(p) for p in prefixes))

    def edit(res: dict) -> None:
        allow = res.setdefault("class_allow_list", [])
        allow += [c for c in extra if c not in allow]

    return _edit_resources(kit, edit)


def set_server_storage(server_kit: str | Path, storage: str | Path) -> Path:
    """Keep the server's job store and snapshots in ``storage``, not NVFlare's default ``/tmp/nvflare``."""
    storage = Path(storage).resolve()

    def edit(res: dict) -> None:
        for comp in res.get("components", []):
            if comp.get("id") == "job_manager":
                comp.setdefault("args", {})["uri_root"] = str(storage / "jobs-storage")
        snap = res.get("snapshot_persistor", {}).get("args", {})
        if "storage" in snap:
            snap["storage"].setdefault("args", {})["root_dir"] = str(storage / "snapshot-storage")

    return _edit_resources(server_kit, edit)


# ---------------------------------------------------------------- the running system (admin kit)


def admin_username(admin_kit: str | Path) -> str:
    cfg = json.loads((Path(admin_kit) / "startup" / "fed_admin.json").read_text())
    return cfg["admin"]["username"]


def admin_session(admin_kit: str | Path, username: str | None = None, timeout: float = 10.0):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    return new_secure_session(username=username or admin_username(admin_kit),
                              startup_kit_location=str(Path(admin_kit).resolve()), timeout=timeout)


def connected_clients(admin_kit: str | Path, username: str | None = None, timeout: float = 10.0) -> list[str]:
    sess = admin_session(admin_kit, username, timeout)
    try:
        return sorted(c.name for c in sess.get_system_info().client_info)
    finally:
        sess.close()


def wait_for_clients(admin_kit: str | Path, sites: list[str], timeout: float = 120.0,
                     username: str | None = None, poll: float = 2.0) -> list[str]:
    """Poll the server until every site in ``sites`` is connected; ``TimeoutError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    last_error = None
    while True:
        try:
            left = max(1.0, deadline - time.monotonic())
            seen = connected_clients(admin_kit, username, timeout=min(10.0, left))
            if set(sites) <= set(seen):
                return seen
        except Exception as exc:  # server not up yet: keep polling until the deadline
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"sites {sorted(set(sites) - set(seen))} not connected after {timeout:.0f} s "
                               f"(connected: {seen}; last error: {last_error})")
        time.sleep(poll)


def shutdown_all(admin_kit: str | Path, username: str | None = None, wait: bool = True,
                 timeout: float = 60.0) -> None:
    """The admin console's ``shutdown all``: the server stops every client, then itself. With ``wait``,
    returns once the server no longer answers (``TimeoutError`` after ``timeout`` s)."""
    from nvflare.fuel.flare_api.api_spec import TargetType

    sess = admin_session(admin_kit, username, timeout=min(10.0, timeout))
    try:
        sess.shutdown(TargetType.ALL, wait=wait, timeout=timeout)
    finally:
        try:
            sess.close()
        except Exception:
            pass


# ---------------------------------------------------------------- submitting a job (ProdEnv)


def parse_assignments(items: list[str] | None, flag: str) -> dict[str, str]:
    """``["hospital-a=/data/a.csv", ...]`` -> ``{"hospital-a": "/data/a.csv"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        site, sep, value = item.partition("=")
        site, value = site.strip(), value.strip()
        if not sep or not site or not value:
            raise DeployError(f"{flag} expects SITE=VALUE, got {item!r}")
        check_site_name(site)
        if site in out:
            raise DeployError(f"{flag} given twice for site {site!r}")
        out[site] = value
    return out


def site_split_files(sites: list[str], site_splits: dict[str, str] | None,
                     site_dir: str | None) -> dict[str, str]:
    """Each site's split file: given by ``site_splits``, else ``<site_dir>/splits/<site>.csv``.

    These are paths on each hospital's own machine; nothing here checks they exist (they need not exist
    on the machine that submits)."""
    site_splits = dict(site_splits or {})
    unknown = sorted(set(site_splits) - set(sites))
    if unknown:
        raise DeployError(f"--site-split for {unknown}, which are not among the job's sites {sites}")
    missing = [s for s in sites if s not in site_splits]
    if missing and not site_dir:
        raise DeployError(f"no split file for {missing}: pass --site-split SITE=/path/on/that/site.csv for "
                          "each site, or --site-dir DIR where every site keeps DIR/splits/<site>.csv")
    for s in missing:
        site_splits[s] = str(RunDir(site_dir).split_file(s))
    return site_splits


def prod_job_inputs(settings, sites: list[str], site_splits: dict[str, str] | None = None,
                    site_dir: str | None = None, site_log_dir: str | None = None):
    """``(split_files, log_dirs)`` for :func:`fedbrain.fl.recipes.build_recipe` in a deployment.

    Every path is on the hospitals' machines: each site gets its own ``--split-file`` and ``--log-dir``
    (default ``<site_dir>/logs``). Nothing here is a server path (the server keeps its audit and round
    checkpoints in its own job folder)."""
    split_files = site_split_files(sites, site_splits, site_dir)
    log_dir = site_log_dir or (str(Path(site_dir) / "logs") if site_dir else None)
    return split_files, (dict.fromkeys(sites, log_dir) if log_dir else None)


@dataclass
class SubmitResult:
    job_id: str
    status: str | None
    seconds: float
    result_dir: Path | None = None
    global_model: Path | None = None
    best_model: Path | None = None
    checkpoint: Path | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.status == "FINISHED:COMPLETED" and self.global_model and not self.error)


def job_progress(session, job_id: str) -> dict:
    """The server controller's progress of a running job (round, rounds, each site's last answer), via the
    admin API's ``show_stats``; {} when the server does not say (yet)."""
    from fedbrain.fl.controller import PROGRESS_GROUP

    try:
        stats = session.show_stats(job_id, "server") or {}
    except Exception:
        return {}
    server = stats.get("server", stats) if isinstance(stats, dict) else {}
    info = server.get(PROGRESS_GROUP) if isinstance(server, dict) else None
    return info if isinstance(info, dict) else {}


def follow_job(admin_kit: str | Path, job_id: str, env, on_progress, deadline: float, username: str | None = None,
               poll_s: float = 3.0) -> str | None:
    """Call ``on_progress(job_id, status, progress)`` until the job finishes or ``deadline`` (monotonic) passes."""
    status = None
    session = None
    try:
        session = admin_session(admin_kit, username)
    except Exception:  # progress is a courtesy: the job's result is still fetched
        session = None
    try:
        while time.monotonic() < deadline:
            try:
                status = env.get_job_status(job_id) or status
            except Exception:
                pass
            if (status or "").startswith("FINISHED"):
                break
            on_progress(job_id, status, job_progress(session, job_id) if session else {})
            time.sleep(poll_s)
    finally:
        if session is not None:
            try:
                session.close()
            except Exception:
                pass
    return status


def abort_job(admin_kit: str | Path, job_id: str, username: str | None = None) -> None:
    """Abort a deployed job (``fedbrain runs stop`` of a ``fedbrain submit`` run)."""
    session = admin_session(admin_kit, username)
    try:
        session.abort_job(job_id)
    finally:
        session.close()


def check_finite(state: dict) -> list[str]:
    """Names of floating-point tensors that hold NaN/Inf."""
    import torch

    return [k for k, v in state.items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]


def submit(settings, sites: list[str], admin_kit: str | Path, site_splits: dict[str, str] | None = None,
           site_dir: str | None = None, site_log_dir: str | None = None, cache_dir: str | None = None,
           timeout: float = 3600.0,
           out_dir: str | Path | None = None, username: str | None = None, login_timeout: float = 10.0,
           abort_on_timeout: bool = True, label_schemes: dict[str, str] | None = None,
           on_progress=None, poll_s: float = 3.0) -> SubmitResult:
    """Run the fedbrain recipe on a running provisioned deployment with ``ProdEnv`` and fetch its result.

    ``site_splits`` / ``site_dir`` / ``site_log_dir`` / ``cache_dir`` are paths on the hospitals'
    machines (see :func:`prod_job_inputs`). Waits at most ``timeout`` s; then aborts the job unless
    ``abort_on_timeout`` is false. The result's ``global_model`` is the downloaded ``FL_global_model.pt``;
    with ``out_dir``, it is also saved as ``out_dir/checkpoints/last.pt`` (a fedbrain checkpoint).
    ``on_progress(job_id, status, progress)`` is called every ``poll_s`` s while the job runs, with NVFlare's job
    status and the server controller's progress (:func:`job_progress`).
    """
    from nvflare.recipe import ProdEnv

    from fedbrain.checkpoint import global_state
    from fedbrain.fl.recipes import build_recipe
    from fedbrain.fl.runlog import finish_deployed_run, server_models

    sites = parse_sites(sites)
    admin_kit = Path(admin_kit).resolve()
    if not (admin_kit / "startup" / "fed_admin.json").is_file():
        raise DeployError(f"{str(admin_kit)!r} is not an admin startup kit (no startup/fed_admin.json)")
    username = username or admin_username(admin_kit)
    split_files, log_dirs = prod_job_inputs(settings, sites, site_splits, site_dir, site_log_dir)
    recipe = build_recipe(settings, sites, split_files, cache_dir=cache_dir, log_dirs=log_dirs)
    env = ProdEnv(startup_kit_location=str(admin_kit), username=username, login_timeout=login_timeout)
    t0 = time.perf_counter()
    run = recipe.run(env)
    job_id = run.get_job_id()
    deadline = time.monotonic() + timeout
    if on_progress is not None:
        follow_job(admin_kit, job_id, env, on_progress, deadline, username=username, poll_s=poll_s)
    result = run.get_result(timeout=max(1.0, deadline - time.monotonic()))
    status = run.get_status()
    seconds = time.perf_counter() - t0
    if result is None and abort_on_timeout and not (status or "").startswith("FINISHED"):
        try:
            env.abort_job(job_id)
            deadline = time.monotonic() + 30  # bounded: report the aborted state when it comes
            while not (status or "").startswith("FINISHED") and time.monotonic() < deadline:
                time.sleep(2)
                status = env.get_job_status(job_id) or status
        except Exception:
            pass
    out = SubmitResult(job_id, status, seconds, Path(result) if result else None)
    out.global_model, out.best_model = server_models(out.result_dir)  # the best by the pooled validation score
    if out.global_model is not None:
        bad = check_finite(global_state(out.global_model))
        if bad:
            out.error = f"the global model has non-finite weights in {bad[:5]}"
    if out_dir:
        run_out = RunDir(out_dir)
        run_out.root.mkdir(parents=True, exist_ok=True)
        if out.global_model is not None and not out.error:  # the run folder of a simulated run: log, models, results
            finish_deployed_run(run_out, settings, out.result_dir, label_schemes or {}, {"sites": sites},
                                deployment="nvflare-prod", job_id=job_id)
            out.checkpoint = run_out.last if run_out.last.is_file() else None
        run_out.deploy_result.write_text(json.dumps({
            "job_id": job_id, "status": status, "ok": out.ok, "error": out.error, "seconds": seconds,
            "result_dir": str(out.result_dir) if out.result_dir else None,
            "global_model": str(out.global_model) if out.global_model else None,
            "checkpoint": str(out.checkpoint) if out.checkpoint else None,
            "sites": sites, "job": settings.to_dict()}, indent=2))
    return out
