"""``jobs/<algorithm>/job.py``: build the NVFlare recipe from flags; run it in SimEnv/PocEnv/ProdEnv or export it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedbrain.cli.options import (
    PORT,
    POSITIVE,
    Parser,
    UsageError,
    add_federation_args,
    add_job_args,
    job_settings,
    load_federation,
    save_config,
)


def job_main(algorithm: str, argv: list[str] | None = None) -> int:
    p = Parser(description=f"fedbrain {algorithm} job (NVFlare recipe)")
    add_federation_args(p, job=True)
    add_job_args(p, algorithm=False, resume=False)
    p.add_argument("--env", choices=["sim", "poc", "prod"], default="sim")
    p.add_argument("--startup-kit", help="admin startup kit folder (prod)")
    p.add_argument("--fed-port", type=PORT, default=8002, help="POC: the server's FL port on 127.0.0.1")
    p.add_argument("--admin-port", type=PORT, default=8003, help="POC: the server's admin port on 127.0.0.1")
    p.add_argument("--export-to", help="write the NVFlare job folder here instead of running it")
    p.add_argument("--run-dir", default=None, help="where splits and site logs go (default: a new workspace run)")
    p.add_argument("--timeout", type=POSITIVE, default=3600.0, help="POC / prod: seconds to follow the job")
    args = p.parse_args(argv)
    args.set_values = [f"algorithm={algorithm}", *args.set_values]  # the job script's algorithm
    try:
        return _run(algorithm, args)
    except UsageError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        return 2


def _run(algorithm: str, args: argparse.Namespace) -> int:
    from fedbrain.fl.recipes import build_recipe
    from fedbrain.runs import RunDir

    fed = load_federation(args, progress=False)
    settings = job_settings(args, fed)
    if settings.algorithm != algorithm:
        raise UsageError(f"this job script runs {algorithm}, not {settings.algorithm}: use jobs/{settings.algorithm}/")
    if args.env == "sim" and not args.export_to:
        from fedbrain.fl.simulate import run_simulation

        run = RunDir(args.run_dir) if args.run_dir else RunDir.create(args.workspace, f"{algorithm}-{settings.model}")
        save_config(args, run)
        summary = run_simulation(fed, settings, run)
        print(summary.get("rounds_table", ""))
        print(f"run folder: {run}")
        return 3 if summary.get("failed_sites") else 0
    run = RunDir(Path(args.run_dir or Path(args.workspace) / f"{algorithm}-job").resolve())
    fed.write(run.root)
    save_config(args, run)
    recipe = build_recipe(settings, list(fed.sites), run.split_files(list(fed.sites)), run_dir=str(run))
    if args.export_to:
        recipe.export(args.export_to)
        print(f"exported NVFlare job to {args.export_to}")
        return 0
    if args.env == "poc":
        from fedbrain.fl.poc import loopback_poc_env

        env = loopback_poc_env(list(fed.sites), Path(args.workspace) / "poc", args.fed_port, args.admin_port)
    else:
        from nvflare.recipe import ProdEnv

        if not args.startup_kit:
            raise UsageError("--env prod needs --startup-kit (the admin's startup kit folder)")
        env = ProdEnv(startup_kit_location=args.startup_kit)
    return _follow(recipe.execute(env), env, run, settings, args, {n: s.scheme for n, s in fed.sites.items()})


def _follow(job, env, run, settings, args, label_schemes: dict[str, str]) -> int:
    """Wait for a POC / production job, keeping the run's status.json current (as ``fedbrain submit`` does)."""
    import time

    from fedbrain.cli.deployment import DeployedProgress, final_headline
    from fedbrain.fl.deploy import follow_job
    from fedbrain.fl.runlog import RunLog, finish_deployed_run
    from fedbrain.status import FAILED, FINISHED, StatusWriter

    job_id = job.get_job_id()
    print(f"submitted job {job_id}; following it (Ctrl+C stops following, not the job)", flush=True)
    status = StatusWriter(run, kind="federated", deployment=args.env, algorithm=settings.algorithm,
                          model=settings.model, total=settings.rounds, done=0, unit="round", job_id=job_id)
    if args.env == "poc":
        from fedbrain.fl.poc import poc_admin_kit

        kit = poc_admin_kit(env)
    else:
        kit = Path(args.startup_kit)
    log = RunLog(run)  # metrics.jsonl grows with the server's pooled validation while the job runs
    try:
        follow_job(kit, job_id, env, DeployedProgress(status, settings.rounds, log), time.monotonic() + args.timeout)
    finally:
        log.close()
    result = job.get_result(timeout=60)
    final = job.get_status()
    ok = final == "FINISHED:COMPLETED"
    if ok:  # the run folder a simulated run gets: run log, checkpoints, results.json
        finish_deployed_run(run, settings, Path(result) if result else None, label_schemes,
                            {"sites": list(label_schemes)}, deployment=args.env, job_id=job_id)
    status.finish(FINISHED if ok else FAILED, error=None if ok else f"job {job_id} ended {final}", job_status=final,
                  **(final_headline(run) if ok else {}))
    print(f"job {job_id}: {final}")
    return 0 if ok else 3
