"""The configuration model: the one schema behind serve configs, manifests and the CLI."""

from app.config.batches import BatchSettings
from app.config.capture import CaptureSettings
from app.config.lora import LoraAdapter, LoraSettings
from app.config.models import Autoscaling, KVOffload, ModelSpec, Resources, SecretRef
from app.config.quantity import parse_quantity
from app.config.responses import ResponsesSettings
from app.config.stack import (
    AuthSettings,
    ConfigError,
    Limits,
    RouterSettings,
    ServerSettings,
    StackConfig,
    load_config,
)
from app.config.tenants import (
    PRIORITY_CLASSES,
    KeyLimits,
    KeySources,
    Tenant,
    TenantQuotas,
)

__all__ = [
    "PRIORITY_CLASSES",
    "AuthSettings",
    "Autoscaling",
    "BatchSettings",
    "CaptureSettings",
    "ConfigError",
    "KVOffload",
    "KeyLimits",
    "KeySources",
    "Limits",
    "LoraAdapter",
    "LoraSettings",
    "ModelSpec",
    "Resources",
    "ResponsesSettings",
    "RouterSettings",
    "SecretRef",
    "ServerSettings",
    "StackConfig",
    "Tenant",
    "TenantQuotas",
    "load_config",
    "parse_quantity",
]
