"""Run one pipeline as a deployment from a generated prefect.yaml on a real Prefect server and worker, then
take screenshots of the Prefect UI in headless Chromium: the parameter form, the run page and the summary.

    python -m deploy.screenshots PIPELINE.yaml [--set search.target.blocks=2 ...] [--out docs]
    python -m deploy.screenshots --tiny --out docs     # a tiny random model: the whole trip in a minute or two

Needs `chromium` on PATH (Debian: apt-get install -y chromium). The server, work pool and worker live in a
temporary Prefect home and are stopped at the end. The run's parameters are the pipeline's with the
`--set` overrides applied, sent as a UI user would send them, so the run's tags show them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx

from deploy.prefect_yaml import WORK_POOL, render
from pipelines import load_spec

PROJECT = Path(__file__).resolve().parent.parent
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(what: str, ready, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if ready():
                return
        time.sleep(1)
    raise TimeoutError(f"{what} not ready after {seconds:.0f} s")


class Processes:
    """Child processes in their own sessions, stopped clients first (SIGTERM, then SIGKILL after 20 s)."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=PROJECT)
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.started):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[tuple[str, dict[str, str], Processes]]:
    """A Prefect server on a free port with its own home; yields its API URL, a client environment, and the
    process list more children join."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": api, "HF_HUB_OFFLINE": "1", "PRUNEFLOW_PROJECT_DIR": str(PROJECT)}
    env.pop("PREFECT_API_URL", None)
    home.mkdir(parents=True, exist_ok=True)
    processes = Processes(home)
    try:
        processes.start("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env)
        _wait("Prefect server", lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 240)
        yield api, {**env, "PREFECT_API_URL": api}, processes
    finally:
        processes.stop()


def deploy(pipeline: Path, env: dict[str, str], folder: Path) -> Path:
    """Writes the generated prefect.yaml for `pipeline` and deploys it with `prefect deploy --all`."""
    prefect_file = folder / "prefect.yaml"
    prefect_file.write_text(render([pipeline]))
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    subprocess.run([*prefect, "work-pool", "create", WORK_POOL, "--type", "process"], env=env, cwd=PROJECT,
                   check=True, capture_output=True)
    subprocess.run([*prefect, "deploy", "--all", "--prefect-file", str(prefect_file)], env=env, cwd=PROJECT,
                   check=True, capture_output=True)
    return prefect_file


def deployment(api: str, name: str) -> dict:
    found = [d for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json() if d["name"] == name]
    if not found:
        raise LookupError(f"no deployment named {name}")
    return found[0]


def run_deployment(api: str, deployment_id: str, parameters: dict, seconds: float) -> dict:
    """Creates a flow run with these parameters (as the UI's form does) and waits for a final state."""
    run = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters},
                     timeout=10).json()
    deadline = time.time() + seconds
    while time.time() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()
        if run["state"]["type"] in FINAL:
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {run['id']} still {run['state']['type']} after {seconds:.0f} s")


def screenshot(url: str, path: Path, width: int = 1400, height: int = 1100) -> Path:
    """Headless Chromium; the virtual-time budget lets the UI's JavaScript fetch and draw first."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise FileNotFoundError("chromium not on PATH (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        "--virtual-time-budget=20000", f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=120)
    _shrink(path)
    return path


def _shrink(path: Path) -> None:
    # A UI screenshot has few colours: a 256-colour palette keeps it readable at a fraction of the size.
    from PIL import Image

    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=256).save(path, optimize=True)


def _tiny_pipeline(root: Path) -> Path:
    from tests.flowkit import tiny_pipeline  # a tiny random model and corpus, as the tests build them

    return tiny_pipeline(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", nargs="?")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of PIPELINE")
    parser.add_argument("--set", action="append", default=[], metavar="dotted.key=value")
    parser.add_argument("--out", default="docs", help="folder for the PNGs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the run may take")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pruneflow-screens-") as tmp:
        root = Path(tmp)
        pipeline = _tiny_pipeline(root) if args.tiny else Path(args.pipeline).resolve()
        spec = load_spec(pipeline, args.set)
        with prefect_server(root / "prefect-home") as (api, env, processes):
            deploy(pipeline, env, root)
            processes.start("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL],
                            env)
            found = deployment(api, spec.name)
            ui = api.removesuffix("/api")
            screenshot(f"{ui}/deployments/deployment/{found['id']}/run", out / "prefect-parameter-form.png",
                       height=1600)
            run = run_deployment(api, found["id"], {"spec": spec.model_dump(mode="json")}, args.timeout)
            print(f"flow run {run['name']}: {run['state']['type']}, tags {sorted(run['tags'])}")
            if run["state"]["type"] != "COMPLETED":
                print(run["state"].get("message"), (root / "prefect-home" / "worker.log").read_text()[-4000:])
            screenshot(f"{ui}/runs/flow-run/{run['id']}", out / "prefect-run-page.png")
            artifacts = httpx.post(f"{api}/artifacts/filter",
                                   json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}, timeout=10).json()
            summary = next(a for a in artifacts if a["type"] == "markdown")
            screenshot(f"{ui}/artifacts/artifact/{summary['id']}", out / "prefect-summary.png", height=2200)
    for name in ("prefect-parameter-form", "prefect-run-page", "prefect-summary"):
        print(f"wrote {out / name}.png ({(out / f'{name}.png').stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
