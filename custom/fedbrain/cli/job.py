"""``jobs/<algorithm>/job.py``: build the NVFlare recipe from flags; run it in SimEnv/PocEnv/ProdEnv or export it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedbrain.cli.options import UsageError, add_federation_args, add_job_args, job_settings, load_federation


def job_main(algorithm: str, argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=f"fedbrain {algorithm} job (NVFlare recipe)")
    add_federation_args(p)
    add_job_args(p)
    p.add_argument("--env", choices=["sim", "poc", "prod"], default="sim")
    p.add_argument("--startup-kit", help="admin startup kit folder (prod)")
    p.add_argument("--fed-port", type=int, default=8002, help="POC: the server's FL port on 127.0.0.1")
    p.add_argument("--admin-port", type=int, default=8003, help="POC: the server's admin port on 127.0.0.1")
    p.add_argument("--export-to", help="write the NVFlare job folder here instead of running it")
    p.add_argument("--run-dir", default=None, help="where splits and site logs go (default: a new workspace run)")
    args = p.parse_args(argv)
    args.algorithm = algorithm
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
    if args.env == "sim" and not args.export_to:
        from fedbrain.fl.simulate import run_simulation

        run = RunDir(args.run_dir) if args.run_dir else RunDir.create(args.workspace, f"{algorithm}-{settings.model}")
        summary = run_simulation(fed, settings, run)
        print(summary.get("rounds_table", ""))
        print(f"run folder: {run}")
        return 3 if summary.get("failed_sites") else 0
    run = RunDir(Path(args.run_dir or Path(args.workspace) / f"{algorithm}-job").resolve())
    fed.write(run.root)
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
    run_ = recipe.execute(env)
    print(f"submitted job {run_.get_job_id()}; status {run_.get_status()}")
    return 0
