"""Start and stop a private TorchServe (free loopback ports, own TMPDIR/logs); used by the tests,
bench/serve.py and bench/soak.py.

The server gets its own TMPDIR (TorchServe keeps its pid file there, so `torchserve --stop` only
ever stops this one), its own TEMP (the JVM's java.io.tmpdir, where the frontend puts the unix
sockets of its workers: without it, two servers on one machine would share /tmp/.ts.sock.9000)
and its own cwd/log dir; after `--stop`, every process it had spawned that is still alive is
killed by pid. Model folders are built with ``--archive-format no-archive`` and a config whose
``handler.model`` points at the checkpoint, so nothing large is copied.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def build_model_folder(store: Path, name: str, model_dir: Path, handler: dict, extra_yaml: dict | None = None,
                       handler_file: Path | None = None, extra_files: list[Path] = ()) -> Path:
    """A no-archive model folder whose config points at the checkpoint (no 150 MB copy).

    ``handler_file`` replaces handler/ts_entry.py; ``extra_files`` are copied next to it (the
    worker puts the model folder on sys.path, so the handler file can import them)."""
    cfg = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 0, "asyncCommunication": True,
           "startupTimeout": 600, "responseTimeout": 600, "deviceType": "cpu", "jobQueueSize": 1024,
           "handler": dict(handler, model=str(model_dir))}
    cfg.update(extra_yaml or {})
    tmp = store.parent / f"{name}-config.yaml"
    tmp.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, TMPDIR=str(store.parent / "archiver-tmp"))
    os.makedirs(env["TMPDIR"], exist_ok=True)
    extra = ["--extra-files", ",".join(str(f) for f in extra_files)] if extra_files else []
    subprocess.run([str(VENV_BIN / "torch-model-archiver"), "--model-name", name, "--version", "1.0",
                    "--handler", str(handler_file or ROOT / "handler" / "ts_entry.py"), "--config-file", str(tmp),
                    "--export-path", str(store), "--archive-format", "no-archive", "--force", *extra],
                   check=True, env=env, cwd=str(store.parent))
    return store / name


def parse_properties(text: str) -> dict[str, str]:
    """key=value lines of a config.properties (comments and blank lines dropped)."""
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


TEST_PROPERTIES = {
    "disable_token_authorization": "true",
    "enable_model_api": "true",
    "metrics_mode": "prometheus",
    "max_request_size": "16777216",
    "max_response_size": "16777216",
    "default_workers_per_model": "1",
    "install_py_dep_per_model": "false",
}


class TorchServe:
    def __init__(self, workdir: Path, ports: list[int], properties: dict[str, str] | None = None):
        """``properties``: the config.properties to run (default TEST_PROPERTIES); its addresses,
        ports, model store and metrics config are always replaced by this server's own."""
        self.workdir = workdir
        self.properties = dict(TEST_PROPERTIES if properties is None else properties)
        self.http, self.mgmt, self.metrics_port, self.grpc, self.grpc_mgmt = ports
        self.base = f"http://127.0.0.1:{self.http}"
        self.mgmt_url = f"http://127.0.0.1:{self.mgmt}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.store = workdir / "store"
        self.tmp = workdir / "tmp"
        self.logs = workdir / "logs"
        self.java_pid: int | None = None
        self.env = dict(os.environ, TMPDIR=str(self.tmp), TEMP=str(self.tmp), LOG_LOCATION=str(self.logs),
                        METRICS_LOCATION=str(self.logs),
                        PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
                        PYTHONPATH=str(ROOT) + (":" + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        self.env.pop("OMP_NUM_THREADS", None)

    def write_config(self) -> Path:
        props = dict(self.properties)
        props.pop("load_models", None)  # the models to load are given to start()
        props.update({
            "inference_address": f"http://127.0.0.1:{self.http}",
            "management_address": f"http://127.0.0.1:{self.mgmt}",
            "metrics_address": f"http://127.0.0.1:{self.metrics_port}",
            "grpc_inference_address": "127.0.0.1",
            "grpc_management_address": "127.0.0.1",
            "grpc_inference_port": str(self.grpc),
            "grpc_management_port": str(self.grpc_mgmt),
            "model_store": str(self.store),
            "metrics_config": str(ROOT / "handler" / "paged_handler" / "metrics.yaml"),
        })
        path = self.workdir / "config.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def start(self, models: str) -> None:
        for d in (self.store, self.tmp, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        cfg = self.write_config()
        with open(self.workdir / "ts.out", "ab") as out:
            subprocess.run([str(VENV_BIN / "torchserve"), "--start", "--ncs", "--model-store", str(self.store),
                            "--models", models, "--ts-config", str(cfg)],
                           cwd=str(self.workdir), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                           check=True, timeout=120)
        pid_file = self.tmp / ".model_server.pid"
        for _ in range(100):
            if pid_file.exists() and pid_file.read_text().strip():
                self.java_pid = int(pid_file.read_text().strip())
                break
            time.sleep(0.1)

    @property
    def mgmt_headers(self) -> dict:
        """What a management call needs: the management key when token authorization is on."""
        if self.properties.get("disable_token_authorization", "false") == "true":
            return {}
        return {"Authorization": f"Bearer {self.keys()['management']}"}

    def wait_ready(self, model: str = "llm", timeout: float = 600) -> None:
        t0 = time.time()
        last = None
        while time.time() - t0 < timeout:
            try:
                r = requests.get(f"{self.mgmt_url}/models/{model}", headers=self.mgmt_headers, timeout=5)
                if r.status_code == 200:
                    workers = r.json()[0].get("workers", [])
                    last = workers
                    if workers and all(w.get("status") == "READY" for w in workers):
                        return
            except (requests.RequestException, OSError, ValueError, KeyError) as exc:  # keys not written yet
                last = exc
            time.sleep(1)
        raise TimeoutError(f"TorchServe model {model} not ready after {timeout}s: {last}\n{self.log_tail()}")

    def descendants(self) -> list[int]:
        import psutil
        if self.java_pid is None:
            return []
        try:
            return [p.pid for p in psutil.Process(self.java_pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        import psutil
        ours = ([self.java_pid] if self.java_pid else []) + self.descendants()
        try:
            subprocess.run([str(VENV_BIN / "torchserve"), "--stop"], cwd=str(self.workdir), env=self.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + 30
        while time.time() < deadline and any(psutil.pid_exists(p) and _alive(p) for p in ours):
            time.sleep(0.5)
        for pid in ours:
            if psutil.pid_exists(pid) and _alive(pid):
                try:
                    psutil.Process(pid).kill()
                except psutil.NoSuchProcess:
                    pass

    def log_tail(self, n: int = 60) -> str:
        f = self.logs / "model_log.log"
        if not f.exists():
            return ""
        return "\n".join(f.read_text(errors="replace").splitlines()[-n:])

    def keys(self) -> dict:
        """The token-authorization keys TorchServe wrote (``{"management": ..., "inference": ...}``)."""
        data = json.loads((self.workdir / "key_file.json").read_text())
        return {kind: data[kind]["key"] for kind in ("management", "inference")}

    def worker_pid(self, model: str = "llm") -> int:
        r = requests.get(f"{self.mgmt_url}/models/{model}", headers=self.mgmt_headers, timeout=30)
        r.raise_for_status()
        return r.json()[0]["workers"][0]["pid"]

    def frontend_jobs(self) -> int:
        """Request jobs the frontend still holds (live RestJob / GRPCJob objects after a full GC).

        TorchServe keeps a job until its final response says ``ts_stream_next: false``; once
        every request is answered this must be 0, or jobs (and their request bodies) pile up.
        """
        out = subprocess.run(["jcmd", str(self.java_pid), "GC.class_histogram"], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        count = 0
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[3] in ("org.pytorch.serve.job.RestJob", "org.pytorch.serve.job.GRPCJob"):
                count += int(parts[1])
        return count

    def describe(self, model: str = "llm") -> dict:
        r = requests.get(f"{self.mgmt_url}/models/{model}?customized=true", headers=self.mgmt_headers, timeout=30)
        r.raise_for_status()
        meta = r.json()[0]["customizedMetadata"]
        return json.loads(meta) if isinstance(meta, str) else meta


@contextlib.contextmanager
def serving(workdir: Path, name: str, model_dir: Path, handler: dict) -> Iterator[TorchServe]:
    """A private TorchServe on free loopback ports serving one model folder (``build_model_folder``),
    yielded once its worker is ready; stopped, with every process it spawned, on exit."""
    ts = TorchServe(workdir, free_ports(5))
    ts.store.mkdir(parents=True, exist_ok=True)
    build_model_folder(ts.store, name, model_dir, handler)
    try:
        ts.start(f"{name}={name}")
        ts.wait_ready(name)
        yield ts
    finally:
        ts.stop()


def _alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
