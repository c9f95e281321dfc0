"""Trace files: JSONL, one request a line.

Each line is `{"t": seconds, "model": str, "session": str | null, "max_tokens": int}` plus exactly
one prompt field: `"prompt": str`, `"messages": [{"role", "content"}, ...]` (rendered as
`role: content` lines, as `app.routing.render_messages` renders a request body's messages) or
`"tokens": [int, ...]`. Optional: `"tenant": str` and `"priority": int` (lower is served first),
read by the tenants scenario's admission rules (`app.lab.tenants`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.routing import RequestView, render_messages, view_of_body


@dataclass(slots=True)
class TraceRequest:
    """One request of a trace."""

    t: float
    model: str
    prompt: str | None = None
    tokens: list[int] | None = None
    session: str | None = None
    max_tokens: int = 64
    tenant: str | None = None
    priority: int = 0

    def body(self) -> dict[str, Any]:
        """This request as an OpenAI completions body (the session as `user`)."""
        prompt = self.tokens if self.tokens is not None else self.prompt
        return {
            "model": self.model,
            "prompt": prompt,
            "user": self.session,
            "max_tokens": self.max_tokens,
        }

    def view(self) -> RequestView:
        """The routing view of this request (of its body, as a router reads it)."""
        return view_of_body(self.body(), model=self.model)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": round(self.t, 6), "model": self.model, "session": self.session}
        if self.tokens is not None:
            out["tokens"] = self.tokens
        else:
            out["prompt"] = self.prompt or ""
        out["max_tokens"] = self.max_tokens
        if self.tenant is not None:
            out["tenant"] = self.tenant
        if self.priority:
            out["priority"] = self.priority
        return out


def parse_line(line: str, lineno: int = 0) -> TraceRequest:
    """One trace line; ValueError naming the line and the problem."""
    try:
        obj = json.loads(line)
        prompts = [k for k in ("prompt", "messages", "tokens") if k in obj]
        if len(prompts) != 1:
            raise ValueError("needs exactly one of prompt, messages, tokens")
        prompt = obj.get("prompt")
        if "messages" in obj:
            if not isinstance(obj["messages"], list):
                raise ValueError("messages must be a list")
            prompt = render_messages(obj["messages"])
        tokens = [int(x) for x in obj["tokens"]] if "tokens" in obj else None
        return TraceRequest(
            t=float(obj["t"]),
            model=str(obj.get("model", "default")),
            prompt=prompt,
            tokens=tokens,
            session=obj.get("session"),
            max_tokens=int(obj.get("max_tokens", 64)),
            tenant=obj.get("tenant"),
            priority=int(obj.get("priority", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"trace line {lineno}: {exc}") from None


def read_trace(path: str | Path) -> list[TraceRequest]:
    """A trace file's requests, sorted by time."""
    with open(path, encoding="utf-8") as f:
        reqs = [parse_line(line, i) for i, line in enumerate(f, 1) if line.strip()]
    return sorted(reqs, key=lambda r: r.t)


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    """Write requests as JSONL."""
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps(r.to_json(), separators=(",", ":")) + "\n")
