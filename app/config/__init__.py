"""The configuration model: the one schema behind serve configs, manifests and the CLI."""

from app.config.models import Autoscaling, ModelSpec, Resources
from app.config.quantity import parse_quantity
from app.config.stack import (
    ConfigError,
    Limits,
    RouterSettings,
    ServerSettings,
    StackConfig,
    load_config,
)

__all__ = [
    "Autoscaling",
    "ConfigError",
    "Limits",
    "ModelSpec",
    "Resources",
    "RouterSettings",
    "ServerSettings",
    "StackConfig",
    "load_config",
    "parse_quantity",
]
