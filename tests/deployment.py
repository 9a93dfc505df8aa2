"""A real multi-site deployment on loopback: one SuperLink and N SuperNodes as processes.

For the deployment tests and the transport benchmark. Secure mode is the documented
deployment: `fedllm pki init`, `fedllm superlink` (TLS + node authentication),
`fedllm pki register`, one `fedllm supernode` per site, `flwr run <app> <connection>`.
Insecure mode is the same without TLS, node auth or signatures (the benchmark's baseline).
Everything listens on 127.0.0.1 only; every process is started in its own session and its
whole group is killed on exit.

Flower 1.41 hard-codes the interval a SuperNode declares for its heartbeats (30 s; the
SuperLink accepts 10 s to 30 min, no flag or variable sets it) and calls a node dead after two
missed ones. With `heartbeat_interval`, the federation's SuperNodes declare (and keep) a
shorter one, so a killed site is named after ~20 s instead of ~60 s; the SuperLink, the
ClientApps and the protocol are unchanged.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = [
    "FlwrRun",
    "LoopbackFederation",
    "adversary_app",
    "free_port",
    "hostile_app",
    "node_id",
    "plain_app",
]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


_SUPERNODE_SHIM = """#!{python}
# flower-supernode with a {interval:g} s node heartbeat (tests/deployment.py writes this file).
import sys

import flwr.supercore.heartbeat
import flwr.supernode.fleet_http_connection
from flwr.supernode.cli import flower_supernode

# Only the node's heartbeat to the SuperLink: the interval it declares and how often it sends.
# flwr.common.constant keeps 30 s: this process also times its ClientApps' task tokens by it,
# and they, unpatched, heartbeat on the 30 s rhythm.
for module in (flwr.supernode.fleet_http_connection, flwr.supercore.heartbeat):
    assert hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"), module  # Flower moved it
    module.HEARTBEAT_DEFAULT_INTERVAL = {interval!r}

sys.exit(flower_supernode())
"""


def _app_dir(
    root: Path,
    name: str,
    *,
    swap: tuple[str, str] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """An app directory: fedllm's pyproject.toml, with one component line swapped, and
    `files` (name -> text) beside it."""
    app = root / name
    app.mkdir(parents=True, exist_ok=True)
    text = (REPO / "pyproject.toml").read_text()
    if swap is not None:
        assert swap[0] in text, swap[0]  # Flower's component line moved: fail, not run fedllm's
        text = text.replace(*swap)
    (app / "pyproject.toml").write_text(text)
    for file, content in (files or {}).items():
        (app / file).write_text(content)
    return app


def adversary_app(root: Path) -> Path:
    """An app directory whose ClientApp is `tests/adversary.py` (the ServerApp is fedllm's):
    the compromised sites' code, shipped to every SuperNode as the run's FAB."""
    return _app_dir(
        root,
        "adversary-app",
        swap=('clientapp = "clients.app:app"', 'clientapp = "adversary:app"'),
        files={"adversary.py": (REPO / "tests" / "adversary.py").read_text()},
    )


def plain_app(root: Path) -> Path:
    """An app directory holding only fedllm's pyproject.toml (its ServerApp and ClientApp
    come from the installed environment): a FAB whose hash the test knows in advance, so a
    site can pin it."""
    return _app_dir(root, "plain-app")


def hostile_app(root: Path, target_node: int) -> Path:
    """An app directory whose ServerApp is `tests/hostile.py` (fedllm's, sending node
    `target_node` a run name that is a path) and whose ClientApp is fedllm's: a hostile
    coordinator's FAB."""
    code = (REPO / "tests" / "hostile.py").read_text()
    assert "\nTARGET_NODE = 0\n" in code
    return _app_dir(
        root,
        "hostile-app",
        swap=('serverapp = "server.app:app"', 'serverapp = "hostile:app"'),
        files={
            "hostile.py": code.replace("\nTARGET_NODE = 0\n", f"\nTARGET_NODE = {target_node}\n")
        },
    )


def node_id(log: str) -> int:
    """The node id a SuperNode's log says the SuperLink gave it (the last one, if it
    reconnected)."""
    found = re.findall(r"SuperNode ID: (\d+)", log)
    if not found:
        raise ValueError(f"no SuperNode ID in the log:\n{log[-2000:]}")
    return int(found[-1])


class FlwrRun:
    """A `flwr run --stream` in progress; its output is in the federation's logs."""

    def __init__(self, fed: LoopbackFederation, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.fed, self.name, self.proc = fed, name, proc

    def output(self) -> str:
        return self.fed.log(self.name)

    def wait(self, timeout: float = 600.0) -> str:
        """The streamed log once `flwr run` exits (it exits when the ServerApp finishes)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fed.kill(self.name)
            tail = self.output()[-4000:]
            raise TimeoutError(f"flwr run did not finish in {timeout:g}s:\n{tail}") from None
        return self.output()


class LoopbackFederation:
    """Start with `with LoopbackFederation(tmp, ...) as fed:`; `fed.run(...)` runs a job."""

    def __init__(
        self,
        root: Path,
        *,
        sites: int = 3,
        secure: bool = True,
        node_config: dict[int, str] | None = None,
        extra_sites: tuple[str, ...] = (),
        heartbeat_interval: float | None = None,
        pins: dict[int, list[str]] | None = None,
    ) -> None:
        """`heartbeat_interval` (seconds, at least 10): what the sites' SuperNodes declare
        instead of Flower's 30 (a dead one is named after two missed heartbeats). `pins`:
        the FAB SHA-256s a site runs (`fedllm supernode --app-sha256`); a pinned site's
        SuperNode is fedllm's pinned one, so it keeps Flower's 30 s heartbeat."""
        self.root, self.sites, self.secure = Path(root), sites, secure
        self.node_config = node_config or {}
        self.pins = pins or {}
        self.pki = self.root / "pki"
        self.logs = self.root / "logs"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.connection = "fedllm-loopback"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.site_names = [f"site-{k}" for k in range(sites)] + list(extra_sites)
        self.supernode = str(BIN / "flower-supernode")
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        if heartbeat_interval is not None:
            # `fedllm supernode` execs `flower-supernode` from PATH: this one comes first.
            shim_dir = self.root / "bin"
            shim_dir.mkdir(parents=True, exist_ok=True)
            shim = shim_dir / "flower-supernode"
            shim.write_text(
                _SUPERNODE_SHIM.format(python=sys.executable, interval=float(heartbeat_interval))
            )
            shim.chmod(0o755)
            self.supernode, path = str(shim), f"{shim_dir}{os.pathsep}{path}"
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.root / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": path,
        }

    # -- processes -------------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything it started (a site's machine is lost)."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def _fedllm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "fedllm"), *args], env=self.env, capture_output=True, text=True, check=check
        )

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> LoopbackFederation:
        try:
            self._up()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _up(self) -> None:
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        if self.secure:
            self._fedllm(
                "pki", "init", "--out", str(self.pki), "--hosts", "127.0.0.1,localhost",
                "--sites", ",".join(self.site_names),
            )  # fmt: skip
            self._fedllm(
                "federation", "add", self.connection, "--address", self.address,
                "--root-certificates", str(self.pki / "ca.pem"),
            )  # fmt: skip
            cmd = [
                str(BIN / "fedllm"), "superlink", "--pki", str(self.pki), "--hosts", "127.0.0.1",
                "--host", "127.0.0.1", "--port", str(self.port),
            ]  # fmt: skip
        else:
            (home / "config.toml").write_text(
                f'[superlink]\ndefault = "{self.connection}"\n\n'
                f'[superlink.{self.connection}]\naddress = "{self.address}"\ninsecure = true\n'
            )
            cmd = [
                str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                "--port", str(self.port),
            ]  # fmt: skip
        self._start("superlink", cmd)
        self._wait_for_port()
        if self.secure:
            names = ",".join(f"site-{k}" for k in range(self.sites))
            self._fedllm(
                "pki", "register", "--dir", str(self.pki), "--federation", self.connection,
                "--sites", names,
            )  # fmt: skip
        for k in range(self.sites):
            self.start_site(k)
        self.wait_for_sites([f"site-{k}" for k in range(self.sites)])

    def start_site(self, k: int, *, name: str | None = None, args: list[str] | None = None) -> str:
        """Start a SuperNode for partition k (or, with `args`, Flower's own flower-supernode
        with any flags: the shim's heartbeat applies to the federation's sites only)."""
        name = name or f"site-{k}"
        state = self.root / "state" / name
        state.mkdir(parents=True, exist_ok=True)
        extra = f'state-dir="{state}" {self.node_config.get(k, "")}'.strip()
        if args is not None:
            cmd = [str(BIN / "flower-supernode"), *args]
        elif self.secure:
            cmd = [
                str(BIN / "fedllm"), "supernode", "--site-dir", str(self.pki / "sites" / name),
                "--superlink", self.address, "--partition-id", str(k),
                "--num-partitions", str(self.sites), "--port", str(free_port()),
                "--node-config", extra,
            ]  # fmt: skip
            cmd += [arg for pin in self.pins.get(k, []) for arg in ("--app-sha256", pin)]
        else:
            cmd = [
                self.supernode, "--insecure", "--superlink", self.address,
                "--port", str(free_port()), "--node-config",
                f"partition-id={k} num-partitions={self.sites} {extra}",
            ]  # fmt: skip
        self._start(name, cmd)
        return name

    def _wait_for_port(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"superlink exited:\n{self.log('superlink')[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"superlink did not listen on {self.address}")

    def wait_for_sites(self, names: list[str], timeout: float = 90.0) -> None:
        """Until every named SuperNode has been accepted by the SuperLink (has a node id)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(re.search(r"SuperNode ID: \d+", self.log(n)) for n in names):
                return
            for n in names:
                if self.procs[n].poll() is not None:
                    raise RuntimeError(f"{n} exited:\n{self.log(n)[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"SuperNodes {names} were not accepted within {timeout:g}s")

    def run(self, run_config: dict[str, Any], *, app: Path = REPO) -> FlwrRun:
        """Start `flwr run <app> <connection> --stream` with `run_config` (flat keys)."""
        n = sum(1 for name in self.procs if name.startswith("flwr-run"))
        config = self.root / f"run-{n}.toml"
        config.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in run_config.items()))
        cmd = [
            str(BIN / "flwr"), "run", str(app), self.connection, "--stream",
            "--run-config", str(config),
        ]  # fmt: skip
        name = f"flwr-run-{n}"
        return FlwrRun(self, name, self._start(name, cmd))

    def __exit__(self, *_: object) -> None:
        # Flower's SuperLink starts its superexec in a session of its own (the ServerApps run
        # there): besides each started process's group, stop the groups of its descendants.
        groups = {proc.pid for proc in self.procs.values()} | _descendant_groups(
            [proc.pid for proc in self.procs.values() if proc.poll() is None]
        )
        groups.discard(os.getpgrp())
        for group in groups:
            try:
                os.killpg(group, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Children of a process that exited (Flower's superexec, clientapps) share its
        # process group: sweep each group too, until it is empty.
        for group in groups:
            deadline_group = time.monotonic() + 30
            while time.monotonic() < deadline_group:
                try:
                    os.killpg(group, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    break
                time.sleep(0.2)


def _descendant_groups(roots: list[int]) -> set[int]:
    """The process groups of every live descendant of `roots` (read from /proc)."""
    children: dict[int, list[int]] = {}
    group: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # it exited meanwhile
            continue
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        group[pid] = int(fields[2])
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(group[child])
            todo.append(child)
    return found
