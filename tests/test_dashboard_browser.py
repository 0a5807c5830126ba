"""The dashboard in a real browser: ``fedbrain dashboard`` on 127.0.0.1, Playwright driving Debian chromium.

Opens every page, uploads a scan on the Predict page (from memory), waits for the prediction and saves a
screenshot of each page under the test's tmp dir. ``FEDBRAIN_SCREENSHOTS=docs/screenshots`` also copies the
screenshots there (docs/clinicians.md's); ``FEDBRAIN_SCREENSHOTS_WORKSPACE=DIR`` points the server at another
workspace (e.g. after ``make demo``) instead of the small fixture run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-dev-shm-usage", "--no-proxy-server"]
VIEWPORT = {"width": 1280, "height": 900}
PAGES = ("Federation", "Compression", "Predict", "Models")
START_TIMEOUT_S = 60
STEP_TIMEOUT_MS = 30_000
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def browser_ready():
    """Skip, with the reason, when playwright or chromium is missing."""
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"playwright (python) is not installed: {exc}; pip install -e '.[dev]'")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"Debian chromium is not installed at {CHROMIUM}: "
                    "apt-get install -y chromium (.ci/run does)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(f"{url}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def dashboard_server(browser_ready, dashboard_process):
    return dashboard_process


@pytest.fixture
def dashboard_process(workspace_dir, tmp_path):
    """``fedbrain dashboard`` as a subprocess with its own TMPDIR and cwd; always stopped afterwards."""
    ws = Path(os.environ.get("FEDBRAIN_SCREENSHOTS_WORKSPACE") or workspace_dir)
    with serve_dashboard(ws, tmp_path) as srv:
        yield srv


@contextlib.contextmanager
def serve_dashboard(ws: Path, tmp_path: Path):
    """The real ``fedbrain dashboard`` over ``ws`` on a free loopback port, until the block ends."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server_tmp, server_cwd = tmp_path / "server_tmp", tmp_path / "server_cwd"
    server_tmp.mkdir()
    server_cwd.mkdir()
    log = tmp_path / "server.log"
    env = {**os.environ, "TMPDIR": str(server_tmp), "FEDBRAIN_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fedbrain.cli", "dashboard", "--workspace", str(ws), "--port", str(port)]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=server_cwd, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None:
                pytest.fail(f"fedbrain dashboard exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"fedbrain dashboard not healthy after {START_TIMEOUT_S} s:\n"
                            f"{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield SimpleNamespace(url=url, ws=ws, log=log, tmp=server_tmp, cwd=server_cwd)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def federation_page(p, url: str):
    """Chromium on the dashboard's Federation page (closed when the block ends)."""
    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    try:
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(STEP_TIMEOUT_MS)
        page.goto(url)
        page.get_by_role("heading", name="Federation", level=1).wait_for()
        yield page
    finally:
        browser.close()


def _websocket_handshake(url: str, host: str, origin: str) -> str:
    """The status line the dashboard answers a websocket upgrade with, for the given Host and Origin."""
    import base64

    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                   f"Origin: {origin}\r\n\r\n").encode())
        return s.recv(256).decode(errors="replace").splitlines()[0]


@pytest.mark.slow
def test_the_websocket_accepts_loopback_hosts_only(dashboard_process):
    """DNS rebinding: a page served as evil.example that resolves to 127.0.0.1 must not get a session."""
    url = dashboard_process.url
    port = url.rsplit(":", 1)[1]
    assert " 101 " in _websocket_handshake(url, f"127.0.0.1:{port}", url)
    assert " 101 " in _websocket_handshake(url, f"localhost:{port}", f"http://localhost:{port}")
    assert " 403 " in _websocket_handshake(url, f"evil.example:{port}", f"http://evil.example:{port}")
    assert " 403 " in _websocket_handshake(url, f"127.0.0.1:{port}", "http://evil.example")


def _settle(page) -> None:
    """Wait until the script run finished and every Plotly chart has drawn."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=\"stPlotlyChart\"]')]"
        ".every(c => c.querySelector('.main-svg'))", timeout=STEP_TIMEOUT_MS)
    page.wait_for_timeout(600)


def _open(page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=title).click()
    page.get_by_role("heading", name=title, level=1).wait_for(timeout=STEP_TIMEOUT_MS)
    _settle(page)


def _scan_png() -> bytes:
    """A real Br35H tumour slice re-encoded as PNG, in memory."""
    from fedbrain.data.readers import embedded_br35h_root

    buf = io.BytesIO()
    Image.open(embedded_br35h_root() / "yes" / "y1.jpg").convert("L").save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_dashboard_in_a_real_browser(dashboard_server, tmp_path):
    from playwright.sync_api import sync_playwright

    srv = dashboard_server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    before = _tree(srv.ws)
    name = f"patient-{uuid.uuid4().hex[:12]}.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.goto(srv.url)
            for title in PAGES:
                _open(page, title)
                assert page.get_by_test_id("stException").count() == 0, f"{title}: exception on the page"
                if title != "Predict":
                    page.screenshot(path=str(shots / f"{title.lower()}.png"))
            _open(page, "Predict")
            page.get_by_text("Research use only").wait_for()
            page.locator('input[type="file"]').set_input_files(
                files=[{"name": name, "mimeType": "image/png", "buffer": _scan_png()}])
            page.get_by_text("Tumour probability").wait_for()
            _settle(page)
            assert page.get_by_test_id("stAlertContentError").count() == 0
            assert page.get_by_text("Grad-CAM").count() >= 1
            # the notice at the top of the view, the result below it
            box = page.get_by_test_id("stAlert").first.bounding_box()
            page.mouse.move(VIEWPORT["width"] * 0.6, VIEWPORT["height"] / 2)
            page.mouse.wheel(0, max(0.0, box["y"] - 70))  # the notice just below Streamlit's header
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / "predict.png"))
        finally:
            browser.close()

    assert sorted(p.name for p in shots.iterdir()) == sorted(f"{t.lower()}.png" for t in PAGES)
    # the upload stayed in memory: nothing new on disk, and its name is not in the server's log
    assert not any(srv.tmp.rglob("*")), list(srv.tmp.rglob("*"))
    assert not any(srv.cwd.rglob("*")), list(srv.cwd.rglob("*"))
    assert _tree(srv.ws) == before, "the workspace changed"
    assert name not in srv.log.read_text(errors="replace")

    _publish(list(shots.iterdir()))


def _publish(files: list[Path]) -> None:
    """``FEDBRAIN_SCREENSHOTS=DIR``: copy the screenshots there (docs/clinicians.md's), as 256-colour PNGs."""
    target = os.environ.get("FEDBRAIN_SCREENSHOTS")
    if target:
        out = Path(target) if Path(target).is_absolute() else REPO / target
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            Image.open(f).convert("RGB").quantize(256).save(out / f.name, optimize=True)


LIVE_ROUNDS = 16
DONE = re.compile(rf"(\d+) of {LIVE_ROUNDS} rounds done")


def _charts_drawn(page) -> None:
    """Give the live page's charts a moment to draw (for the screenshot only; redraws every 2 s)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "() => { const c = [...document.querySelectorAll('[data-testid=\"stPlotlyChart\"]')];"
            " return c.length > 0 && c.every(x => x.querySelector('.main-svg')); }", timeout=15_000)
    except PlaywrightTimeout:
        pass


def _rounds_shown(page) -> int:
    """The round counter the Federation page shows now (-1 before the first)."""
    m = DONE.search(page.locator('[data-testid="stMain"]').inner_text())
    return int(m.group(1)) if m else -1


@pytest.mark.slow
def test_a_running_federation_updates_in_the_browser(browser_ready, tmp_path):
    """Start a real federation, open the dashboard while it runs: the round counter advances and the state
    turns to finished on the same page, never reloaded."""
    from playwright.sync_api import sync_playwright

    ws = tmp_path / "live_ws"
    ws.mkdir()
    sim_log = tmp_path / "simulate.log"
    cmd = [sys.executable, "-m", "fedbrain.cli", "simulate", "--set", "data.max_images_per_site=40", "--rounds",
           str(LIVE_ROUNDS), "--set", "cross_site_eval=false", "--workspace", str(ws)]
    with sim_log.open("wb") as fh:
        sim = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "FEDBRAIN_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 240
        status = {}
        while not (status.get("state") == "running" and status.get("done", 0) >= 1):
            assert sim.poll() is None, f"simulate ended early ({sim.returncode}):\n{sim_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no running round after 240 s:\n{sim_log.read_text()[-3000:]}"
            time.sleep(0.5)
            files = list(ws.glob("*/status.json"))
            status = json.loads(files[0].read_text()) if files else {}
        with serve_dashboard(ws, tmp_path) as srv, sync_playwright() as p:
            with federation_page(p, srv.url) as page:
                page.get_by_text(DONE).first.wait_for(timeout=60_000)
                first = _rounds_shown(page)
                assert 0 <= first < LIVE_ROUNDS, first
                navigations = []
                page.on("framenavigated", lambda frame: navigations.append(frame.url))
                page.wait_for_function(
                    f"() => {{ const m = document.querySelector('[data-testid=\"stMain\"]').innerText"
                    f".match(/(\\d+) of {LIVE_ROUNDS} rounds done/); return m && Number(m[1]) > {first}; }}",
                    timeout=120_000)
                assert _rounds_shown(page) > first
                _charts_drawn(page)
                page.screenshot(path=str(tmp_path / "federation-live.png"))  # mid-run: progress and curves
                page.get_by_text(f"finished, {LIVE_ROUNDS} of {LIVE_ROUNDS} rounds done").first.wait_for(
                    timeout=300_000)
                assert page.get_by_test_id("stException").count() == 0
                assert not navigations, f"the page was reloaded: {navigations}"
        assert sim.wait(timeout=120) == 0, sim_log.read_text()[-3000:]
        _publish([tmp_path / "federation-live.png"])
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait(timeout=30)


@pytest.mark.slow
def test_a_deployed_run_shows_the_pages_of_a_simulated_one_while_it_runs(browser_ready, tmp_path):
    """A ``fedbrain submit`` run folder grown as the deployment grows it (the server's progress through
    DeployedProgress, then the downloaded result through finish_deployed_run): the Federation page draws the pooled
    validation curve while the job runs, and after it the Federation and Evaluation pages show the finished run,
    never reloaded, with no exception."""
    from playwright.sync_api import sync_playwright
    from test_run_log import SITES, write_server_result

    from fedbrain.cli.deployment import DeployedProgress, final_headline
    from fedbrain.fl.metrics import POOLED_VAL
    from fedbrain.fl.runlog import RunLog, finish_deployed_run
    from fedbrain.runs import RunDir
    from fedbrain.settings import JobSettings
    from fedbrain.status import FINISHED, StatusWriter

    result_dir, progress, _ = write_server_result(tmp_path)  # the files a deployed server leaves
    ws = tmp_path / "deployed_ws"
    run = RunDir(ws / "deploy-fedavg-fedbrain_cnn_gn")
    run.root.mkdir(parents=True)
    settings = JobSettings.create(rounds=2, model="fedbrain_cnn_gn")
    run.write_config(kind="federated", deployment="nvflare-prod", algorithm="fedavg", model=settings.model,
                     job=settings.to_dict(), sites=SITES)
    status = StatusWriter(run, kind="federated", deployment="nvflare-prod", algorithm="fedavg",
                          model=settings.model, sites={s: {} for s in SITES}, done=0, total=2, unit="round")
    log = RunLog(run)
    follow = DeployedProgress(status, 2, log)
    first = {**progress, "last_round": 0, "rounds_done": 1, POOLED_VAL: {"0": progress[POOLED_VAL]["0"]}}
    follow("job-1", "RUNNING", first)
    with serve_dashboard(ws, tmp_path) as srv, sync_playwright() as p:
        with federation_page(p, srv.url) as page:
            page.get_by_text("1 of 2 rounds done").first.wait_for(timeout=60_000)
            _charts_drawn(page)
            assert page.locator('[data-testid="stPlotlyChart"]').count() >= 1, "no curve while the job runs"
            navigations = []
            page.on("framenavigated", lambda frame: navigations.append(frame.url))
            follow("job-1", "RUNNING", progress)  # the second round arrives
            page.get_by_text("2 of 2 rounds done").first.wait_for(timeout=60_000)
            log.close()
            finish_deployed_run(run, settings, result_dir, dict.fromkeys(SITES, "multiclass"), {"sites": SITES},
                                deployment="nvflare-prod", job_id="job-1")
            status.finish(FINISHED, **final_headline(run))
            page.get_by_text("finished, 2 of 2 rounds done").first.wait_for(timeout=60_000)
            assert not navigations, f"the page was reloaded: {navigations}"
            page.reload()
            page.get_by_role("heading", name="Federation", level=1).wait_for()
            _settle(page)
            assert page.get_by_test_id("stException").count() == 0
            assert page.get_by_text("union", exact=True).count() >= 1, "no test results of the finished run"
            page.screenshot(path=str(tmp_path / "deployed-federation.png"))
            _open(page, "Evaluation")
            assert page.get_by_test_id("stException").count() == 0
            assert page.get_by_text(run.name).count() >= 1, "the Evaluation page does not offer the deployed run"
            page.screenshot(path=str(tmp_path / "deployed-evaluation.png"))
