"""The routing API's value types: replica stats, the request view, the decision, the protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from app.routing.tokens import DEFAULT_BLOCK_SIZE, approx_tokens, chain_hashes

if TYPE_CHECKING:
    from app.routing.receipts import RouteReceipt


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """What a policy may know about one candidate replica at decision time."""

    replica_id: str
    healthy: bool = True
    in_flight: int = 0
    queued: int = 0
    kv_usage: float = 0.0
    max_concurrency: int = 64
    lora_adapters: frozenset[str] = frozenset()

    @property
    def load(self) -> float:
        """In-flight requests as a fraction of the concurrency limit."""
        return self.in_flight / max(1, self.max_concurrency)


@dataclass(slots=True)
class RequestView:
    """The routing-relevant part of one request.

    Give `token_ids` when the caller has tokenised the prompt; otherwise `text` is split by the
    approximation in `app.routing.tokens` (one token per 4 UTF-8 bytes). Block hashes are computed
    once per block size and cached on the view. `receipt`: the decision should carry a route
    receipt (`app.routing.receipts`).
    """

    model: str
    text: str | None = None
    token_ids: Sequence[int] | None = None
    session_key: str | None = None
    lora_adapter: str | None = None
    receipt: bool = False
    _hashes: dict[int, Sequence[int]] = field(default_factory=dict, repr=False)
    _length: int = field(default=-1, repr=False)

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens (approximate for text; cached)."""
        if self._length < 0:
            ids = self.token_ids
            self._length = len(ids) if ids is not None else approx_tokens(self.text or "")
        return self._length

    def block_hashes(self, block_size: int = DEFAULT_BLOCK_SIZE) -> Sequence[int]:
        """Chained hashes of the prompt's full blocks (cached)."""
        hashes = self._hashes.get(block_size)
        if hashes is None:
            source = self.token_ids if self.token_ids is not None else (self.text or "")
            hashes = chain_hashes(source, block_size, self.lora_adapter)
            self._hashes[block_size] = hashes
        return hashes


class Decision(NamedTuple):
    """The chosen replica, the policy that chose it and why (e.g. `prefix-match=0.83`); the
    chosen replica's match (its share of the prompt in its cached prefix, as the policy knows
    it; None for a policy without a prefix signal); the route receipt, when the request asked.

    A named tuple: immutable, and cheap to make on the routing hot path."""

    replica_id: str
    policy: str
    reason: str
    match: float | None = None
    receipt: RouteReceipt | None = None

    @property
    def reason_kind(self) -> str:
        """The reason without its value (`prefix-match`), for counting decisions (lab figures)."""
        return self.reason.split("=", 1)[0]


@runtime_checkable
class Policy(Protocol):
    """Picks one healthy replica for a request."""

    name: str

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        """Pick a replica among the healthy candidates; NoReplicaError if there is none."""
        ...

    def on_first_token(self, request: RequestView, replica_id: str) -> None:
        """The request sent to `replica_id` has its first token (its prefill is done)."""
        ...

    def on_complete(self, request: RequestView, replica_id: str) -> None:
        """The request sent to `replica_id` has finished."""
        ...

    def forget_replica(self, replica_id: str) -> None:
        """The replica is gone: drop whatever is kept about it."""
        ...


class NoReplicaError(RuntimeError):
    """No healthy candidate replica."""
