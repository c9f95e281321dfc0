"""Reading Ray Serve config files (`serve run` format) whose applications use our builder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from app.config import ConfigError, StackConfig, load_config

BUILDER = "app.builder:build_app"


@dataclass(frozen=True)
class StackApp:
    """One application of a serve config file that runs our builder."""

    name: str
    route_prefix: str
    config: StackConfig


@dataclass(frozen=True)
class ServeConfigFile:
    path: Path
    raw: dict[str, Any]
    apps: list[StackApp]

    @property
    def http_port(self) -> int:
        return int((self.raw.get("http_options") or {}).get("port", 8000))

    @property
    def http_host(self) -> str:
        return str((self.raw.get("http_options") or {}).get("host", "127.0.0.1"))


def read_serve_config(path: str | Path) -> ServeConfigFile:
    """Parse a serve config file and validate every stack application's `args`.

    Raises ConfigError naming the file, the application and each bad field.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read serve config: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("applications"), list):
        raise ConfigError(f"{path}: a serve config needs an 'applications' list")
    apps = []
    for index, app in enumerate(raw["applications"]):
        if not isinstance(app, dict) or app.get("import_path") != BUILDER:
            continue
        name = str(app.get("name", "default"))
        try:
            config = load_config(app.get("args") or {})
        except ConfigError as exc:
            raise ConfigError(f"{path}: applications[{index}] ({name}): {exc}") from None
        apps.append(StackApp(name, str(app.get("route_prefix", "/")), config))
    if not apps:
        raise ConfigError(f"{path}: no application has import_path {BUILDER!r}")
    return ServeConfigFile(path, raw, apps)
