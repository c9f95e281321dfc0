"""The configuration model: the one schema behind serve configs, manifests and the CLI."""

from app.config.models import Autoscaling, KVOffload, ModelSpec, Resources, SecretRef
from app.config.quantity import parse_quantity
from app.config.stack import (
    AuthSettings,
    ConfigError,
    KeyLimits,
    Limits,
    RouterSettings,
    ServerSettings,
    StackConfig,
    load_config,
)

__all__ = [
    "AuthSettings",
    "Autoscaling",
    "ConfigError",
    "KVOffload",
    "KeyLimits",
    "Limits",
    "ModelSpec",
    "Resources",
    "RouterSettings",
    "SecretRef",
    "ServerSettings",
    "StackConfig",
    "load_config",
    "parse_quantity",
]
