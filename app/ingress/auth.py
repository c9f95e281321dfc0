"""Bearer API keys: from the config, an environment variable or a mounted secret file, for
`auth` and for each tenant (whose keys share its quotas).

When no source yields a key, the ingress refuses to start if keys are required (naming each
place it looked), else serves everyone and logs one warning saying so.

Keys are kept only as SHA-256 digests and compared in constant time; a key is identified in
limits and logs by a short digest prefix, never by its text.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import AuthSettings, ConfigError, KeySources, Tenant
from app.errors import OpenAIError
from app.ingress.middleware import send_error

logger = logging.getLogger("vrstack.ingress")
ANONYMOUS = "anonymous"
OPEN_PATHS = frozenset({"/health", "/version"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyStore:
    """The accepted keys (as digests), and the tenant each tenant key belongs to."""

    def __init__(self, keys: list[str], tenants: Mapping[str, list[str]] | None = None) -> None:
        self._digests = [_digest(k) for k in _unique(keys)]
        self._tenants: dict[str, str] = {}  # key id -> tenant name
        for tenant, tenant_keys in (tenants or {}).items():
            for key in _unique(tenant_keys):
                digest = _digest(key)
                key_id = digest.hex()[:12]
                if digest in self._digests:
                    owner = self._tenants.get(key_id, "auth")
                    raise ConfigError(
                        f"a key of tenant {tenant!r} is also one of {owner!r}'s; a key belongs "
                        "to one tenant (or to auth)"
                    )
                self._digests.append(digest)
                self._tenants[key_id] = tenant

    @classmethod
    def from_settings(cls, settings: AuthSettings, tenants: Sequence[Tenant] = ()) -> KeyStore:
        """The keys of every source in `settings` and in each tenant. None found: a
        `ConfigError` naming each place looked in when keys are required (`auth.required`, or
        a Secret is named), else one warning that auth is off and where it looked. A tenant
        reading a Secret that holds no key is a `ConfigError` too; any other tenant without
        a key, a warning."""
        by_tenant = {tenant.name: _keys(tenant) for tenant in tenants}
        for tenant in tenants:
            if any(k.strip() for k in by_tenant[tenant.name]):
                continue
            looked = "; ".join(_places(tenant, f"tenants[{tenant.name}]"))
            if tenant.api_keys_secret is not None:
                raise ConfigError(f"tenant {tenant.name!r} has no API key; looked in: {looked}")
            logger.warning("tenant %r has no API key (looked in: %s)", tenant.name, looked)
        store = cls(_keys(settings), by_tenant)
        if store.enabled:
            return store
        looked = "; ".join(_places(settings))
        if settings.required or settings.api_keys_secret is not None:
            # Fail closed: a stack meant to check keys must not serve everyone.
            raise ConfigError(
                f"API keys are required but none was found; looked in: {looked}. Put a key in "
                "one of them"
            )
        logger.warning(
            "API keys are off: every caller is served without a key (looked in: %s); set "
            "auth.required: true to refuse to start without keys",
            looked,
        )
        return store

    def tenant_of(self, key_id: str) -> str | None:
        """The tenant a key id (from `authenticate`) belongs to, if any."""
        return self._tenants.get(key_id)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, key: str) -> str | None:
        """The key's id (a digest prefix) if accepted, else None; constant time per key."""
        digest = _digest(key)
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return digest.hex()[:12] if found else None

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The caller's key id (`anonymous` when auth is off), or a 401 `OpenAIError`."""
        if not self.enabled:
            return ANONYMOUS
        header = dict(headers).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        found = self.identify(token.strip()) if scheme.lower() == "bearer" else None
        if found is not None:
            return found
        missing = scheme.lower() != "bearer" or not token.strip()
        raise OpenAIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'" if missing else "invalid API key",
            code="missing_api_key" if missing else "invalid_api_key",
            headers={"www-authenticate": "Bearer"},
        )


class AuthMiddleware:
    """401 in OpenAI's shape without a valid `Authorization: Bearer <key>` (but on the open
    paths); sets the key id in `scope["state"]["api_key_id"]` for per-key limits, and its
    tenant (or None) in `scope["state"]["tenant"]`."""

    def __init__(self, app: ASGIApp, *, keys: KeyStore, protect_metrics: bool = False) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = open_paths(protect_metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key_id = ANONYMOUS
        if scope["path"] not in self.open_paths:
            try:
                key_id = self.keys.authenticate(scope.get("headers") or [])
            except OpenAIError as exc:
                await send_error(send, exc)
                return
        state = scope.setdefault("state", {})
        state["api_key_id"], state["tenant"] = key_id, self.keys.tenant_of(key_id)
        await self.app(scope, receive, send)


def _unique(keys: Iterable[str]) -> list[str]:
    return [k for k in dict.fromkeys(k.strip() for k in keys) if k]


def _keys(settings: KeySources) -> list[str]:
    """The keys of every source in `settings` (not yet stripped or deduplicated)."""
    keys = [k.get_secret_value() for k in settings.api_keys]
    if settings.api_keys_env:
        keys += os.environ.get(settings.api_keys_env, "").split(",")
    if settings.api_keys_file:
        keys += _file_keys(settings.api_keys_file)
    return keys


def _file_keys(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"api_keys_file {path} cannot be read: {exc.strerror}") from None


def _places(settings: KeySources, where: str = "auth") -> list[str]:
    """Where `from_settings` looked for keys, each found empty."""
    places = [f"{where}.api_keys in the config holds no key"]
    if settings.api_keys_env:
        places.append(
            f"${settings.api_keys_env} holds no key (the environment of the ingress replica's "
            "Ray worker: that of `ray start` or of its pod, not of `serve run`)"
        )
    if settings.api_keys_file:
        places.append(f"file {settings.api_keys_file} holds no key")
    if settings.api_keys_secret is not None:
        secret = settings.api_keys_secret
        places.append(
            f"Kubernetes Secret {secret.name!r} key {secret.key!r} (put in "
            f"${settings.api_keys_env} on the ingress pods) is missing or empty"
        )
    return places


def open_paths(protect_metrics: bool) -> frozenset[str]:
    """Paths answered without a key: health and version, and metrics and usage unless
    protected (`auth.protect_metrics`)."""
    return OPEN_PATHS if protect_metrics else OPEN_PATHS | {"/metrics", "/usage"}
