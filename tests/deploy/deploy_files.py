"""Reading the deployment files as the code sees them: the Compose file (interpolated as Compose does), the Helm
chart (rendered with Helm's own library), and every role's command line parsed by that role's own parser."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
CHART = DEPLOY / "helm" / "mixquant"
GPU_VALUES = CHART / "values-gpu-2p2d.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
# `python -m MODULE` of each role; each module's args.main builds its parser
ROLES = {"router": "router.args", "prefill_worker": "prefill_worker.args", "decode_worker": "decode_worker.args",
         "mixquant_serve.worker": "mixquant_serve.worker.args"}
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and $$ (the forms the file uses)."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1)) or (m.group(2) or "")
    return _VARIABLE.sub(one, text)


def load_compose(text: str | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    return yaml.safe_load(interpolate(COMPOSE.read_text() if text is None else text, env or {}))


def default_profiles() -> list[str]:
    """COMPOSE_PROFILES from deploy/.env: what `docker compose up` without --profile starts."""
    for line in (DEPLOY / ".env").read_text().splitlines():
        if line.startswith("COMPOSE_PROFILES="):
            return line.split("=", 1)[1].split(",")
    return []


def enabled(compose: dict[str, Any], profiles: list[str]) -> dict[str, dict[str, Any]]:
    """The services Compose starts with these profiles (a service without profiles always starts)."""
    return {name: svc for name, svc in compose["services"].items()
            if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)}


def render_chart(values: dict[str, Any] | None = None, chart: Path = CHART) -> list[dict[str, Any]]:
    """Every manifest the chart renders (release `mq` in namespace `serve`), NOTES.txt aside."""
    import helm_python as helm

    with helm.Chart.load(str(chart)) as loaded:
        rendered = loaded.render(values=values, name="mq", namespace="serve", is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if not path.endswith("NOTES.txt"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def gpu_values() -> dict[str, Any]:
    return yaml.safe_load(GPU_VALUES.read_text())


def role_of(command: list[str]) -> str | None:
    """The role module of `python -m MODULE ...`, or None for any other command."""
    if len(command) >= 3 and command[0] == "python" and command[1] == "-m" and command[2] in ROLES:
        return command[2]
    return None


def parse_role(module: str, argv: list[str]) -> argparse.Namespace | Any:
    """argv through the role's own parser (and its checks); raises ValueError with argparse's message.

    The router returns its RouterConfig; a worker the Namespace its main() would run with (the engine is not built,
    but its EngineConfig is validated)."""
    args_module = importlib.import_module(ROLES[module])
    captured: list[argparse.Namespace] = []
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if module == "router":
                return args_module.parse_args(argv)
            real_run = args_module.run
            args_module.run = lambda args, make: captured.append(args)
            try:
                args_module.main(argv)
            finally:
                args_module.run = real_run
    except SystemExit as e:
        raise ValueError(f"python -m {module} rejects {argv}: {err.getvalue().strip()}") from e
    from mixquant_serve.cli_args import dataclass_from_args
    from mixquant_serve.config import EngineConfig

    dataclass_from_args(EngineConfig, captured[0]).validate()
    return captured[0]


def flag(argv: list[str], name: str) -> str | None:
    """The value after `name` in argv (the last one, as argparse keeps), or None."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else None


def split_url(url: str) -> tuple[str, int]:
    """tcp://host:port or http://host:port/... -> (host, port)."""
    m = re.fullmatch(r"[a-z]+://([^:/]+):(\d+)(/.*)?", url)
    if not m:
        raise ValueError(f"not a scheme://host:port address: {url!r}")
    return m.group(1), int(m.group(2))


def dockerfile_copies(target: str) -> set[str]:
    """Destinations of the COPY lines of one Dockerfile stage."""
    stage, found = None, set()
    for line in DOCKERFILE.read_text().splitlines():
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line):
            stage = m.group(1)
        elif stage == target and line.startswith("COPY ") and "--from" not in line:
            found.add(line.split()[-1])
    return found


def dockerfile_instruction(target: str, instruction: str) -> str | None:
    """The (last) argument text of one instruction in one Dockerfile stage, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stage, found = None, None
    for line in text.splitlines():
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line):
            stage = m.group(1)
        elif stage == target and line.startswith(instruction + " "):
            found = line[len(instruction) + 1:].strip()
    return found
