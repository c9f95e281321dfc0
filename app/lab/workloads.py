"""Seeded, deterministic trace generators for the three benchmark workloads.

Text is made of 3-letter words plus a space: 4 bytes, i.e. one token under the routing
approximation (`app.routing.tokens`), so lengths below are in tokens.
"""

from __future__ import annotations

import random
import string

from app.lab.trace import TraceRequest

_LETTERS = string.ascii_lowercase


def _words(rng: random.Random, n: int) -> str:
    return "".join(
        rng.choice(_LETTERS) + rng.choice(_LETTERS) + rng.choice(_LETTERS) + " " for _ in range(n)
    )


def multi_round_qa(
    users: int = 40,
    rounds: int = 6,
    system_prompt: int = 1000,
    history: int = 2000,
    answer: int = 100,
    question: int = 50,
    qps: float = 4.0,
    model: str = "default",
    seed: int = 0,
) -> list[TraceRequest]:
    """production-stack's multi-round QA: users with a shared system prompt and their own
    history; each round's prompt is the previous prompt, its answer and a new question.
    Poisson arrivals at `qps` overall; every user speaks once per round, in a shuffled order."""
    rng = random.Random(seed)
    sys_text = _words(rng, system_prompt)
    convo = [sys_text + _words(rng, history) for _ in range(users)]
    out: list[TraceRequest] = []
    t = 0.0
    for _ in range(rounds):
        order = list(range(users))
        rng.shuffle(order)
        for u in order:
            convo[u] += _words(rng, question)
            out.append(TraceRequest(t, model, convo[u], None, f"user-{u}", answer))
            convo[u] += _words(rng, answer)
            t += rng.expovariate(qps)
    return out


def shared_prefix(
    groups: int = 16,
    prompts_per_group: int = 32,
    system_prompt: int = 2000,
    question: int = 128,
    output: int = 64,
    qps: float = 8.0,
    model: str = "default",
    seed: int = 0,
) -> list[TraceRequest]:
    """SGLang's generated shared prefix: groups of prompts sharing a long system prompt, each
    with its own question; requests shuffled and sent at `qps` (Poisson)."""
    rng = random.Random(seed)
    prefixes = [_words(rng, system_prompt) for _ in range(groups)]
    prompts = [
        prefixes[g] + _words(rng, question) for g in range(groups) for _ in range(prompts_per_group)
    ]
    rng.shuffle(prompts)
    t = 0.0
    out = []
    for p in prompts:
        out.append(TraceRequest(t, model, p, None, None, output))
        t += rng.expovariate(qps)
    return out


def multi_tenant(
    tenants: int = 8,
    shared_context: int = 3000,
    users_per_tenant: int = 8,
    queries_per_user: int = 4,
    query: int = 100,
    output: int = 100,
    qps: float = 6.0,
    model: str = "default",
    seed: int = 0,
) -> list[TraceRequest]:
    """llm-d's multi-tenant prefix workload: each tenant has a long shared context; its users
    send short queries after it; Poisson arrivals at `qps`, tenants and users mixed at random."""
    rng = random.Random(seed)
    contexts = [_words(rng, shared_context) for _ in range(tenants)]
    slots = [
        (tn, u)
        for tn in range(tenants)
        for u in range(users_per_tenant)
        for _ in range(queries_per_user)
    ]
    rng.shuffle(slots)
    t = 0.0
    out = []
    for tn, u in slots:
        prompt = contexts[tn] + _words(rng, query)
        out.append(TraceRequest(t, model, prompt, None, f"tenant-{tn}-user-{u}", output))
        t += rng.expovariate(qps)
    return out


WORKLOADS = {
    "multi-round-qa": multi_round_qa,
    "shared-prefix": shared_prefix,
    "multi-tenant": multi_tenant,
}
