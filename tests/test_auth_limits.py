"""API keys and per-key limits at the ingress (in-process, in front of engine doubles)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from app.config import AuthSettings, ConfigError, KeyLimits
from app.ingress.auth import KeyStore
from app.ingress.limits import KeyLimiter
from tests.test_ingress import assert_openai_error, make_client

pytestmark = pytest.mark.anyio
BODY = {"model": "smollm2", "prompt": "hello", "max_tokens": 4}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@contextlib.asynccontextmanager
async def client_for(cpu_model, *, auth=None, per_key=None, mode="ok"):
    config = {
        "models": [cpu_model],
        "auth": auth or {"api_keys_env": None},
        "limits": {"per_key": per_key or {}},
    }
    async with make_client(cpu_model, modes={"smollm2": mode}, config=config) as (client, _, _):
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_keys_from_config_env_and_file(cpu_model, tmp_path, monkeypatch):
    secret = tmp_path / "keys"
    secret.write_text("sk-file-1\n\nsk-file-2\n")
    monkeypatch.setenv("MY_KEYS", "sk-env-1, sk-env-2")
    auth = {"api_keys": ["sk-config"], "api_keys_env": "MY_KEYS", "api_keys_file": str(secret)}
    async with client_for(cpu_model, auth=auth) as client:
        for key in ("sk-config", "sk-env-2", "sk-file-2"):
            response = await client.post("/v1/completions", json=BODY, headers=bearer(key))
            assert response.status_code == 200, key


async def test_missing_or_wrong_key_is_401(cpu_model):
    async with client_for(cpu_model, auth={"api_keys": ["sk-right"]}) as client:
        error = assert_openai_error(await client.post("/v1/completions", json=BODY), 401)
        assert error["code"] == "missing_api_key" and error["type"] == "authentication_error"
        wrong = await client.post("/v1/completions", json=BODY, headers=bearer("sk-wrong"))
        assert assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
        assert "sk-wrong" not in wrong.text and "sk-right" not in wrong.text
        basic = await client.get("/v1/models", headers={"authorization": "Basic sk-right"})
        assert_openai_error(basic, 401)
        assert (await client.get("/v1/models", headers=bearer("sk-right"))).status_code == 200


async def test_health_and_version_stay_open(cpu_model):
    async with client_for(cpu_model, auth={"api_keys": ["sk-right"]}) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/version")).status_code == 200


async def test_no_keys_means_no_auth(cpu_model):
    async with client_for(cpu_model) as client:
        assert (await client.post("/v1/completions", json=BODY)).status_code == 200


async def test_request_rate_limit_is_429_with_retry_after(cpu_model):
    async with client_for(cpu_model, per_key={"requests_per_second": 0.5, "burst": 2}) as client:
        codes = [(await client.post("/v1/completions", json=BODY)).status_code for _ in range(2)]
        assert codes == [200, 200]
        limited = await client.post("/v1/completions", json=BODY)
        error = assert_openai_error(limited, 429)
        assert error["code"] == "rate_limit_exceeded" and "requests per second" in error["message"]
        assert int(limited.headers["retry-after"]) >= 1


async def test_limits_are_per_key(cpu_model):
    auth = {"api_keys": ["sk-a", "sk-b"]}
    async with client_for(
        cpu_model, auth=auth, per_key={"requests_per_second": 0.1, "burst": 1}
    ) as client:
        assert (
            await client.post("/v1/completions", json=BODY, headers=bearer("sk-a"))
        ).status_code == 200
        assert (
            await client.post("/v1/completions", json=BODY, headers=bearer("sk-a"))
        ).status_code == 429
        assert (
            await client.post("/v1/completions", json=BODY, headers=bearer("sk-b"))
        ).status_code == 200


async def test_tokens_per_minute(cpu_model):
    async with client_for(cpu_model, per_key={"tokens_per_minute": 100}) as client:
        big = {**BODY, "max_tokens": 90}
        assert (await client.post("/v1/completions", json=big)).status_code == 200
        limited = await client.post("/v1/completions", json=big)
        assert "tokens per minute" in assert_openai_error(limited, 429)["message"]
        too_big = await client.post("/v1/completions", json={**BODY, "max_tokens": 500})
        assert assert_openai_error(too_big, 400, "max_tokens")["code"] == "tokens_exceed_limit"


async def test_max_concurrent_per_key(cpu_model):
    async with client_for(cpu_model, per_key={"max_concurrent": 1}, mode="slow") as client:
        first, second = await asyncio.gather(
            client.post("/v1/completions", json=BODY),
            client.post("/v1/completions", json=BODY),
        )
        assert sorted([first.status_code, second.status_code]) == [200, 429]
        assert (await client.post("/v1/completions", json=BODY)).status_code == 200, (
            "lease released"
        )


async def test_stream_holds_its_lease_until_it_ends(cpu_model):
    async with client_for(cpu_model, per_key={"max_concurrent": 1}) as client:
        streamed = await client.post("/v1/completions", json={**BODY, "stream": True})
        assert streamed.text.rstrip().endswith("data: [DONE]")
        assert (await client.post("/v1/completions", json=BODY)).status_code == 200


def test_token_bucket_refills_with_time():
    now = [0.0]
    limiter = KeyLimiter(KeyLimits(requests_per_second=2, burst=1), clock=lambda: now[0])
    limiter.acquire("k", 1).release()
    with pytest.raises(Exception, match="rate limit"):
        limiter.acquire("k", 1)
    now[0] += 0.5
    limiter.acquire("k", 1).release()


def test_key_store_never_keeps_key_text():
    store = KeyStore(["sk-secret-value"])
    assert "sk-secret-value" not in repr(vars(store))
    assert store.identify("sk-secret-value") and store.identify("sk-other") is None


def test_keys_from_a_secret_fail_closed_when_the_secret_is_missing(monkeypatch):
    settings = AuthSettings(
        api_keys_env="VRSTACK_TEST_KEYS", api_keys_secret={"name": "keys", "key": "api"}
    )
    monkeypatch.delenv("VRSTACK_TEST_KEYS", raising=False)
    with pytest.raises(ConfigError, match=r"\$VRSTACK_TEST_KEYS holds no key.*'keys'"):
        KeyStore.from_settings(settings)
    monkeypatch.setenv("VRSTACK_TEST_KEYS", "sk-a,sk-b")
    store = KeyStore.from_settings(settings)
    assert store.identify("sk-b") and store.identify("sk-c") is None


@pytest.mark.parametrize("path", ["/metrics", "/usage"])
async def test_metrics_open_by_default_and_protectable(cpu_model, path):
    async with client_for(cpu_model, auth={"api_keys": ["sk-right"]}) as open_client:
        assert (await open_client.get(path)).status_code == 200
    guarded = {"api_keys": ["sk-right"], "protect_metrics": True}
    async with client_for(cpu_model, auth=guarded) as client:
        assert_openai_error(await client.get(path), 401)
        assert (await client.get(path, headers=bearer("sk-right"))).status_code == 200


async def test_usage_without_tenants_is_the_keys_row(cpu_model):
    auth = {"api_keys": ["sk-one", "sk-two"]}
    async with client_for(cpu_model, auth=auth, per_key={"requests_per_second": 5}) as client:
        for key in ("sk-one", "sk-two"):
            assert (await client.post("/v1/completions", json=BODY, headers=bearer(key))).is_success
        usage = (await client.get("/usage")).json()
    (row,) = usage["tenants"]
    assert row["tenant"] == "keys" and row["requests"] == 2
    assert row["quotas"] == {"requests_per_second": 5}
