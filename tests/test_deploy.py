"""Multi-site deployment (issue 3): provisioning, a real NVFlare server + two hospital kits over mutual
TLS on localhost, a FedAvg job submitted through ProdEnv and the admin kit, and a foreign-CA client refused.

The end-to-end test starts real processes (server, clients, their job processes) bound to 127.0.0.1
only, and always stops them (fixture finalizer), checking by PID that nothing is left behind.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("nvflare", reason="NVFlare is not installed (pip install 'nvflare==2.9.0')")

from processes import processes_mentioning, start_kit, stop_processes  # noqa: E402

from fedbrain.fl import deploy as d  # noqa: E402
from fedbrain.settings import FEDERATED_MODEL  # noqa: E402

SITES = ["hospital-1", "hospital-2"]  # the names embedded_spec(sites=2) gives its simulated hospitals
CERT_ERRORS = ("CERTIFICATE_VERIFY_FAILED", "SSLCertVerificationError", "certificate verify failed",
               "ClientConnectorCertificateError")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_cli(argv: list[str]) -> int:
    """The real ``fedbrain`` entry point, exactly as installed."""
    from fedbrain.cli.main import main

    return main(argv)


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError as exc:
        return f"({path}: {exc})"


# ---------------------------------------------------------------- fast checks (no processes)


def test_project_yml_has_server_clients_and_project_admin(tmp_path):
    import yaml

    spec = d.ProjectSpec(sites=["hospital-a", "hospital-b"], fed_port=9102, admin_port=9103).validate()
    cfg = yaml.safe_load(d.write_project_yml(spec, tmp_path).read_text())
    assert cfg["api_version"] == 3 and cfg["name"] == "fedbrain"
    by_type: dict[str, list] = {}
    for p in cfg["participants"]:
        by_type.setdefault(p["type"], []).append(p)
    assert [s["name"] for s in by_type["server"]] == ["localhost"]
    assert by_type["server"][0]["fed_learn_port"] == 9102 and by_type["server"][0]["admin_port"] == 9103
    assert [c["name"] for c in by_type["client"]] == ["hospital-a", "hospital-b"]
    assert by_type["admin"] == [{"name": "admin@fedbrain.local", "type": "admin", "org": "fedbrain",
                                 "role": "project_admin"}]
    assert any(b["path"].endswith("CertBuilder") for b in cfg["builders"])


@pytest.mark.parametrize("sites, message", [
    ("hospital a,hospital-b", "invalid site name 'hospital a'"),
    ("hospital-a,hospital/b", "invalid site name 'hospital/b'"),
    ("server,hospital-b", "invalid site name 'server'"),
    ("hospital-a,hospital-a", "must be unique"),
    (" , ", "no site given"),
])
def test_invalid_site_names_are_refused(sites, message):
    with pytest.raises(d.DeployError, match=message):
        d.parse_sites(sites)


def test_invalid_admin_host_and_ports_are_refused():
    with pytest.raises(d.DeployError, match="--admin"):
        d.ProjectSpec(sites=["a"], admin="not-an-email").validate()
    with pytest.raises(d.DeployError, match="--server-host"):
        d.ProjectSpec(sites=["a"], server_host="bad host").validate()
    with pytest.raises(d.DeployError, match="must differ"):
        d.ProjectSpec(sites=["a"], fed_port=9000, admin_port=9000).validate()


def test_provision_cli_errors_are_one_line(tmp_path, capsys):
    assert run_cli(["provision", "--sites", "hospital a", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "invalid site name 'hospital a'" in err and "letters, digits, '-' and '_'" in err
    assert not (tmp_path / "workspace").exists()


def test_missing_nvflare_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "nvflare", None)  # import nvflare -> ImportError
    with pytest.raises(d.DeployError, match=r"NVFlare is not installed.*pip install"):
        d.nvflare_version()
    assert run_cli(["provision", "--sites", "hospital-a", "--out", str(tmp_path)]) == 2
    assert "NVFlare is not installed" in capsys.readouterr().err


def test_site_split_resolution():
    splits = {"hospital-a": "/data/a.csv"}
    assert d.site_split_files(["hospital-a"], splits, None) == splits
    assert d.site_split_files(["hospital-a", "hospital-b"], splits, "/srv/fb") == {
        "hospital-a": "/data/a.csv", "hospital-b": "/srv/fb/splits/hospital-b.csv"}
    assert d.site_split_files(["hospital-a"], {}, "/srv/fb") == {"hospital-a": "/srv/fb/splits/hospital-a.csv"}
    with pytest.raises(d.DeployError, match="no split file for .'hospital-b'."):
        d.site_split_files(["hospital-a", "hospital-b"], splits, None)
    with pytest.raises(d.DeployError, match="not among the job's sites"):
        d.site_split_files(["hospital-b"], splits, "/srv/fb")
    assert d.parse_assignments(["hospital-a=/x/a.csv"], "--site-split") == {"hospital-a": "/x/a.csv"}
    with pytest.raises(d.DeployError, match="SITE=VALUE"):
        d.parse_assignments(["hospital-a"], "--site-split")


def test_prod_job_inputs_keep_site_paths_off_the_server(tmp_path):
    from fedbrain.fl.recipes import build_recipe
    from fedbrain.settings import JobSettings

    sites = ["hospital-a", "hospital-b"]
    for algorithm in ("fedavg", "scaffold"):  # SCAFFOLD has per-site apps too
        settings = JobSettings.create(algorithm, cross_site_eval=False)
        splits, logs = d.prod_job_inputs(settings, sites, {"hospital-a": "/data/a.csv"}, site_dir="/srv/fb")
        assert splits == {"hospital-a": "/data/a.csv", "hospital-b": "/srv/fb/splits/hospital-b.csv"}
        assert logs == dict.fromkeys(sites, "/srv/fb/logs")
        out = tmp_path / algorithm
        build_recipe(settings, sites, splits, log_dirs=logs).export(job_dir=str(out))
        configs = {p.read_text() for p in out.rglob("config_fed_client.json")}
        for site in sites:
            assert any(f"--split-file {splits[site]}" in c and "--log-dir /srv/fb/logs" in c for c in configs), site
        # every site runs fedbrain's executor (NVFlare's with a short result poll)
        assert all("fedbrain.fl.executor.FedbrainClientAPIExecutor" in c for c in configs)
        assert not any("/srv/fb" in p.read_text() for p in out.rglob("config_fed_server.json"))
    _, own_logs = d.prod_job_inputs(JobSettings.create(), sites, site_dir="/srv/fb", site_log_dir="/var/log/fb")
    assert own_logs == dict.fromkeys(sites, "/var/log/fb")
    # NVFlare splits a site's arguments on whitespace: a path with a space is refused, not mangled
    with pytest.raises(ValueError, match="whitespace"):
        build_recipe(JobSettings.create(), sites, {"hospital-a": "/data/a b.csv", "hospital-b": "/b.csv"})


def test_provision_cli_writes_mutual_tls_kits(tmp_path, capsys):
    fed_port, admin_port = free_ports(2)
    out = tmp_path / "deploy"
    rc = run_cli(["provision", "--sites", "hospital-a,hospital-b", "--out", str(out),
                  "--fed-port", str(fed_port), "--admin-port", str(admin_port),
                  "--server-storage", str(tmp_path / "store")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    kits = d.Kits.from_dir(out)
    assert (out / "project.yml").is_file() and sorted(kits.clients) == ["hospital-a", "hospital-b"]
    assert kits.admin_user == "admin@fedbrain.local" and kits.server.name == "localhost"
    for kit in [kits.server, kits.admin, *kits.clients.values()]:
        assert str(kit) in printed  # where each startup kit is
    assert "next steps" in printed and "fedbrain submit" in printed and "fedbrain data split" in printed
    server = json.loads((kits.server / "startup" / "fed_server.json").read_text())["servers"][0]
    assert server["service"]["target"] == f"localhost:{fed_port}" and server["admin_port"] == admin_port
    assert server["connection_security"] == "mtls"
    client = json.loads((kits.clients["hospital-a"] / "startup" / "fed_client.json").read_text())
    assert client["client"]["connection_security"] == "mtls" and client["client"]["fqsn"] == "hospital-a"
    ca = (kits.server / "startup" / "rootCA.pem").read_bytes()
    for kit in [kits.admin, *kits.clients.values()]:
        assert (kit / "startup" / "rootCA.pem").read_bytes() == ca  # one project CA
    res = json.loads((kits.server / "local" / "resources.json").read_text())
    assert "fedbrain." in res["class_allow_list"]
    assert "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor" in res["class_allow_list"]
    jobs = next(c for c in res["components"] if c["id"] == "job_manager")
    assert jobs["args"]["uri_root"] == str((tmp_path / "store" / "jobs-storage").resolve())
    res = json.loads((kits.clients["hospital-a"] / "local" / "resources.json").read_text())
    assert "fedbrain." in res["class_allow_list"]
    # each hospital's kit: a privacy policy its admin sets (off until edited) and no secure-aggregation key of
    # any site (each hospital makes its own on first use, beside its kit: issue 28, finding 2)
    from fedbrain.fl.policy import find_policy

    assert not [f for f in out.rglob("*") if "secagg" in f.name]
    assert find_policy(starts=(kits.clients["hospital-a"] / "some-job" / "custom",)).dp_epsilon == 0

    # submit without a split for every site fails before anything is sent
    assert run_cli(["submit", "--admin-kit", str(out), "--sites", "hospital-a,hospital-b",
                    "--site-split", "hospital-a=/data/a.csv", "--wait-for-sites", "0"]) == 2
    assert "no split file for ['hospital-b']" in capsys.readouterr().err


def test_data_split_cli_writes_a_hospitals_split(tmp_path, capsys):
    cfg = tmp_path / "my_site.toml"
    cfg.write_text('[[site]]\nname = "hospital-a"\nformat = "embedded"\n\n'
                   '[federation]\nmax_images_per_site = 30\n')
    out = tmp_path / "site"
    assert run_cli(["data", "split", "--site-config", str(cfg), "--out", str(out)]) == 0
    split = out / "splits" / "hospital-a.csv"
    rows = split.read_text().splitlines()
    assert rows[0] == "path,label,split,scheme,patient_id" and len(rows) > 20
    summary = json.loads((out / "data_summary.json").read_text())
    assert list(summary["sites"]) == ["hospital-a"]
    assert f"--site-split hospital-a={split}" in capsys.readouterr().out


# ---------------------------------------------------------------- end to end: real processes


def _environment_blocker() -> str | None:
    """Why this machine cannot run a local deployment at all (not a fedbrain / NVFlare failure)."""
    if shutil.which("bash") is None:
        return "bash is not available to run the kits' startup/sub_start.sh"
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
    except OSError as exc:
        return f"cannot listen on 127.0.0.1 here: {exc}"
    try:
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot start a Python subprocess here: {exc}"
    return None


@pytest.fixture
def launcher(tmp_path):
    """Starts kits as separate process groups; its finalizer stops them and everything they spawned."""
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, kit: Path) -> subprocess.Popen:
        procs[name] = start_kit(kit, tmp_path / f"{name}.console.log")
        return procs[name]

    start.procs = procs
    yield start
    left = stop_processes(list(procs.values()), roots=[tmp_path], grace=5.0)
    assert not left, f"processes left behind after teardown: {left}"


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with code {proc.returncode}:\n{tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the server did not listen on 127.0.0.1:{port} within {timeout:.0f} s:\n{tail(log)}")


def _tls_probe(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> str:
    """Open a TLS connection to the FL port (trusting ``ca``, presenting ``cert`` if given) and send one
    HTTP request: ``"accepted"`` when the server answers it, else ``"refused: ..."``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(ca))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.settimeout(10)
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                data = s.recv(64)
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {exc!r}"
    return "accepted" if data.startswith(b"HTTP/") else f"refused: connection closed ({data!r})"


def _log_text(*paths: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in paths if p.is_file())


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_deployment_end_to_end(tmp_path, launcher):
    import psutil
    import torch

    from fedbrain.checkpoint import global_state as load_global_state
    from fedbrain.checkpoint import load_checkpoint
    from fedbrain.data.federation import build_federation, embedded_spec
    from fedbrain.models import create_model

    blocker = _environment_blocker()
    if blocker:
        pytest.skip(f"a local NVFlare deployment cannot run on this machine: {blocker}")
    t0 = time.monotonic()
    fed_port, admin_port = free_ports(2)

    # 1. provision this project, and a separate project (its own CA) with a client of the same name
    kits = d.provision(d.ProjectSpec(sites=SITES, fed_port=fed_port, admin_port=admin_port),
                       tmp_path / "deploy", server_storage=tmp_path / "server-storage")
    rogue = d.provision(d.ProjectSpec(sites=["hospital-1"], fed_port=fed_port, admin_port=admin_port),
                        tmp_path / "rogue")
    ca = kits.server / "startup" / "rootCA.pem"
    assert ca.read_bytes() != (rogue.server / "startup" / "rootCA.pem").read_bytes()

    # 2. the server, bound to loopback only
    server = launcher("server", kits.server)
    _wait_port(fed_port, server, kits.server / "log.txt")
    for conn in psutil.Process(server.pid).net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN:
            assert conn.laddr.ip == "127.0.0.1", f"server listens on {conn.laddr}"

    # 3. mutual TLS at the server: this project's client certificate gets an answer, a certificate from
    #    another CA (or none) is cut off during the handshake, even when it trusts the server's CA
    good, bad = kits.clients["hospital-1"] / "startup", rogue.clients["hospital-1"] / "startup"
    assert _tls_probe(fed_port, ca, good / "client.crt", good / "client.key") == "accepted"
    assert _tls_probe(fed_port, ca, bad / "client.crt", bad / "client.key").startswith("refused")
    assert _tls_probe(fed_port, ca).startswith("refused")

    # 4. the foreign-CA kit of "hospital-1" runs against this server while the real hospital-2 joins
    rogue_proc = launcher("rogue-hospital-1", rogue.clients["hospital-1"])
    launcher("hospital-2", kits.clients["hospital-2"])
    d.wait_for_clients(kits.admin, ["hospital-2"], timeout=120)
    rogue_logs = (tmp_path / "rogue-hospital-1.console.log", rogue.clients["hospital-1"] / "log.txt")
    deadline = time.monotonic() + 60
    while not any(e in _log_text(*rogue_logs) for e in CERT_ERRORS) and time.monotonic() < deadline:
        assert "hospital-1" not in d.connected_clients(kits.admin), "a foreign-CA client joined"
        time.sleep(2)
    assert any(e in _log_text(*rogue_logs) for e in CERT_ERRORS), \
        f"no TLS certificate error from the foreign kit:\n{tail(rogue_logs[0])}\n{tail(rogue_logs[1])}"
    assert d.connected_clients(kits.admin) == ["hospital-2"]
    assert stop_processes([launcher.procs.pop("rogue-hospital-1")], roots=[rogue.root], grace=5.0) == []
    assert not psutil.pid_exists(rogue_proc.pid) or psutil.Process(rogue_proc.pid).status() == "zombie"

    # 5. the real hospital-1 joins
    launcher("hospital-1", kits.clients["hospital-1"])
    assert d.wait_for_clients(kits.admin, SITES, timeout=120) == SITES
    t_up = time.monotonic() - t0

    # 6. each hospital's split file on its own disk; a 2-round FedAvg job through ProdEnv + the admin kit
    fed = build_federation(embedded_spec(sites=2, max_images_per_site=30))
    assert sorted(fed.sites) == SITES
    splits = {}
    for name, site in fed.sites.items():
        splits[name] = str(tmp_path / f"{name}-data" / "split.csv")
        site.write_split_file(Path(splits[name]))
    site_logs = tmp_path / "site-logs"
    argv = ["submit", "--admin-kit", str(kits.admin), "--sites", ",".join(SITES),
            *[f"--site-split={site}={path}" for site, path in splits.items()], "--site-log-dir", str(site_logs),
            "--rounds", "2", "--set", "local.batch_size=16", "--set", "threads_per_site=1",
            "--timeout", "180", "--wait-for-sites", "60", "--workspace", str(tmp_path / "runs")]
    rc = run_cli(argv)  # `fedbrain submit`: the simulate recipe, ProdEnv, bounded wait, result download
    t_job = time.monotonic() - t0
    run_dir = next((tmp_path / "runs").iterdir())
    res = json.loads((run_dir / "deploy_result.json").read_text())
    assert rc == 0 and res["status"] == "FINISHED:COMPLETED", \
        f"job {res['job_id']}: {res['status']}\n{tail(kits.server / 'log.txt')}"
    assert json.loads((run_dir / "config.json").read_text())["site_splits"] == splits
    global_model, result_dir = Path(res["global_model"]), Path(res["result_dir"])
    assert global_model.is_file() and result_dir in global_model.parents

    # the global model: finite weights of the registry model, and a loadable fedbrain checkpoint
    state = load_global_state(global_model)
    assert set(state) == set(create_model(FEDERATED_MODEL, pretrained=False).state_dict())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    _model, card = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert card.training["job_id"] == res["job_id"] and card.training["rounds"] == 2
    _model, best = load_checkpoint(run_dir / "checkpoints" / "best.pt")  # fitted from the sites' sums (issue 14)
    assert best.calibration["fitted_on"].startswith("federated") and best.calibration["n"] > 0
    assert {"tumour_slope", "tumour_bias", "type_temperature"} <= set(best.calibration)
    assert best.extra["input_profile"]["source"].startswith("federated")
    # the run's live status followed the deployed job (admin API show_stats, then the server's progress.json)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["job_id"] == res["job_id"], status
    assert (status["done"], status["total"]) == (2, 2) and set(status["sites"]) == set(SITES), status
    assert all(c.get("last_contact") and c.get("last_round") == 1 for c in status["sites"].values()), status

    # the run folder of a simulated run (issue 27): per round the server's pooled validation, results.json from
    # the sites' summed test counts (cross-site evaluation), the status's headline from it
    glob = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["site"] == "global" and r["split"] == "val"]
    # validated: the model after round 1 and the final model (validation_points(2, ...) = [1, 2])
    assert [r["round"] for r in glob] == [1, 2] and all(r["pooled"] and r["n"] > 0 for r in glob), glob
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["test"]) == {*SITES, "union"}, results["test"]
    assert results["test"]["union"]["n"] == sum(len(s.splits["test"]) for s in fed.sites.values())
    assert "summed test counts" in results["test_source"]
    assert status["headline"] and status["best_round"] == results["best_round"], status

    # each site logged its own metrics to its --log-dir (one folder here: both "machines" are this one)
    rows = [json.loads(x) for x in (site_logs / "metrics.jsonl").read_text().splitlines()]
    for site in SITES:
        mine = [r for r in rows if r["site"] == site]
        assert {r["round"] for r in mine if r["split"] == "train"} == {0, 1}, rows
        assert {r["round"] for r in mine if r["split"] == "val" and r["model"] == "global"} == {1, 2}, rows
    # the server keeps its audit and round log in its own job folder, never at a site's paths
    audits = list(tmp_path.glob("**/server_audit.jsonl"))
    assert audits and all(site_logs not in a.parents for a in audits)
    assert any(result_dir in a.parents for a in audits)

    # what reached the server: no image path of any site appears in the downloaded server workspace
    image_paths = [r.path.encode() for s in fed.sites.values() for recs in s.splits.values() for r in recs]
    for f in (p for p in result_dir.rglob("*") if p.is_file()):
        blob = f.read_bytes()
        assert not any(p in blob for p in image_paths), f"{f} names a site's image"

    # 7. shut down through the admin API, then make sure no process of the deployment is left
    procs = dict(launcher.procs)
    d.shutdown_all(kits.admin, wait=False)
    deadline = time.monotonic() + 90
    while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    graceful = {n: p.returncode for n, p in procs.items()}
    left = stop_processes(list(procs.values()), roots=[tmp_path], grace=5.0)
    assert left == [], f"still running after shutdown: {left}"
    for name, p in procs.items():
        assert not psutil.pid_exists(p.pid) or psutil.Process(p.pid).status() == "zombie", name
    assert processes_mentioning(tmp_path) == []
    print(f"\nup in {t_up:.0f} s, job done at {t_job:.0f} s ({res['seconds']:.0f} s), all stopped at "
          f"{time.monotonic() - t0:.0f} s; exit codes after `shutdown all`: {graceful}")
    assert all(code is not None for code in graceful.values()), f"not stopped by `shutdown all`: {graceful}"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_poc_federation_on_loopback_only(tmp_path):
    """PocEnv (every participant a local process) runs a fedbrain FedAvg job; nothing listens beyond 127.0.0.1."""
    import psutil

    from fedbrain.data.federation import build_federation, embedded_spec
    from fedbrain.fl.deploy import follow_job
    from fedbrain.fl.poc import loopback_poc_env, poc_admin_kit
    from fedbrain.fl.recipes import build_recipe
    from fedbrain.runs import RunDir
    from fedbrain.settings import JobSettings

    fed = build_federation(embedded_spec(sites=2, max_images_per_site=30))
    run = RunDir(tmp_path / "run")
    fed.write(run)
    settings = JobSettings.create(rounds=2, cross_site_eval=False)
    recipe = build_recipe(settings, list(fed.sites), run.split_files(list(fed.sites)),
                          log_dirs={s: str(run.site_log_dir(s)) for s in fed.sites})
    fed_port, admin_port = free_ports(2)
    env = loopback_poc_env(list(fed.sites), tmp_path / "poc", fed_port=fed_port, admin_port=admin_port)
    try:
        job = recipe.execute(env)
        listening = [c for p in psutil.process_iter() if _mentions(p, tmp_path / "poc")
                     for c in _tcp_listeners(p)]
        assert listening, "no POC process listens"
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening
        seen = []  # what `fedbrain submit` / the POC job runner follow: the server controller's progress
        follow_job(poc_admin_kit(env), job.get_job_id(), env, lambda _id, _st, prog: seen.append(prog),
                   time.monotonic() + 240, poll_s=0.5)
        result = job.get_result(timeout=300)
        assert job.get_status() == "FINISHED:COMPLETED", (job.get_status(), result)
        assert any(p.get("num_rounds") == 2 for p in seen), seen
    finally:
        env.stop(clean_up=False)
        left = stop_processes([], roots=[tmp_path / "poc"], grace=5.0)
    assert left == []
    rows = [json.loads(x) for s in fed.sites for x in run.site_metrics(s).read_text().splitlines()]
    assert {(r["site"], r["round"]) for r in rows if r["split"] == "train"} == {(s, r) for s in fed.sites
                                                                               for r in (0, 1)}


def _mentions(proc, root: Path) -> bool:
    import psutil

    try:
        return any(str(root) in part for part in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _tcp_listeners(proc) -> list:
    import psutil

    try:
        return [c for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
