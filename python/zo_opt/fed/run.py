"""Run a federated ZO job for real on this machine: Flower's deployment engine on loopback.

    python -m zo_opt.fed.run --rounds 3 --num-clients 2 --model-size 20M --out-dir runs/fed

starts one ``flower-superlink`` and one ``flower-supernode`` per client as separate
processes (127.0.0.1 only, free ports, each in its own process group), writes the app
directory (``app.write_app_dir``) and a private ``$FLWR_HOME/config.toml`` with the
connection, waits for every ``/health``, runs ``flwr run APP_DIR loopback --stream``, and
stops every process it started. Nothing leaves the machine: telemetry and update checks are
off (``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1``), ``FLWR_HOME`` is a
temporary folder, no dependency is installed at run time, no Ray simulation engine is used,
and the Hugging Face libraries run offline. The data is the offline KJV corpus by default.
Every ``--flag`` is a ``FedConfig`` field (``--local-steps`` for ``local_steps``).
The server's ``summary.json`` (in ``--out-dir``) has the bytes per round against FedAvg.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, fields
from pathlib import Path

from .app import write_app_dir
from .protocol import FAULTS
from .task import FedConfig

CONNECTION = "loopback"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def safe_env(flwr_home: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", FLWR_HOME=str(flwr_home),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    # The SuperLink and SuperNodes spawn flower-superexec, flwr-serverapp and flwr-clientapp
    # by name: the interpreter's bin folder (the venv's) comes first on PATH.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively (Linux /proc): Flower detaches its SuperExec into a new
    session, so killing our process groups alone could miss it."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def healthy(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=1.0) as r:
            return r.status == 200
    except OSError:
        return False


class Loopback:
    """A SuperLink and ``num_clients`` SuperNodes on 127.0.0.1; a context manager that stops
    them (SIGTERM to each process group, SIGKILL after 5 s) on exit."""

    def __init__(self, workdir: Path, num_clients: int, node_config: dict[int, dict] | None = None,
                 env: dict | None = None, startup_timeout: float = 60.0):
        self.workdir = Path(workdir)
        self.flwr_home = self.workdir / "flwr_home"
        self.logs = self.workdir / "logs"
        self.num_clients = num_clients
        self.node_config = node_config or {}
        self.startup_timeout = startup_timeout
        self.env = safe_env(self.flwr_home, env)
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.node_ports = [free_port() for _ in range(num_clients)]

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                             start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    def _wait_healthy(self, port: int, proc: subprocess.Popen, name: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not healthy(port):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.logs / (name + '.log')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not healthy on 127.0.0.1:{port} after {self.startup_timeout} s")
            time.sleep(0.2)

    def __enter__(self) -> "Loopback":
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        try:
            link = self._start("superlink", [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                             "--port", str(self.port),
                                             "--disable-runtime-dependency-installation"])
            self._wait_healthy(self.port, link, "superlink")
            nodes = []
            for i, port in enumerate(self.node_ports):
                cfg = {"partition-id": i, "num-partitions": self.num_clients, **self.node_config.get(i, {})}
                nc = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in cfg.items())
                nodes.append(self._start(f"supernode{i}", [
                    _bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                    "--host", "127.0.0.1", "--port", str(port), "--node-config", nc]))
            for i, (port, p) in enumerate(zip(self.node_ports, nodes)):
                self._wait_healthy(port, p, f"supernode{i}")
        except BaseException:
            self.stop()
            raise
        return self

    def flwr_run(self, app_dir: Path, timeout: float = 600.0, echo: bool = False) -> subprocess.CompletedProcess:
        """``flwr run APP_DIR loopback --stream``; its output is also kept in logs/flwr_run.log."""
        argv = [_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                             cwd=self.workdir, start_new_session=True, text=True)
        self.procs.append(p)
        lines = []
        deadline = time.monotonic() + timeout
        with open(self.logs / "flwr_run.log", "w") as log:
            for line in p.stdout:
                lines.append(line)
                log.write(line)
                if echo:
                    print(line, end="", flush=True)
                if time.monotonic() > deadline:
                    break
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = None
        return subprocess.CompletedProcess(argv, rc, "".join(lines), "")

    def stop(self) -> None:
        spawned = [(c, _cmdline(c)) for p in self.procs if p.poll() is None for c in _descendants(p.pid)]
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:  # the group: also the ServerApp/ClientApp processes they spawned
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if p.stdout:
                p.stdout.close()
        for pid, cmd in spawned:  # what they started, if it outlived them (by pid, never by name)
            if _cmdline(pid) != cmd:  # gone, or the pid was reused
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.procs.clear()

    def __exit__(self, *exc) -> None:
        self.stop()


def run(cfg: dict, workdir: Path, node_config: dict[int, dict] | None = None, timeout: float = 600.0,
        echo: bool = False) -> tuple[subprocess.CompletedProcess, dict | None]:
    """One federated run; returns (the ``flwr run`` result, the server's summary or None)."""
    workdir = Path(workdir)
    app_dir = write_app_dir(workdir / "app", **cfg)
    with Loopback(workdir, int(cfg.get("num_clients", FedConfig.num_clients)), node_config) as lb:
        result = lb.flwr_run(app_dir, timeout=timeout, echo=echo)
    out = Path(cfg["out_dir"]) / "summary.json" if cfg.get("out_dir") else None
    return result, (json.loads(out.read_text()) if out and out.exists() else None)


def report(summary: dict) -> str:
    lines = [f"{summary['parameters']:,} parameters; FedAvg sends {summary['fedavg_bytes_per_client_one_way']:,} "
             "bytes per client each way", "round  accepted  rejected  bytes down  bytes up  FedAvg bytes  ratio  val loss"]
    for r in summary["rounds"]:
        total = r["bytes_down"] + r["bytes_up"]
        lines.append(f"{r['round']:>5}  {str(r['accepted']):>8}  {len(r['rejected']):>8}  {r['bytes_down']:>10,}  "
                     f"{r['bytes_up']:>8,}  {r['fedavg_bytes']:>12,}  {r['fedavg_bytes'] / max(total, 1):>5.0f}x  "
                     f"{r.get('val_loss', float('nan')):.4f}")
        for rej in r["rejected"]:
            lines.append(f"       rejected node {rej['node']}: {rej['reason']}")
    ok = [c.get("bit_identical") for c in summary.get("clients", [])]
    lines.append(f"clients bit-identical to the server after catching up from records: {ok}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zo_opt.fed.run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = asdict(FedConfig())
    for f in fields(FedConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(defaults[f.name]), default=defaults[f.name])
    ap.add_argument("--workdir", default=None, help="logs, app dir and FLWR_HOME (default: a temporary folder)")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--fault", action="append", default=[], metavar="CLIENT:ROUND:KIND",
                    help=f"make a client send a malformed reply ({', '.join(FAULTS)}), to see it rejected")
    args = vars(ap.parse_args(argv))
    workdir, timeout, faults = args.pop("workdir"), args.pop("timeout"), args.pop("fault")
    try:
        FedConfig(**args).check()
    except ValueError as e:
        ap.error(f"argument {e}")
    node_config = {}
    for f in faults:  # a typo here crashed (unpacking) or, as an unknown kind, silently did nothing
        parts = f.split(":")
        c, r, kind = parts if len(parts) == 3 else ("", "", "")
        if not (c.isdigit() and int(c) < args["num_clients"] and r.isdigit() and 1 <= int(r) <= args["rounds"]
                and kind in FAULTS):
            ap.error(f"argument --fault: expected CLIENT:ROUND:KIND with CLIENT < --num-clients, ROUND in "
                     f"1..--rounds and KIND one of {', '.join(FAULTS)}; got {f!r}")
        node_config[int(c)] = {"fault": f"{r}:{kind}"}
    if not args["out_dir"]:
        args["out_dir"] = str(Path(workdir or ".").resolve() / "fed_out") if workdir else tempfile.mkdtemp(prefix="zo_fed_out_")
    args["out_dir"] = str(Path(args["out_dir"]).resolve())
    with tempfile.TemporaryDirectory(prefix="zo_fed_") as tmp:
        result, summary = run(args, Path(workdir or tmp).resolve(), node_config, timeout=timeout, echo=True)
        if summary is None:
            print(f"no summary: flwr run exited with {result.returncode}; logs in {Path(workdir or tmp)}/logs",
                  file=sys.stderr)
            return 1
    print(report(summary))
    print(f"outputs: {args['out_dir']}")
    return 0 if result.returncode == 0 and all(c.get("bit_identical") for c in summary["clients"]) else 1


if __name__ == "__main__":
    sys.exit(main())
