"""The cluster's files and batches: one store per Serve application, shared by every ingress
replica (`app.shared_actor`: the actor `batches:<app>`), plain Python here.

Files are bytes with OpenAI's file object; uploads count against `max_stored_bytes` (refused
past it), result files are always kept. A batch holds its requests, parsed and checked by the
ingress that created it. Ingress replicas' workers `claim` requests, oldest batch first, and
`report` each answer as a line of the output (a 2xx answer) or the error file; a claim not
reported within `lease_s` (its replica died) is handed out again. A batch whose requests are all
reported is finalized into its files and `completed`; a cancelled one stops handing requests out
and is `cancelled` once its claimed ones are reported; one past its completion window is
`expired` (what completed is kept). Another owner's file or batch is as absent as a missing one.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LEASE_S = 600.0  # a claimed request not reported by then is handed out again
MAX_BATCHES = 10_000  # batch records kept; the oldest finished go first
FINISHED = frozenset({"completed", "failed", "expired", "cancelled"})


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass(slots=True)
class StoredFile:
    id: str
    owner: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def card(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": len(self.data),
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Work:
    """One request of a batch, handed to a worker."""

    batch_id: str
    index: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(slots=True)
class Batch:
    card: dict[str, Any]  # OpenAI's batch object, as answered
    owner: str
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (custom_id, body)
    next: int = 0  # the first request never handed out
    claimed: dict[int, float] = field(default_factory=dict)  # index -> lease deadline
    retry: list[int] = field(default_factory=list)  # leases that ran out
    output: dict[int, bytes] = field(default_factory=dict)
    errors: dict[int, bytes] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.card["status"]

    def reported(self) -> int:
        return len(self.output) + len(self.errors)


class BatchStore:
    """Files and batches of every owner (see the module docstring). `clock`: epoch seconds;
    `monotonic`: for leases."""

    def __init__(
        self,
        max_stored_bytes: int,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        lease_s: float = LEASE_S,
    ) -> None:
        self.max_stored_bytes = max_stored_bytes
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}
        self.uploaded = 0  # bytes of uploads kept
        self._clock, self._monotonic, self.lease_s = clock, monotonic, lease_s

    # -- files ------------------------------------------------------------------------------
    def add_file(self, owner: str, filename: str, purpose: str, data: bytes) -> dict | None:
        """Keep an upload; its file object, or None when the store has no room for it."""
        if self.uploaded + len(data) > self.max_stored_bytes:
            return None
        self.uploaded += len(data)
        return self._keep(owner, filename, purpose, data).card()

    def _keep(self, owner: str, filename: str, purpose: str, data: bytes) -> StoredFile:
        stored = StoredFile(new_id("file"), owner, filename, purpose, data, int(self._clock()))
        self.files[stored.id] = stored
        return stored

    def file(self, owner: str, file_id: str) -> dict | None:
        stored = self._file(owner, file_id)
        return stored.card() if stored is not None else None

    def file_list(self, owner: str, purpose: str | None = None) -> list[dict]:
        """The owner's files, newest first."""
        mine = [f for f in self.files.values() if f.owner == owner]
        return [f.card() for f in reversed(mine) if purpose is None or f.purpose == purpose]

    def content(self, owner: str, file_id: str) -> bytes | None:
        stored = self._file(owner, file_id)
        return stored.data if stored is not None else None

    def delete_file(self, owner: str, file_id: str) -> bool:
        stored = self._file(owner, file_id)
        if stored is None:
            return False
        del self.files[file_id]
        if stored.purpose != "batch_output":
            self.uploaded -= len(stored.data)
        return True

    def _file(self, owner: str, file_id: str) -> StoredFile | None:
        stored = self.files.get(file_id)
        return stored if stored is not None and stored.owner == owner else None

    # -- batches ----------------------------------------------------------------------------
    def create_batch(
        self,
        owner: str,
        card: dict[str, Any],
        requests: list[tuple[str, dict[str, Any]]],
        errors: list[dict[str, Any]],
    ) -> dict:
        """A new batch from its checked requests (`card`: the request's fields: endpoint,
        input file, window, metadata); `failed` at once with `errors` (the input's faults)."""
        now = int(self._clock())
        window_s = int(card["completion_window"].removesuffix("h")) * 3600
        card = {
            "id": new_id("batch"), "object": "batch", **card, "errors": None,
            "status": "in_progress", "output_file_id": None, "error_file_id": None,
            "created_at": now, "in_progress_at": now, "expires_at": now + window_s,
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": len(requests), "completed": 0, "failed": 0},
        }  # fmt: skip
        batch = Batch(card, owner, requests)
        if errors:
            card |= {"status": "failed", "failed_at": now, "in_progress_at": None,
                     "errors": {"object": "list", "data": errors}}  # fmt: skip
            batch.requests = []
        self.batches[card["id"]] = batch
        self._forget_old()
        if not errors and not requests:
            self._finalize(batch)
        return dict(card)

    def batch(self, owner: str, batch_id: str) -> dict | None:
        self._expire()
        found = self._batch(owner, batch_id)
        return dict(found.card) if found is not None else None

    def batch_list(self, owner: str) -> list[dict]:
        """The owner's batches, newest first."""
        self._expire()
        return [dict(b.card) for b in reversed(self.batches.values()) if b.owner == owner]

    def cancel(self, owner: str, batch_id: str) -> dict | None:
        """Stop handing the batch's requests out; `cancelled` once the claimed ones are in."""
        batch = self._batch(owner, batch_id)
        if batch is None:
            return None
        if batch.status not in FINISHED and batch.status != "cancelling":
            batch.card |= {"status": "cancelling", "cancelling_at": int(self._clock())}
            batch.retry.clear()
            batch.next = len(batch.requests)
            self._settle(batch)
        return dict(batch.card)

    def _batch(self, owner: str, batch_id: str) -> Batch | None:
        batch = self.batches.get(batch_id)
        return batch if batch is not None and batch.owner == owner else None

    # -- workers ----------------------------------------------------------------------------
    def claim(self, count: int) -> list[Work]:
        """Up to `count` requests to run, oldest batch first (leases that ran out first)."""
        self._expire()
        now, handed = self._monotonic(), []
        for batch_id, batch in self.batches.items():
            if batch.status != "in_progress":
                continue
            for index, deadline in list(batch.claimed.items()):
                if deadline < now:
                    del batch.claimed[index]
                    batch.retry.append(index)
            while len(handed) < count and (batch.retry or batch.next < len(batch.requests)):
                if batch.retry:
                    index = batch.retry.pop()
                else:
                    index, batch.next = batch.next, batch.next + 1
                batch.claimed[index] = now + self.lease_s
                custom_id, body = batch.requests[index]
                handed.append(Work(batch_id, index, custom_id, batch.card["endpoint"], body))
            if len(handed) >= count:
                break
        return handed

    def report(self, batch_id: str, index: int, ok: bool, line: bytes) -> None:
        """A claimed request's result: a line of the output file (`ok`) or the error file."""
        batch = self.batches.get(batch_id)
        if batch is None or index not in batch.claimed:
            return  # the batch is gone, or the request was reported already
        del batch.claimed[index]
        (batch.output if ok else batch.errors)[index] = line
        counts = batch.card["request_counts"]
        counts["completed" if ok else "failed"] += 1
        self._settle(batch)

    def _settle(self, batch: Batch) -> None:
        """Finalize a batch with every request in, or a cancelled one with no claim out."""
        if batch.status == "in_progress" and batch.reported() == len(batch.requests):
            self._finalize(batch)
        elif batch.status in ("cancelling", "expired") and not batch.claimed:
            self._finalize(batch, batch.status)

    def _finalize(self, batch: Batch, ending: str = "completed") -> None:
        now = int(self._clock())
        batch.card["finalizing_at"] = now
        for kind, lines in (("output", batch.output), ("error", batch.errors)):
            if lines:
                data = b"".join(lines[i] for i in sorted(lines))
                name = f"{batch.card['id']}_{kind}.jsonl"
                stored = self._keep(batch.owner, name, "batch_output", data)
                batch.card[f"{kind}_file_id"] = stored.id
        status = {"completed": "completed", "cancelling": "cancelled", "expired": "expired"}
        batch.card["status"] = status[ending]
        batch.card[f"{batch.card['status']}_at"] = now
        batch.requests, batch.output, batch.errors = [], {}, {}

    def _expire(self) -> None:
        now = self._clock()
        for batch in self.batches.values():
            if batch.status == "in_progress" and now >= batch.card["expires_at"]:
                batch.card |= {"status": "expired", "expired_at": int(now)}
                batch.retry.clear()
                batch.next = len(batch.requests)
                if not batch.claimed:
                    self._finalize(batch, "expired")

    def _forget_old(self) -> None:
        finished = [i for i, b in self.batches.items() if b.status in FINISHED]
        for batch_id in finished[: max(0, len(self.batches) - MAX_BATCHES)]:
            del self.batches[batch_id]

    def status(self) -> dict[str, Any]:
        """Files and bytes kept, batches by status, requests waiting to be handed out."""
        by_status: dict[str, int] = {}
        for batch in self.batches.values():
            by_status[batch.status] = by_status.get(batch.status, 0) + 1
        waiting = sum(len(b.requests) - b.next + len(b.retry) for b in self.batches.values()
                      if b.status == "in_progress")  # fmt: skip
        return {"files": len(self.files), "uploaded_bytes": self.uploaded,
                "max_stored_bytes": self.max_stored_bytes, "batches": by_status,
                "waiting": waiting}  # fmt: skip


def result_line(work: Work, status: int, body: dict[str, Any], request_id: str) -> bytes:
    """A request's line of the output (2xx) or error file, in OpenAI's shape."""
    error = None
    if status >= 300:
        detail = body.get("error") if isinstance(body.get("error"), dict) else {}
        error = {"code": detail.get("code") or str(status), "message": detail.get("message")}
    line = {
        "id": new_id("batch_req"),
        "custom_id": work.custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": error,
    }
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"
