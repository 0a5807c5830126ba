"""Federation commands: ``simulate`` (the main job), ``compare``, ``bench federation`` and ``bench models``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedbrain.cli.options import (
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    UsageError,
    add_device_arg,
    add_federation_args,
    add_job_args,
    add_workspace_arg,
    cache_dir,
    check_finetune,
    epsilon_budget,
    job_settings,
    load_federation,
    run_config,
    save_config,
    teacher_path,
)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedbrain.data.federation import Federation
    from fedbrain.evaluation import results_table
    from fedbrain.fl.simulate import continue_from, is_unfinished, resume_in_place, run_simulation
    from fedbrain.runs import RunDir

    if args.resume and is_unfinished(RunDir(args.resume)):
        job_settings(args)  # the flags are still validated
        run_dir = RunDir(Path(args.resume).resolve())
        settings = resume_in_place(run_dir)
        fed = Federation.read(run_dir)  # the splits it recorded, whatever the data flags say now
        print(f"resuming {run_dir} at round {settings.start_round} ({settings.rounds} round(s) left; the run's own "
              "settings and splits are used)")
    else:
        fed = load_federation(args)
        settings = job_settings(args, fed)
        policies = site_policies(args.site_policy, list(fed.sites))
        run_dir = RunDir.create(args.workspace, f"{settings.algorithm}-{settings.model}")
        for site, policy in policies.items():  # each simulated hospital's admin file
            run_dir.site_policy(site).parent.mkdir(parents=True, exist_ok=True)
            run_dir.site_policy(site).write_text(Path(policy.source).read_text())
        if args.resume:
            continue_from(settings, Path(args.resume), run_dir)
        save_config(args, run_dir)
    print(f"run: {run_dir}")
    print(f"{settings.algorithm} with {len(fed.sites)} sites ({', '.join(fed.sites)}), {settings.rounds} rounds x "
          f"{_local_work(settings)}, model {settings.model}", flush=True)
    summary = run_simulation(fed, settings, run_dir, cache_dir=cache_dir(args))
    if "rounds_table" in summary:
        print("\n" + summary["rounds_table"])
    if "test" in summary:
        print("\nbest global model on each site's test split and their union:")
        print(results_table(summary["test"]))
    train = sum(summary.get("train_seconds_per_site", {}).values())
    print(f"\nsimulator wall time {summary['wall_seconds']:.0f} s (site training {train:.0f} s summed over sites)")
    print(f"run folder: {run_dir}")
    if summary.get("failed_sites"):
        for site, err in summary["failed_sites"].items():
            print(f"\nsite {site} FAILED:\n{err}", file=sys.stderr)
        print(f"\nfedbrain: {len(summary['failed_sites'])} site(s) failed; see {run_dir.nvflare}",
              file=sys.stderr)
        return 3
    if "error" in summary:
        print(f"fedbrain: error: {summary['error']}", file=sys.stderr)
        return 1
    return 0


def site_policies(specs: list[str] | None, sites: list[str]) -> dict:
    """``SITE=FILE`` (or ``all=FILE``) -> each simulated hospital's privacy policy, read and checked now."""
    from fedbrain.fl.policy import PolicyError, SitePolicy

    out = {}
    for spec in specs or []:
        site, sep, file = spec.partition("=")
        if not sep or not file:
            raise UsageError(f"--site-policy {spec!r}: expected SITE=FILE (or all=FILE)")
        if site != "all" and site not in sites:
            raise UsageError(f"--site-policy {spec!r}: no site {site!r} in this federation ({', '.join(sites)})")
        try:
            policy = SitePolicy.read(Path(file))
        except PolicyError as exc:
            raise UsageError(str(exc)) from exc
        out.update({s: policy for s in (sites if site == "all" else [site])})
    return out


def _local_work(settings) -> str:
    t = settings.train
    return f"{t.steps} local step(s)" if t.steps else f"{t.epochs} local epoch(s)"


def cmd_compare(args: argparse.Namespace) -> int:
    from fedbrain.experiments.compare import budget_epochs, compare_table, plan_modes, run_compare
    from fedbrain.runs import RunDir

    fed = load_federation(args)
    if args.leave_one_out and len(fed.sites) < 2:
        raise UsageError("--leave-one-out needs at least two hospitals")
    settings = job_settings(args, fed)
    dp = (settings.dp_clip, settings.dp_noise) if settings.dp_clip > 0 else None
    run_dir = RunDir.create(args.workspace, f"compare-{settings.model}")
    save_config(args, run_dir)
    settings.cross_site_eval = False
    settings.dp_clip = settings.dp_noise = 0.0  # DP only in its own 'fedavg+dp' row
    if settings.dp_epsilon > 0:
        raise UsageError("compare: give DP-SGD budgets with --dp-curve EPS ... (one row each), not --dp-epsilon")
    modes = plan_modes(fed, settings, args.algorithms, dp=dp, iid_control=args.iid_control, ablation=args.ablation,
                       legacy=args.legacy_row, baselines=args.baselines, leave_one_out=args.leave_one_out,
                       dp_curve=args.dp_curve)
    print(f"run: {run_dir}\nbudget: {budget_epochs(settings, fed)} epochs over the data for every mode "
          f"(federated: {settings.rounds} rounds); {len(modes)} modes x {len(args.seeds)} seed(s): "
          f"{', '.join(m.name for m in modes)}", flush=True)
    t0 = time.perf_counter()
    rows = run_compare(fed, settings, run_dir, modes, seeds=tuple(args.seeds), cache_dir=cache_dir(args))
    print("\n" + compare_table(rows, list(fed.sites)))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; results: {run_dir.compare_csv}")
    return 0


def cmd_bench_federation(args: argparse.Namespace) -> int:
    """Simulator wall time vs. the same local epochs trained without NVFlare (one process, site by site)."""
    from fedbrain.experiments.throughput import simulator_overhead
    from fedbrain.runs import RunDir

    fed = load_federation(args)
    settings = job_settings(args, fed)
    settings.cross_site_eval = False
    run_dir = RunDir.create(args.workspace, f"bench-federation-{settings.model}")
    save_config(args, run_dir)
    res = simulator_overhead(fed, settings, run_dir, cache_dir=cache_dir(args))
    if res.get("failed_sites"):
        print(f"fedbrain: error: sites failed: {list(res['failed_sites'])}", file=sys.stderr)
        return 3
    print(f"benchmark: {len(fed.sites)} sites, {settings.rounds} rounds x {_local_work(settings)}, "
          f"model {settings.model}")
    print(f"  NVFlare simulator wall time          {res['simulator_wall_s']:8.1f} s  (sites in parallel processes)")
    print(f"  same epochs, plain PyTorch, in turn  {res['plain_local_s']:8.1f} s")
    print(f"  overhead ratio (simulator / plain)   {res['ratio']:8.2f}")
    return 0


def cmd_bench_secure_aggregation(args: argparse.Namespace) -> int:
    """The same job plain and with secure aggregation: wall time, bytes per round, model difference."""
    from fedbrain.experiments.throughput import secure_aggregation_cost
    from fedbrain.runs import RunDir

    fed = load_federation(args)
    settings = job_settings(args, fed)
    run_dir = RunDir.create(args.workspace, f"bench-secure-aggregation-{settings.model}")
    save_config(args, run_dir)
    res = secure_aggregation_cost(fed, settings, run_dir, cache_dir=cache_dir(args))
    if res.get("failed_sites"):
        print(f"fedbrain: error: sites failed: {res['failed_sites']}", file=sys.stderr)
        return 3
    p, s = res["plain"], res["secure"]
    print(f"benchmark: {len(fed.sites)} sites, {settings.rounds} rounds x {_local_work(settings)}, model "
          f"{settings.model}, server optimiser {settings.server_optimizer}")
    print(f"  wall time            plain {p['wall_s']:8.1f} s   secure {s['wall_s']:8.1f} s   "
          f"ratio {res['wall_ratio']:.2f}")
    print(f"  bytes / site / round plain {p['bytes_per_site_round']:>10,}   secure {s['bytes_per_site_round']:>10,}   "
          f"ratio {res['bytes_ratio']:.2f}  (weights as {'/'.join(p['dtypes'])} vs {'/'.join(s['dtypes'])})")
    print(f"  masking one update       {res['mask_ms_per_site_round']:8.1f} ms per site and round "
          f"({len(fed.sites) - 1} peer mask streams; {100 * res['mask_share_of_round']:.2f} % of a round's "
          f"{res['round_wall_s']:.1f} s)")
    print(f"  max |difference| between the two global models after the last round: {res['max_abs_difference']:.3g} "
          f"(plain against plain with {settings.threads_per_site or 1}+1 threads per site, another float summation "
          f"order: {res['float_floor']:.3g})")
    print(f"written to {run_dir.bench_secure_aggregation_json}")
    return 0


def _bench_command(args: argparse.Namespace) -> str:
    """The command line that reruns this benchmark (data and budget flags only)."""
    import shlex

    from fedbrain.config import DataSettings, toml_value

    parts = ["fedbrain", "bench", "models"]
    for flag in ("data_root", "site_config", "max_train_per_site"):
        if getattr(args, flag, None):
            parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    data, defaults = run_config(args).data, DataSettings()
    for key in ("sites", "max_images_per_site"):
        if getattr(data, key) != getattr(defaults, key):
            parts += ["--set", f"data.{key}={toml_value(getattr(data, key))}"]
    parts += ["--models", *args.models, "--modes", *args.modes, "--image-size", str(args.image_size),
              "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs), "--finetune", args.finetune,
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(run_config(args).data.seed)]
    if args.device:
        parts += ["--device", args.device]
    if args.distil_from:
        parts += ["--distil-from", args.distil_from]
    if args.include_runs:
        parts += ["--include-runs", *args.include_runs]
    return shlex.join(parts)


def cmd_bench_models(args: argparse.Namespace) -> int:
    from fedbrain.experiments import bench_models as bm
    from fedbrain.models import list_models
    from fedbrain.runs import RunDir, workspace_bench_models

    outs = (workspace_bench_models(args.workspace),) + ((Path(args.out),) if args.out else ())
    if args.show:
        rows = bm.read_table(args.show)
        print(bm.format_table(rows, markdown=args.markdown))
        print(bm.format_goal(bm.goal(rows)))
        return 0
    if args.retime:
        rows = bm.retime(RunDir(args.retime), outs, latency_repeats=args.latency_repeats, cache_dir=cache_dir(args))
        print(bm.format_table(rows, markdown=args.markdown))
        print(bm.format_goal(bm.goal(rows)))
        return 0
    unknown = [m for m in args.models if m not in list_models()]
    if unknown:
        raise UsageError(f"unknown model(s) {unknown}; choose from {list_models()}")
    check_finetune(args.finetune)
    teacher = teacher_path(args.distil_from) if args.distil_from else ""
    include = [RunDir(r) for r in args.include_runs or []]
    for r in include:
        if not (r.config.is_file() and r.results.is_file() and r.best.is_file()):
            raise UsageError(f"--include-runs {r.root}: not a finished run (config.json, results.json and "
                             "checkpoints/best.pt)")
    budget = bm.Budget(image_size=args.image_size or None, rounds=args.rounds, local_epochs=args.local_epochs,
                       max_train_per_site=args.max_train_per_site, finetune=args.finetune,
                       batch_size=args.batch_size, lr=args.lr, seed=run_config(args).data.seed,
                       device=args.device or "auto", distil_from=teacher)
    fed = load_federation(args)
    run_dir = RunDir.create(args.workspace, "bench-models")
    print(f"run: {run_dir}\nbudget: {budget.label()} (centralised: {budget.epochs} epochs), fine-tune "
          f"{budget.finetune} for pretrained models; models: {', '.join(args.models)}", flush=True)
    t0 = time.perf_counter()
    rows = bm.run_bench(fed, args.models, budget, run_dir, outs=outs, modes=tuple(args.modes),
                        cache_dir=cache_dir(args), int8=not args.no_int8,
                        latency_repeats=args.latency_repeats, command=_bench_command(args),
                        include_runs=tuple(include))
    print("\n" + bm.format_table(rows, markdown=args.markdown))
    print(bm.format_goal(bm.goal(rows)))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s on {bm.hardware()}; rows: {run_dir.bench_models_json}; "
          f"merged into {' and '.join(map(str, outs))} (the dashboard's Models page reads the first)")
    failed = [r for r in rows if r.get("error")]
    return 1 if failed and len(failed) == len(rows) else 0


def register(groups) -> None:
    from fedbrain.experiments.bench_models import DEFAULT_MODELS, MODES, Budget
    from fedbrain.models import FINETUNE_HELP
    from fedbrain.settings import ALGORITHMS

    sub = groups.top
    p = sub.add_parser("simulate", help="the main job: a federated run in the NVFlare simulator")
    add_federation_args(p, job=True)
    add_job_args(p)
    p.add_argument("--site-policy", action="append", metavar="SITE=FILE",
                   help="a simulated hospital's own privacy policy (what its admin keeps in "
                        "local/fedbrain_privacy.json, e.g. {\"dp_epsilon\": 8}); all=FILE for every site; repeatable")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("compare", help="federated vs centralised vs local-only at the same budget")
    add_federation_args(p, job=True)
    add_job_args(p, algorithm=False, resume=False)
    p.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS), choices=ALGORITHMS,
                   help="the federated rows (default: all)")
    c = p.add_argument_group("comparison")
    c.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds; every mode runs once per seed (the splits stay those of --seed)")
    c.add_argument("--iid-control", action="store_true",
                   help="add a row: the same sites and sizes with the training images shuffled across sites")
    c.add_argument("--ablation", action="store_true",
                   help="add rows that switch each label-skew lever off on its own (leave-one-out)")
    c.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="the centralised and local-only rows (--no-baselines: federated rows only, e.g. an ablation "
                        "run beside a main comparison)")
    c.add_argument("--leave-one-out", action="store_true",
                   help="add one federation per hospital without it (the same epochs over the smaller data), scored "
                        "on that hospital's test split and on all its images as an unseen hospital")
    c.add_argument("--dp-curve", type=epsilon_budget, nargs="+", metavar="EPS", default=None,
                   help="the privacy-utility curve: one FedAvg row per per-site DP-SGD budget (e.g. inf 8 3 1; inf: "
                        "the same schedule without clipping or noise), with the keys dp_sample_rate / "
                        "dp_max_grad_norm and the same epochs as every row")
    c.add_argument("--legacy-row", action="store_true",
                   help="add a row with fedbrain's federation before the levers (jobs/legacy.toml)")
    p.set_defaults(func=cmd_compare)

    bench = groups.group("bench")
    p = bench.add_parser("federation", help="NVFlare simulator wall time vs plain local training")
    add_federation_args(p, job=True)
    add_job_args(p, rounds=3, resume=False)
    p.set_defaults(func=cmd_bench_federation)

    p = bench.add_parser("secure-aggregation", help="the same job plain and with secure aggregation: wall time, "
                         "bytes per round, how far apart the global models end")
    add_federation_args(p, job=True)
    add_job_args(p, rounds=5, resume=False)
    p.set_defaults(func=cmd_bench_secure_aggregation)

    p = bench.add_parser("models", help="every registry model, federated and centralised: accuracy, "
                         "macro-F1, size, CPU latency at one budget")
    add_federation_args(p)
    g = p.add_argument_group("budget (the same for every model; written beside every number)")
    g.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS),
                   help="registry models to train (none: only the --include-runs rows)")
    g.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    g.add_argument("--image-size", type=NON_NEGATIVE_INT, default=Budget.image_size,
                   help="input size for every model (0 = "
                   "each model's own default: 224 for the ImageNet models); default %(default)s")
    g.add_argument("--rounds", type=POSITIVE_INT, default=Budget.rounds,
                   help="the budget: rounds x local epochs = epochs "
                   "over the data; centralised trains that many epochs, the federation (the default one-step "
                   "rounds) as many rounds as give the same epochs (default %(default)s)")
    g.add_argument("--local-epochs", type=POSITIVE_INT, default=Budget.local_epochs)
    g.add_argument("--max-train-per-site", type=POSITIVE_INT, default=None,
                   help="cap each site's TRAIN split (val/test stay whole, so tables stay comparable)")
    g.add_argument("--finetune", default="all", help=FINETUNE_HELP + "; applies to models that start from "
                   "ImageNet weights (random-init models always train all layers)")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=Budget.batch_size)
    g.add_argument("--lr", type=POSITIVE, default=Budget.lr)
    add_device_arg(g)
    g.add_argument("--distil-from", metavar="RUN_OR_MODEL", default=None,
                   help="fedbrain's own models learn from this teacher as well (its soft labels; the baselines "
                        "never do): e.g. a federated efficientnet_lite0 run")
    p.add_argument("--include-runs", nargs="+", metavar="RUN", help="finished simulate/train runs to add as rows "
                   "(e.g. the teacher, or runs made on a GPU): their own test metrics and budget, profiled here")
    p.add_argument("--no-int8", action="store_true", help="skip int8 quantisation")
    p.add_argument("--latency-repeats", type=POSITIVE_INT, default=50,
                   help="timed batch-1 calls per variant and thread count")
    add_workspace_arg(p)
    p.add_argument("--out", help="another table to merge the rows into, besides <workspace>/bench_models.json")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--show", metavar="JSON", help="only print an existing table (and the goal check)")
    p.add_argument("--retime", metavar="RUN", help="only measure sizes and latency again for a finished "
                   "bench-models run folder (accuracy columns are kept), e.g. on a quiet or deployment machine")
    p.set_defaults(func=cmd_bench_models)
