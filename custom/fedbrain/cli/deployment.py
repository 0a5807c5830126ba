"""Deployment sub-commands: ``provision``, ``submit`` and ``data split`` (see docs/deployment.md).

* ``fedbrain provision``: NVFlare ``project.yml`` + mutual-TLS startup kits (server, hospitals, admin).
* ``fedbrain submit``: the ``simulate`` recipe on a running deployment through ``ProdEnv`` + the admin kit.
* ``fedbrain data split``: what a hospital runs on its own data to make the split file its kit trains on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedbrain.cli.options import (
    NON_NEGATIVE,
    PORT,
    POSITIVE,
    UsageError,
    add_federation_args,
    add_job_args,
    default_text,
    job_settings,
    load_federation,
    save_config,
)


def _deploy():
    """``fedbrain.fl.deploy``, whose NVFlare imports are lazy: the CLI loads even without NVFlare."""
    from fedbrain.fl import deploy

    return deploy


# ---------------------------------------------------------------- provision


def cmd_provision(args: argparse.Namespace) -> int:
    d = _deploy()
    try:
        version = d.nvflare_version()
        spec = d.ProjectSpec(sites=d.parse_sites(args.sites), server_host=args.server_host,
                             fed_port=args.fed_port, admin_port=args.admin_port, admin=args.admin,
                             project=args.project, org=args.org)
        spec.validate()
        out = Path(args.out).resolve()
        print(f"provisioning project {spec.project!r} with NVFlare {version}: server {spec.server_host} "
              f"(FL port {spec.fed_port}, admin port {spec.admin_port}), {len(spec.sites)} hospital(s), "
              f"admin {spec.admin}", flush=True)
        kits = d.provision(spec, out, server_storage=args.server_storage)
    except d.DeployError as exc:
        raise UsageError(str(exc)) from exc
    print(f"\nproject.yml: {out / 'project.yml'}   (re-run: nvflare provision -p {out / 'project.yml'} "
          f"-w {out / 'workspace'})")
    print(f"startup kits ({kits.root}), mutual TLS, each signed by this project's own root CA:")
    print(f"  server   {spec.server_host:<20} {kits.server}")
    for name, kit in kits.clients.items():
        print(f"  site     {name:<20} {kit}")
    for name, kit in kits.admins.items():
        print(f"  admin    {name:<20} {kit}")
    first = spec.sites[0]
    print(f"""
next steps (details: docs/deployment.md)
  1. Hand each participant ONLY its own kit folder, over a secure channel: it holds that participant's
     private key. Every machine needs fedbrain installed (pip install fedbrain; same version everywhere).
  2. Server machine ({spec.server_host}; ports {spec.fed_port}, {spec.admin_port} reachable from the sites):
       {kits.server}/startup/start.sh
  3. Each hospital, on its own machine, makes its split file from its own data, then starts its kit:
       fedbrain data split --site-config my_site.toml --out /srv/fedbrain   # writes splits/{first}.csv
       {kits.clients[first]}/startup/start.sh
  4. The admin submits a job (waits for the hospitals, runs it, downloads the global model):
       fedbrain submit --admin-kit {kits.admin} --sites {','.join(spec.sites)} \\
         --site-split {first}=/srv/fedbrain/splits/{first}.csv ... --rounds 5
  5. Stop everything: the admin console ({kits.admin}/startup/fl_admin.sh) -> `shutdown all`.""")
    if not args.server_storage:
        print("\nnote: the server keeps its job store under /tmp/nvflare (NVFlare's default); pass "
              "--server-storage DIR (a folder on the server machine) to keep it elsewhere.")
    return 0


# ---------------------------------------------------------------- submit


def cmd_submit(args: argparse.Namespace) -> int:
    from fedbrain.fl.runlog import RunLog, server_progress
    from fedbrain.runs import RunDir
    from fedbrain.status import FAILED, FINISHED, STOPPED, StatusWriter, from_controller

    d = _deploy()
    try:
        d.nvflare_version()
        admin_kit = _admin_kit(d, args.admin_kit)
        splits = d.parse_assignments(args.site_split, "--site-split")
        schemes = d.parse_assignments(args.site_scheme, "--site-scheme")
        sites = d.parse_sites(args.sites) if args.sites else list(splits)
        if not sites:
            raise d.DeployError("name the job's sites: --sites hospital-a,hospital-b "
                                "(or give --site-split for each)")
        settings = job_settings(args)
        d.prod_job_inputs(settings, sites, splits, args.site_dir, args.site_log_dir)  # fail early
        if args.wait_for_sites > 0:
            print(f"waiting up to {args.wait_for_sites:.0f} s for {', '.join(sites)} to be connected ...",
                  flush=True)
            try:
                d.wait_for_clients(admin_kit, sites, timeout=args.wait_for_sites, username=args.username)
            except TimeoutError as exc:
                raise d.DeployError(f"{exc}; is every hospital's kit running (startup/start.sh)?") from exc
    except d.DeployError as exc:
        raise UsageError(str(exc)) from exc
    run_dir = RunDir.create(args.workspace, f"deploy-{settings.algorithm}-{settings.model}")
    run_dir.write_config(kind="federated", deployment="nvflare-prod", algorithm=settings.algorithm,
                         model=settings.model, job=settings.to_dict(), sites=sites, admin_kit=str(admin_kit),
                         site_splits=splits, site_dir=args.site_dir, site_log_dir=args.site_log_dir,
                         argv=sys.argv[1:])
    save_config(args, run_dir)
    print(f"run: {run_dir}")
    print(f"{settings.algorithm} on {len(sites)} sites ({', '.join(sites)}), {settings.rounds} rounds, model "
          f"{settings.model}; submitting with ProdEnv (admin kit {admin_kit})", flush=True)
    status = StatusWriter(run_dir, kind="federated", deployment="nvflare-prod", algorithm=settings.algorithm,
                          model=settings.model, sites={s: {} for s in sites}, done=0, total=settings.rounds,
                          unit="round", admin_kit=str(admin_kit))
    log = RunLog(run_dir)  # metrics.jsonl grows with the server's pooled validation while the job runs
    try:
        res = d.submit(settings, sites, admin_kit, site_splits=splits or None, site_dir=args.site_dir,
                       site_log_dir=args.site_log_dir, cache_dir=args.site_cache_dir, timeout=args.timeout,
                       out_dir=run_dir, username=args.username, abort_on_timeout=not args.keep_running,
                       label_schemes=schemes or None, on_progress=DeployedProgress(status, settings.rounds, log))
    except BaseException as exc:
        status.finish(FAILED, error=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, d.DeployError):
            raise UsageError(str(exc)) from exc
        raise
    finally:
        log.close()
    status.update(job_id=res.job_id, job_status=res.status, **from_controller(server_progress(res.result_dir)))
    if res.ok:
        status.finish(FINISHED, **final_headline(run_dir))
    elif (res.status or "").endswith("ABORTED") and run_dir.stop_request.is_file():
        status.finish(STOPPED, error=f"job {res.job_id} aborted by `fedbrain runs stop`")
    else:
        status.finish(FAILED, error=res.error or f"job {res.job_id} ended {res.status}")
    print(f"\njob {res.job_id}: {res.status} after {res.seconds:.0f} s")
    if res.result_dir:
        print(f"job result (server workspace): {res.result_dir}")
    if res.ok:
        print(f"global model: {res.global_model}")
        print(f"fedbrain checkpoint: {res.checkpoint}   (fedbrain evaluate {res.checkpoint} ...)")
        return 0
    if res.result_dir is None and not (res.status or "").startswith("FINISHED"):
        print(f"fedbrain: error: job {res.job_id} did not finish within {args.timeout:.0f} s "
              f"({'left running' if args.keep_running else 'aborted'})", file=sys.stderr)
        return 4
    why = res.error or "without a usable global model"
    print(f"fedbrain: error: job {res.job_id} ended {res.status}: {why}; see the server and site logs "
          "(log.txt in each kit's <job id> folder)", file=sys.stderr)
    return 3


def final_headline(run) -> dict:
    """``status.json``'s best round and headline of a finished federated run (from its ``results.json``)."""
    from fedbrain.evaluation import UNION
    from fedbrain.runs import read_json
    from fedbrain.status import headline_of

    results = read_json(run.results) or {}
    return {"best_round": results.get("best_round"), "headline": headline_of((results.get("test") or {}).get(UNION))}


class DeployedProgress:
    """``status.json`` of a ``fedbrain submit`` run from the deployed server's progress, one line per round."""

    def __init__(self, status, rounds: int, log=None):
        self.status, self.rounds, self.printed = status, rounds, None
        self.log = log  # a fedbrain.fl.runlog.RunLog: the run log's global rows grow with the server's progress

    def __call__(self, job_id: str, job_status: str | None, progress: dict) -> None:
        from fedbrain.status import from_controller, progress_text

        if self.log is not None:
            self.log.add_progress(progress)
        server = from_controller(progress)
        doc = self.status.progress(server.pop("done", 0), progress.get("num_rounds") or self.rounds,
                                   job_id=job_id, job_status=job_status,
                                   state="running" if (job_status or "").startswith("RUNNING") else "starting",
                                   **server)
        line = f"  job {job_id} {job_status or 'submitted'}: {progress_text(doc)}"
        if line != self.printed:
            print(line, flush=True)
            self.printed = line


def _admin_kit(d, path: str) -> Path:
    p = Path(path).expanduser().resolve()
    if (p / "startup" / "fed_admin.json").is_file():
        return p
    if p.is_dir():  # a `fedbrain provision --out` folder or an NVFlare workspace: its (only) admin kit
        return d.Kits.from_dir(p).admin
    raise d.DeployError(f"--admin-kit {path!r} does not exist")


# ---------------------------------------------------------------- data split


def cmd_data_split(args: argparse.Namespace) -> int:
    from fedbrain.data.federation import summary_table
    from fedbrain.runs import RunDir

    fed = load_federation(args)
    out = RunDir(Path(args.out).resolve())
    fed.write(out.root)
    print(summary_table(fed.summary))
    print(f"\nwrote {out.data_summary}")
    for name in fed.sites:
        print(f"split file of {name}: {out.split_file(name)}")
    names = list(fed.sites)
    example = out.split_file(names[0])
    print(f"\nThese files stay on this machine (they list local image paths). Tell the coordinator only the "
          f"site name and the split file's path, e.g. --site-split {names[0]}={example}, or run the job with "
          f"--site-dir {out}.")
    return 0


# ---------------------------------------------------------------- registration


def register(groups) -> None:
    sub = groups.top
    p = sub.add_parser("provision",
                       help="NVFlare project.yml + mutual-TLS startup kits (server, hospitals, admin)")
    p.add_argument("--sites", required=True,
                   help="comma-separated hospital names, e.g. hospital-a,hospital-b")
    p.add_argument("--out", required=True, help="folder for project.yml and the provisioned workspace")
    p.add_argument("--server-host", default="localhost",
                   help="the server's host name as the hospitals reach it; also its TLS identity "
                        "(default localhost)")
    p.add_argument("--fed-port", type=PORT, default=8002,
                   help="FL port the hospitals connect to (default 8002)")
    p.add_argument("--admin-port", type=PORT, default=8003, help="admin port (default 8003)")
    p.add_argument("--admin", default="admin@fedbrain.local", help="the project admin's e-mail-style name")
    p.add_argument("--project", default="fedbrain")
    p.add_argument("--org", default="fedbrain", help="organisation written into every certificate")
    p.add_argument("--server-storage", default=None,
                   help="folder on the server machine for its job store (default NVFlare's /tmp/nvflare)")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("submit", help="run the federated job on a provisioned deployment (NVFlare ProdEnv)")
    g = p.add_argument_group("deployment")
    g.add_argument("--admin-kit", required=True,
                   help="the admin's startup kit folder (or the `fedbrain provision --out` folder)")
    g.add_argument("--username", default=None, help="admin user name (default: the one in the admin kit)")
    g.add_argument("--sites", default=None,
                   help="comma-separated sites of the job (default: the --site-split ones)")
    g.add_argument("--site-split", action="append", default=[], metavar="SITE=PATH",
                   help="a site's split file, as a path ON THAT SITE's machine (repeatable)")
    g.add_argument("--site-dir", default=None,
                   help="a folder path valid at every site: sites without --site-split read "
                        "DIR/splits/<site>.csv, and log to DIR/logs")
    g.add_argument("--site-log-dir", default=None,
                   help="where each site appends its own per-round metrics (DIR/metrics.jsonl on that "
                        "site's machine; default <site-dir>/logs)")
    g.add_argument("--site-cache-dir", default=None, help="decoded-image cache path at the sites")
    g.add_argument("--site-scheme", action="append", default=[], metavar="SITE=SCHEME",
                   help="a site's label scheme (binary, tumour_type, multiclass), recorded in the checkpoint")
    g.add_argument("--timeout", type=POSITIVE, default=3600.0, help="seconds to wait for the job (default 3600)")
    g.add_argument("--wait-for-sites", type=NON_NEGATIVE, default=120.0,
                   help="seconds to wait for every site to be connected before submitting (0: do not check)")
    g.add_argument("--keep-running", action="store_true",
                   help="on timeout leave the job running (default: abort it)")
    p.add_argument("--seed", type=int, default=None, help=f"the training's seed (default {default_text('local.seed')})")
    add_job_args(p, resume=False)  # a deployed job does not resume (the flag was checked, then ignored)
    p.set_defaults(func=cmd_submit)

    p = groups.group("data").add_parser("split",
                                        help="a hospital's own leak-free split file + data summary (for its kit)")
    add_federation_args(p)
    p.add_argument("--out", required=True, help="writes OUT/splits/<site>.csv and OUT/data_summary.json")
    p.set_defaults(func=cmd_data_split)
