"""The stack's internal token: what an engine replica's port asks of every request, so that only
the stack's ingress can call it (`app.engines.http_server`).

One random token per Serve application and Ray cluster, kept by a small named actor that the
first replica to ask creates; every replica of the application, whenever it starts, gets the
same token from it, so rebuilds and rolling updates never split ingress and engines. The actor
takes no CPU and goes with the cluster.
"""

from __future__ import annotations

import secrets

import ray

NAMESPACE = "vrstack"


@ray.remote(num_cpus=0)
class TokenKeeper:
    """Holds one application's internal token."""

    def __init__(self) -> None:
        self._token = secrets.token_urlsafe(32)

    def token(self) -> str:
        return self._token


async def internal_token(app_name: str) -> str:
    """The internal token of the Serve application `app_name` (made on first use)."""
    keeper = TokenKeeper.options(
        name=f"token:{app_name}", namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()
    return await keeper.token.remote()
