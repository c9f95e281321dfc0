"""Per-tenant usage: each replica's figures summed by the quota ledger, `GET /usage` on the
ingress, and `vrstack usage` against a real local HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.cli import usage as usage_module
from app.config import KeyLimits, TenantQuotas, load_config
from app.ingress.auth import ANONYMOUS
from app.ingress.limits import KeyLimiter, QuotaError
from app.ingress.routes.usage import usage_table
from app.tenants.ledger import KEYS_ROW, Ledger, LocalLedger
from tests.test_auth_limits import bearer
from tests.test_ingress import assert_openai_error
from tests.test_shared_quotas import Clock
from tests.test_tenant_limits import _tenant, tenant_client

TENANTS = {
    "a": TenantQuotas(requests_per_second=10, burst=3, tokens_per_minute=60000),
    "b": TenantQuotas(max_concurrent=5),
}


def replicas(count: int = 2, holder_ttl_s: float = 10.0):
    clock = Clock()
    ledger = Ledger(clock=clock, wall=clock.wall, holder_ttl_s=holder_ttl_s)
    limiters = []
    for i in range(count):
        limiter = KeyLimiter(
            KeyLimits(requests_per_second=100), clock, tenants=TENANTS, wall=clock.wall
        )
        limiter.share(LocalLedger(ledger), f"r{i}")
        limiters.append(limiter)
    return clock, ledger, limiters


async def answered(limiter: KeyLimiter, key: str, tenant: str | None, prompt: int, output: int):
    await limiter.ready(key, 100, tenant)
    lease = limiter.acquire(key, 100, tenant)
    lease.settle_tokens(prompt, output)
    lease.release()


def test_the_ledger_sums_every_replicas_usage():
    clock, ledger, (r0, r1) = replicas()

    async def run():
        await answered(r0, "ka", "a", 10, 5)
        await answered(r1, "ka", "a", 20, 7)
        await answered(r1, "kb", "b", 3, 4)
        await answered(r0, "k1", None, 1, 2)  # a key without a tenant...
        await answered(r1, ANONYMOUS, None, 4, 8)  # ...and an anonymous caller: one row
        failed = r0.acquire("kb", 50, "b")
        failed.settle(0)  # an engine's refusal: not an answer, no tokens
        failed.release()
        refused = 0
        for limiter in (r0, r1, r0, r1):  # "a"'s burst of 3 is spent after one more
            await limiter.ready("ka", 100, "a")
            try:
                limiter.acquire("ka", 100, "a").release()
            except QuotaError:
                refused += 1
        with pytest.raises(QuotaError):
            r0.acquire("ka", 10**6, "a")  # larger than the quota: a 400, counted too
        for limiter in (r0, r1):
            await limiter.sync()
        return refused

    refused = asyncio.run(run())
    rows = ledger.usage()["rows"]
    a, b, keys = rows["a"], rows["b"], rows[KEYS_ROW]
    assert a["requests"] == 2 + 4 - refused and refused >= 1
    assert (a["prompt_tokens"], a["output_tokens"]) == (30, 12)
    assert a["refused"] == {"requests_per_second": refused, "tokens_per_minute": 1}
    assert (b["requests"], b["prompt_tokens"], b["output_tokens"], b["refused"]) == (1, 3, 4, {})
    assert (keys["requests"], keys["prompt_tokens"], keys["output_tokens"]) == (2, 5, 10)
    assert keys["tokens_today"] == 15 and b["tokens_today"] == 7
    assert not any(name.startswith("k") and name != KEYS_ROW for name in rows)

    # A replica that is gone keeps its figures in the totals; reports are not counted twice.
    async def later():
        clock.t += 30  # r0 silent past the ledger's TTL
        await answered(r1, "ka", "a", 1, 1)
        await r1.sync()
        await r1.sync()

    asyncio.run(later())
    totals = ledger.usage()
    assert totals["rows"]["a"]["requests"] == a["requests"] + 1
    assert totals["rows"]["a"]["prompt_tokens"] == 31
    assert totals["replicas"] == 1


def test_usage_table_lists_tenants_and_one_keys_row():
    config = load_config(
        {
            "models": [{"name": "m", "source": "org/m"}],
            "limits": {"per_key": {"requests_per_second": 2}},
            "tenants": [_tenant("a", "sk-a", quotas={"max_concurrent": 4}), _tenant("b", "sk-b")],
        }
    )
    figures = {
        "rows": {"a": {"requests": 3, "refused": {"max_concurrent": 2}, "prompt_tokens": 9}},
        "accounts": {"a": {"slots_held": 1.0}},
        "key_accounts": 7,
        "since": 0,
        "scope": "cluster",
    }
    table = usage_table(config, figures)
    assert [row["tenant"] for row in table["tenants"]] == ["a", "b", "keys"]
    a, b, keys = table["tenants"]
    assert (a["requests"], a["refused"], a["refused_by_quota"]) == (3, 2, {"max_concurrent": 2})
    assert a["quotas"] == {"max_concurrent": 4} and a["current"] == {"slots_held": 1.0}
    assert b["requests"] == 0 and b["quotas"] == {}
    assert keys["kind"] == "keys" and keys["current"] == {"key_accounts": 7}
    assert keys["quotas"] == {"requests_per_second": 2}
    assert table["since"] == "1970-01-01T00:00:00+00:00"


@pytest.mark.anyio
async def test_get_usage_on_the_ingress(cpu_model):
    tenants = (_tenant("a", "sk-a"), _tenant("b", "sk-b"))
    protected = {"api_keys": ["sk-plain"], "api_keys_env": None, "protect_metrics": True}
    async with tenant_client(cpu_model, *tenants, auth=protected) as (client, engines, _):
        engines["smollm2"].usage = {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}
        body = {"model": "smollm2", "prompt": "hello", "max_tokens": 4}
        for key in ("sk-a", "sk-a", "sk-plain"):
            response = await client.post("/v1/completions", json=body, headers=bearer(key))
            assert response.status_code == 200, response.text
        assert_openai_error(await client.get("/usage"), 401)  # protected like /metrics
        response = await client.get("/usage", headers=bearer("sk-plain"))
        assert response.status_code == 200, response.text
        usage = response.json()
    rows = {row["tenant"]: row for row in usage["tenants"]}
    assert list(rows) == ["a", "b", "keys"]
    assert (rows["a"]["requests"], rows["a"]["prompt_tokens"], rows["a"]["output_tokens"]) == (
        2,
        12,
        6,
    )
    assert rows["keys"]["requests"] == 1 and rows["b"]["requests"] == 0
    assert usage["scope"] == "replica"  # no ledger shared in one process
    assert "sk-" not in json.dumps(usage)


@pytest.fixture
def anyio_backend():
    return "asyncio"


USAGE = {
    "tenants": [
        {
            "tenant": "chat-app",
            "kind": "tenant",
            "requests": 1234,
            "refused": 5,
            "refused_by_quota": {"tokens_per_minute": 5},
            "prompt_tokens": 50000,
            "output_tokens": 7000,
            "tokens_today": 57000,
            "quotas": {"requests_per_second": 20, "tokens_per_minute": 400000},
            "current": {},
        },
        {
            "tenant": "keys",
            "kind": "keys",
            "requests": 3,
            "refused": 0,
            "refused_by_quota": {},
            "prompt_tokens": 9,
            "output_tokens": 6,
            "tokens_today": 15,
            "quotas": {},
            "current": {},
        },
    ],
    "since": "2026-12-05T00:00:00+00:00",
    "scope": "cluster",
}


@contextlib.contextmanager
def http_server(status: int, body: object):
    """A real HTTP server on a free local port answering every GET with `body`."""
    seen: dict[str, str | None] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen["path"], seen["auth"] = self.path, self.headers.get("authorization")
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_usage_command_prints_a_table():
    with http_server(200, USAGE) as (url, seen):
        result = CliRunner().invoke(
            cli, ["usage", "--url", url, "--api-key", "k"], env={"COLUMNS": "200"}
        )
    assert result.exit_code == 0, result.output
    assert seen == {"path": "/usage", "auth": "Bearer k"}
    assert "chat-app" in result.output and "1,234" in result.output
    assert "tokens_per_minute 5" in result.output and "keys (no tenant)" in result.output
    assert "tpm 400000" in result.output


def test_usage_command_json():
    with http_server(200, USAGE) as (url, _):
        result = CliRunner().invoke(cli, ["usage", "--url", url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == USAGE


def test_usage_command_reports_an_error_answer_without_a_traceback():
    error = {"error": {"message": "invalid API key", "type": "x", "param": None, "code": "y"}}
    with http_server(401, error) as (url, _):
        result = CliRunner().invoke(cli, ["usage", "--url", url])
    assert result.exit_code == 1
    assert "401" in result.output and "invalid API key" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_usage_command_fails_cleanly_without_a_stack():
    result = CliRunner().invoke(cli, ["usage", "--url", "http://127.0.0.1:1"])
    assert result.exit_code == 1
    assert "cannot reach" in result.output and "Traceback" not in result.output


def test_usage_render_marks_a_single_replica_scope():
    text = usage_module.render({**USAGE, "scope": "replica"}, "http://x")
    assert "one ingress replica" in text.caption
