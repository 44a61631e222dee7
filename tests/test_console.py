"""The live console: its token, its loopback-only socket, its numbers, and a real browser on a real job.

The browser test runs `fedtune-sim --console` on the banking slice (2 institutions, 3 rounds,
SecAgg+ off to keep it short) and drives Debian's headless Chromium with Selenium while the job
runs. `.ci/run` installs `chromium` and `chromium-driver`; elsewhere the test is skipped without
them. FEDTUNE_CONSOLE_SCREENSHOT=docs/console.png keeps the finished page's screenshot there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from common.config import REPO_ROOT
from server.cli import build_parser
from server.console import Console, ConsoleServer, CoordinatorJobs, SimulatedJob
from server.console.state import institution_view, projected_epsilon
from test_tracking import scalars

TOKEN = "the-token"


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port` (/proc/net/tcp{,6}: state 0A = LISTEN)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hexport = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hexport, 16) == port:
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 else address)
    return found


def institution(name: str = "bank-a", **extra) -> dict:
    row = {
        "name": name, "rounds": 2, "declined_rounds": [], "epsilon": 3.0, "dataset_epsilon": 3.0, "budget_epsilon": 8.0,
        "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.0, "sample_rate": 0.25, "max_grad_norm": 1.0,
        "steps": 8, "examples": 400, "bytes_up": 10, "bytes_down": 20,
        "epsilon_per_round": {"1": 2.0, "2": 3.0}, "dataset_epsilon_per_round": {"1": 2.0, "2": 3.0},
    }
    return row | extra


def write_run(folder: Path, planned: int, institutions: list[dict], rounds: list[dict], final: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {
        "rounds": rounds, "institutions": institutions, "secure_aggregation": True,
        "institution_dp": {"enabled": False},
        "config": {"federation": {"rounds": planned, "institutions": len(institutions)},
                   "privacy": {"target_epsilon": 8.0, "delta": 1e-5}, "secure_aggregation": {"enabled": True}},
    }
    (folder / ("metrics.json" if final else "live.json")).write_text(json.dumps(metrics))
    return folder


def rounds_up_to(last: int, **extra) -> list[dict]:
    return [{"round": r, "accuracy": 0.1 * r, "loss": 2.0 - 0.1 * r, "bytes_up": 100 * r, "bytes_down": 50 * r,
             "seconds": float(r), "declined": {}, "dropped": {}} | extra for r in range(last + 1)]


# -- the web app ----------------------------------------------------------------------------------


def test_every_route_needs_the_token_and_a_loopback_host_name(tmp_path):
    console = Console(SimulatedJob(tmp_path, status="running").snapshot, token=TOKEN)
    client = TestClient(console.app(), base_url="http://127.0.0.1:8000")
    for path in ("/", "/events", "/api/state", "/static/console.js", "/static/chart.umd.min.js"):
        assert client.get(path).status_code == 401, path
        assert client.get(path + "?token=wrong").status_code == 403, path
    page = client.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and "fedtune" in page.text
    assert page.headers["referrer-policy"] == "no-referrer" and "default-src 'none'" in page.headers["content-security-policy"]
    assert client.get("/api/state", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get(f"/static/chart.umd.min.js?token={TOKEN}").text.startswith("/*!\n * Chart.js v4")
    # DNS rebinding: a page elsewhere that resolves its own name to 127.0.0.1 is refused
    assert TestClient(console.app(), base_url="http://evil.example").get(f"/?token={TOKEN}").status_code == 400


def test_the_page_loads_nothing_from_another_host():
    static = REPO_ROOT / "server" / "console" / "static"
    for name in ("index.html", "console.js", "console.css"):
        text = (static / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


def test_event_stream_sends_the_state_then_ends_when_the_console_closes(tmp_path):
    write_run(tmp_path / "run", 3, [institution()], rounds_up_to(2), final=False)
    job = SimulatedJob(tmp_path / "run", status="running")
    console = Console(job.snapshot, token=TOKEN, interval=0.05)
    server = ConsoleServer(console).start()
    try:
        events: list[str] = []

        def read() -> None:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/events?token={TOKEN}", timeout=20) as stream:
                for raw in stream:
                    events.append(raw.decode())

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 10
        while not any(line.startswith("data: {") for line in events) and time.monotonic() < deadline:
            time.sleep(0.05)
        write_run(tmp_path / "run", 3, [institution(rounds=3, steps=12)], rounds_up_to(3), final=True)
        job.finish("finished")
        server.stop()
        reader.join(10)
        assert not reader.is_alive()
    finally:
        server.stop(wait=0)
    states = [json.loads(line[6:]) for line in events if line.startswith("data: {\"")]
    assert states[0]["jobs"][0]["round"] == 2 and states[0]["jobs"][0]["status"] == "running"
    assert states[-1]["jobs"][0]["round"] == 3 and states[-1]["jobs"][0]["status"] == "finished"
    assert states[-1]["ended"] and "event: end\n" in events


def test_server_listens_on_127_0_0_1_only():
    server = ConsoleServer(Console(dict, token=TOKEN)).start()
    try:
        assert server.url.startswith(f"http://127.0.0.1:{server.port}/?token=")
        assert listening_addresses(server.port) == {"127.0.0.1"}
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", server.port), timeout=2)  # another loopback address
    finally:
        server.stop(wait=0)


# -- the numbers ----------------------------------------------------------------------------------


def test_budget_warning_when_the_projection_passes_the_budget():
    rounds = rounds_up_to(2)
    # The job's mechanism projected over 10 rounds: far beyond a budget of 8 at this little noise.
    short = institution("bank-a", noise_multiplier=0.6)
    view = institution_view(short, rounds, planned=10, last_round=2, running=True)
    assert view["projected_epsilon"] > 8.0 and view["remaining_epsilon"] == pytest.approx(5.0)
    assert any("will not last the planned 10 rounds" in w for w in view["warnings"])
    # Enough noise for the planned rounds: no warning, and the projection is the accountant's.
    calm = institution("bank-b", noise_multiplier=5.0, epsilon=0.3, dataset_epsilon=0.3)
    view = institution_view(calm, rounds, planned=10, last_round=2, running=True)
    assert view["warnings"] == [] and 0.3 < view["projected_epsilon"] < 8.0
    from common.accounting import epsilon

    assert projected_epsilon(calm, 8) == pytest.approx(epsilon([(5.0, 0.25, 8 + 4 * 8)], 1e-5, "rdp"))
    # A finished job projects nothing further.
    assert institution_view(short, rounds, planned=10, last_round=2, running=False)["projected_epsilon"] == 3.0


def test_declines_and_dropouts_are_named_with_their_reason(tmp_path):
    rounds = rounds_up_to(2)
    rounds[2]["declined"] = {"bank-a": "budget-spent"}
    rounds[1]["dropped"] = {"bank-b": "went offline"}
    write_run(tmp_path, 3, [institution("bank-a", rounds=1), institution("bank-b", rounds=1)], rounds, final=False)
    job = SimulatedJob(tmp_path, status="running").snapshot()["jobs"][0]
    a, b = job["institutions"]
    assert a["declined"] == {"2": "budget-spent"} and "declined round 2: budget-spent" in a["warnings"]
    assert b["dropped"] == {"1": "went offline"} and b["declined"] == {}
    assert job["round"] == 2 and job["rounds_planned"] == 3 and job["warnings"] >= 1
    assert a["burn"][0] == [0, 8.0, 0.0] and a["burn"][-1] == [2, 5.0, 3.0]  # budget left after each round
    assert job["privacy"]["accountants"] == ["rdp"] and job["privacy"]["secure_aggregation"] is True


def test_coordinator_console_reads_its_runs_without_a_superlink(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    done = write_run(tmp_path / "done", 2, [institution()], rounds_up_to(2), final=True)
    runs = {"111": {"out": str(done), "submitted": "2026-01-01 10:00:00Z", "institutions": 1, "rounds": 2},
            "222": {"out": str(tmp_path / "never-started"), "submitted": "2026-01-02 10:00:00Z", "rounds": 5}}
    (state / "runs.json").write_text(json.dumps(runs))
    jobs = CoordinatorJobs(state)
    jobs.poll_flower()  # no coordinator was ever started here: shown, not raised
    snapshot = jobs.snapshot()
    assert snapshot["mode"] == "coordinator" and "did not answer" in snapshot["nodes_error"]
    newest, older = snapshot["jobs"]
    assert (newest["id"], newest["status"], newest["rounds_planned"]) == ("222", "unknown", 5)
    assert (older["id"], older["status"], older["round"]) == ("111", "finished", 2)


def test_server_cli_has_console_and_follow():
    parser = build_parser()
    assert parser.parse_args(["console", "--port", "0"]).run.__name__ == "cmd_console"
    args = parser.parse_args(["follow", "12345", "--quiet"])
    assert args.run.__name__ == "cmd_follow" and args.run_id == "12345" and args.quiet


def test_flower_lines_are_printed_once():
    """Opacus' import-time logging.basicConfig() used to print each of Flower's lines a second time."""
    code = ("import server, opacus.utils.module_utils; from logging import INFO; "
            "from flwr.common.logger import log; log(INFO, 'printed-once-marker')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("printed-once-marker") == 1
    assert logging.getLogger("flwr").propagate is False


# -- a real browser on a real job -----------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
)

READ_PAGE = """
const text = (id) => { const n = document.getElementById(id); return n ? n.textContent : null; };
const points = (id) => Number(document.getElementById(id).dataset.points || 0);
return {
  jobs: document.querySelectorAll('#jobs li[data-job]').length,
  status: text('job-status'), round: document.getElementById('round-counter').dataset.round || null,
  accuracy_points: points('chart-accuracy'), burn_points: points('chart-burn'), bytes_points: points('chart-bytes'),
  connection: text('connection'),
};
"""


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1440,1900",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@needs_browser
@pytest.mark.timeout(300)
def test_a_browser_follows_a_simulated_job_live(banking_slice, tmp_path):
    train, test = banking_slice
    out = tmp_path / "run"
    command = [sys.executable, "-m", "simulations.cli", "--train", str(train), "--test", str(test),
               "--institutions", "2", "--rounds", "3", "--batch-size", "48", "--secure-aggregation", "off",
               "--out", str(out), "--console", "--tensorboard", "on"]
    log = (tmp_path / "sim.log").open("w")
    sim = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
                           start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    driver = None
    started = time.monotonic()
    try:
        url = None
        for line in sim.stdout:
            if "console at " in line:
                url = line.split("console at ")[1].split()[0]
                break
        assert url and url.startswith("http://127.0.0.1:"), (tmp_path / "sim.log").read_text()[-3000:]
        printed_at = time.monotonic() - started
        threading.Thread(target=lambda: [None for _ in sim.stdout], daemon=True).start()  # keep the pipe drained
        base, token = url.split("/?token=")
        port = int(base.rsplit(":", 1)[1])
        assert not (out / "live.json").exists() or json.loads((out / "live.json").read_text())["rounds"][-1]["round"] == 0
        # the token guards the page and the event stream; the socket is on loopback only
        for path in ("/", "/events", "/api/state"):
            assert status(base + path) == 401 and status(f"{base}{path}?token=x{token}") == 403
        assert listening_addresses(port) == {"127.0.0.1"}

        driver = browser()
        driver.get(url)
        seen = []
        while sim.poll() is None and time.monotonic() - started < 240:
            seen.append(driver.execute_script(READ_PAGE))
            time.sleep(0.1)
        assert sim.wait(60) == 0, (tmp_path / "sim.log").read_text()[-3000:]
        time.sleep(0.5)
        seen.append(final := driver.execute_script(READ_PAGE))

        running = [s for s in seen if s["status"] == "running"]
        assert seen[0]["jobs"] == 1 or running[0]["jobs"] == 1  # the job appeared
        assert len({s["round"] for s in running}) >= 2, running  # the round counter advanced while it ran
        assert running[-1]["accuracy_points"] > running[0]["accuracy_points"]  # the chart gained points
        assert final["status"] == "finished" and final["round"] == "3" and final["accuracy_points"] == 4
        assert final["burn_points"] == 2 * 4 and final["bytes_points"] == 3
        assert "ended" in final["connection"]

        metrics = json.loads((out / "metrics.json").read_text())
        page = lambda selector: driver.find_element("css selector", selector).text  # noqa: E731
        assert page("#final-accuracy") == f"{metrics['rounds'][-1]['accuracy']:.4f}"
        assert page("#final-loss") == f"{metrics['rounds'][-1]['loss']:.4f}"
        for r in metrics["rounds"]:
            row = f"#rounds tr[data-round='{r['round']}']"
            assert page(row + " .accuracy") == f"{r['accuracy']:.4f}" and page(row + " .loss") == f"{r['loss']:.4f}"
            assert page(row + " .bytes-up") == f"{r['bytes_up']:,}" and page(row + " .bytes-down") == f"{r['bytes_down']:,}"
        for inst in metrics["institutions"]:
            row = f"#institutions tr[data-institution='{inst['name']}']"
            assert page(row + " .rounds") == str(inst["rounds"])
            assert page(row + " .epsilon").startswith(f"{inst['epsilon']:.4f}")
            assert page(row + " .dataset-epsilon") == f"{inst['dataset_epsilon']:.4f} / {inst['budget_epsilon']:g}"
            assert page(row + " .remaining") == f"{inst['budget_epsilon'] - inst['dataset_epsilon']:.4f}"
        assert page("#privacy [data-fact='accountant']") == metrics["institutions"][0]["accountant"]
        assert page("#privacy [data-fact='secure aggregation']") == "off"
        # the same job's TensorBoard export (report.tensorboard) holds the same numbers
        exported = scalars(out)
        assert exported["global/accuracy"] == [(r["round"], pytest.approx(r["accuracy"])) for r in metrics["rounds"]]
        for inst in metrics["institutions"]:
            assert [v for _, v in exported[f"dataset_epsilon/{inst['name']}"]][-1] == pytest.approx(inst["dataset_epsilon"])

        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1440, height + 40)
        shot = tmp_path / "console.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
        if keep := os.environ.get("FEDTUNE_CONSOLE_SCREENSHOT"):
            shutil.copy(shot, REPO_ROOT / keep)
        print(f"\nconsole: URL printed {printed_at:.1f} s after start; {len(seen)} page reads, "
              f"rounds seen while running {sorted({s['round'] for s in running}, key=str)}; "
              f"job {metrics['wall_seconds']:.1f} s; test {time.monotonic() - started:.1f} s")
    finally:
        if driver is not None:
            driver.quit()
        if sim.poll() is None:
            os.killpg(sim.pid, signal.SIGTERM)
            try:
                sim.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(sim.pid, signal.SIGKILL)
        log.close()
