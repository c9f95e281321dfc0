"""GET /usage: each tenant's usage across the cluster (for `vrstack usage`; docs/tenants.md#usage).

One row per tenant of the config, and one `keys` row for every caller without a tenant (keys
under `limits.per_key` and anonymous callers, folded together: no key id is listed). The
figures are the quota ledger's, summed over every ingress replica since the ledger started
(`scope: cluster`); when no ledger is shared (no tenant and no `limits.per_key`), this
replica's own since it started (`scope: replica`). Protected like /metrics (`auth.protect_metrics`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter

from app.config import StackConfig
from app.errors import OpenAIError
from app.ingress.routes.common import GatewayDep
from app.tenants.ledger import KEYS_ROW

router = APIRouter(tags=["metrics"])
logger = logging.getLogger("vrstack.ingress")
KEYS = "keys"  # the row of callers without a tenant


@router.get("/usage")
async def usage(gateway: GatewayDep) -> dict[str, Any]:
    """Requests answered and refused (per quota), prompt and output tokens, tokens charged
    today, quotas and the ledger's current figures, per tenant (and one row for keys)."""
    try:
        figures = await gateway.limiter.usage_figures()
    except Exception as exc:
        logger.warning("usage: the quota ledger cannot be read: %r", exc)
        raise OpenAIError.unreachable("quota ledger", "ledger_unavailable") from None
    return usage_table(gateway.config, figures)


def usage_table(config: StackConfig, figures: dict[str, Any]) -> dict[str, Any]:
    """The /usage body from the limiter's `usage_figures`."""
    rows = figures.get("rows") or {}
    accounts = figures.get("accounts") or {}
    tenants = [
        _row(tenant.name, "tenant", rows.get(tenant.name), tenant.quotas, accounts.get(tenant.name))
        for tenant in config.tenants
    ]
    keys = _row(KEYS, "keys", rows.get(KEYS_ROW), config.limits.per_key, None)
    if figures.get("key_accounts") is not None:
        keys["current"]["key_accounts"] = figures["key_accounts"]
    since = float(figures.get("since") or 0)
    return {
        "tenants": [*tenants, keys],
        "since": datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds"),
        "scope": figures.get("scope", "cluster"),
        "replicas": figures.get("replicas"),
    }


def _row(
    name: str, kind: str, counts: dict[str, Any] | None, quotas: Any, ledger: dict | None
) -> dict[str, Any]:
    counts = counts or {}
    refused = {k: int(v) for k, v in sorted((counts.get("refused") or {}).items()) if k}
    return {
        "tenant": name,
        "kind": kind,
        "requests": int(counts.get("requests", 0)),
        "refused": sum(refused.values()),
        "refused_by_quota": refused,
        "prompt_tokens": int(counts.get("prompt_tokens", 0)),
        "output_tokens": int(counts.get("output_tokens", 0)),
        "tokens": int(counts.get("tokens", 0)),
        "tokens_today": int(counts.get("tokens_today", 0)),
        "quotas": quotas.model_dump(exclude_none=True),
        "current": _current(ledger or {}),
    }


def _current(snapshot: dict[str, float]) -> dict[str, Any]:
    """The ledger's figures of an account: what its buckets have left, the tokens counted today
    (slices included), and what the replicas hold (slots: in flight plus spares)."""
    names = {
        "requests_level": "requests_available",
        "tokens_level": "tokens_available",
        "day_used": "day_tokens_used",
        "slots_held": "slots_held",
    }
    return {names[k]: round(v, 1) for k, v in snapshot.items() if k in names}
