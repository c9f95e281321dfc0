"""Tenants in the config: validation, where their keys come from, manifests, docs."""

from __future__ import annotations

import re

import pytest
import yaml

from app.config import ConfigError, Tenant, TenantQuotas, load_config
from app.ingress.auth import KeyStore
from app.k8s.render import auth_env
from app.serve_config import BUILDER, read_serve_config
from tests.conftest import ROOT


def _config(cpu_model, *tenants, auth=None):
    other = {**cpu_model, "name": "second", "aliases": ["b"]}
    return load_config({
        "models": [cpu_model, other],
        "auth": auth or {"api_keys_env": None},
        "tenants": list(tenants),
    })  # fmt: skip


def test_a_tenant_with_every_field(cpu_model):
    config = _config(
        cpu_model,
        {
            "name": "team-a",
            "api_keys": ["sk-a"],
            "priority": "interactive",
            "weight": 3,
            "quotas": {
                "requests_per_second": 5,
                "burst": 10,
                "tokens_per_minute": 60000,
                "max_concurrent": 8,
                "tokens_per_day": 10_000_000,
            },
            "models": ["default"],
            "default_max_tokens": 256,
            "max_tokens": 1024,
        },
        {"name": "batch_jobs", "api_keys_env": "BATCH_KEYS", "priority": 500},
    )
    first, second = config.tenants
    assert first.priority_value == 0 and first.weight == 3 and first.output_default == 256
    assert first.quotas.tokens_per_day == 10_000_000
    assert second.priority_value == 500 and second.output_default is None
    assert second.quotas == TenantQuotas() and second.models is None
    assert config.tenant("batch_jobs") is second and config.tenant("nobody") is None
    assert Tenant(name="x", api_keys=["k"], max_tokens=64).output_default == 64


@pytest.mark.parametrize(
    ("tenants", "message"),
    [
        ([{"name": "Team", "api_keys": ["k"]}], r"tenants\.0\.name: tenant name 'Team'"),
        ([{"name": "anonymous", "api_keys": ["k"]}], "reserved"),
        ([{"name": "a"}], "tenant 'a' has no key source"),
        ([{"name": "a", "api_keys": ["k"], "priority": "urgent"}], r"tenants\.0\.priority"),
        ([{"name": "a", "api_keys": ["k"], "priority": 1001}], "0 to 1000"),
        ([{"name": "a", "api_keys": ["k"], "weight": 0}], r"tenants\.0\.weight"),
        ([{"name": "a", "api_keys": ["k"], "models": []}], "at least one model"),
        ([{"name": "a", "api_keys": ["k"], "models": ["gpt-4"]}], "'gpt-4' is not served"),
        (
            [{"name": "a", "api_keys": ["k"], "default_max_tokens": 99, "max_tokens": 10}],
            r"default_max_tokens \(99\) is above max_tokens \(10\)",
        ),
        ([{"name": "a", "api_keys": ["k"], "quotas": {"tokens_per_day": 0}}], "tokens_per_day"),
        ([{"name": "a", "api_keys": ["k"], "quotas": {"per_day": 5}}], "per_day"),
        (
            [{"name": "a", "api_keys": ["k"], "api_keys_secret": {"name": "s", "key": "k"}}],
            "read through api_keys_env",
        ),
        ([{"name": "a", "api_keys": ["k1"]}, {"name": "a", "api_keys": ["k2"]}], "used twice"),
        (
            [{"name": "a", "api_keys": ["sk-same"]}, {"name": "b", "api_keys": [" sk-same"]}],
            "tenant 'b': one of its api_keys is also read by tenant 'a'",
        ),
        (
            [{"name": "a", "api_keys_env": "K"}, {"name": "b", "api_keys_env": "K"}],
            "api_keys_env 'K' is also read by tenant 'a'",
        ),
        (
            [
                {"name": "a", "api_keys_env": "K1", "api_keys_secret": {"name": "s", "key": "k"}},
                {"name": "b", "api_keys_env": "K2", "api_keys_secret": {"name": "s", "key": "k"}},
            ],
            "api_keys_secret 's/k' is also read by tenant 'a'",
        ),
    ],
)
def test_bad_tenants_are_refused_naming_the_field(cpu_model, tenants, message):
    with pytest.raises(ConfigError, match=message) as refused:
        _config(cpu_model, *tenants)
    assert "sk-same" not in str(refused.value)  # keys' text stays out of the message


def test_a_key_in_auth_and_in_a_tenant_is_refused(cpu_model):
    with pytest.raises(ConfigError, match="tenant 'a': one of its api_keys is also read by auth"):
        _config(cpu_model, {"name": "a", "api_keys": ["sk-1"]}, auth={"api_keys": ["sk-1"]})
    with pytest.raises(ConfigError, match="api_keys_env 'VRSTACK_API_KEYS' is also read by auth"):
        _config(
            cpu_model, {"name": "a", "api_keys_env": "VRSTACK_API_KEYS"}, auth={"required": False}
        )


def test_tenant_keys_from_config_env_and_file(cpu_model, tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("sk-file\n")
    monkeypatch.setenv("TEAM_KEYS", "sk-env-1,sk-env-2")
    config = _config(
        cpu_model,
        {"name": "a", "api_keys": ["sk-conf"], "api_keys_file": str(keys)},
        {"name": "b", "api_keys_env": "TEAM_KEYS"},
        auth={"api_keys": ["sk-plain"], "api_keys_env": None},
    )
    store = KeyStore.from_settings(config.auth, config.tenants)
    owners = {key: store.tenant_of(store.identify(key) or "") for key in
              ("sk-conf", "sk-file", "sk-env-2", "sk-plain")}  # fmt: skip
    assert owners == {"sk-conf": "a", "sk-file": "a", "sk-env-2": "b", "sk-plain": None}
    assert store.identify("sk-other") is None


def test_a_key_found_twice_at_start_is_refused(cpu_model, monkeypatch):
    monkeypatch.setenv("A_KEYS", "sk-shared")
    monkeypatch.setenv("B_KEYS", "sk-b,sk-shared")
    config = _config(
        cpu_model, {"name": "a", "api_keys_env": "A_KEYS"}, {"name": "b", "api_keys_env": "B_KEYS"}
    )
    with pytest.raises(ConfigError, match="a key of tenant 'b' is also one of 'a''s"):
        KeyStore.from_settings(config.auth, config.tenants)


def test_tenant_keys_alone_turn_auth_on_and_a_missing_secret_fails_closed(cpu_model, monkeypatch):
    monkeypatch.delenv("TEAM_KEYS", raising=False)
    config = _config(cpu_model, {"name": "a", "api_keys": ["sk-a"]})
    assert KeyStore.from_settings(config.auth, config.tenants).enabled
    secret = {"name": "team", "key": "keys"}
    config = _config(
        cpu_model,
        {"name": "a", "api_keys": ["sk-a"]},
        {"name": "b", "api_keys_env": "TEAM_KEYS", "api_keys_secret": secret},
    )
    with pytest.raises(ConfigError, match=r"tenant 'b' has no API key.*\$TEAM_KEYS"):
        KeyStore.from_settings(config.auth, config.tenants)


def test_a_tenants_secret_reaches_the_ingress_pods(cpu_model, tmp_path):
    args = {
        "models": [cpu_model],
        "tenants": [{"name": "a", "api_keys_env": "TEAM_A_KEYS",
                     "api_keys_secret": {"name": "team-a", "key": "keys"}}],
    }  # fmt: skip
    app = {"name": "vrstack", "route_prefix": "/", "import_path": BUILDER, "args": args}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    (entry,) = auth_env(read_serve_config(path))
    assert entry["name"] == "TEAM_A_KEYS"
    assert entry["valueFrom"]["secretKeyRef"] == {"name": "team-a", "key": "keys"}


def test_every_tenant_field_is_documented():
    docs = (ROOT / "docs" / "tenants.md").read_text()
    config_docs = (ROOT / "docs" / "configuration.md").read_text()
    assert "`tenants`" in config_docs and "tenants.md" in config_docs
    for model in (Tenant, TenantQuotas):
        for field in model.model_fields:
            assert re.search(rf"`{field}`", docs), f"{model.__name__}.{field} not in tenants.md"


def test_a_tenants_output_bounds_stay_within_the_stacks(cpu_model):
    args = {"models": [cpu_model], "limits": {"max_tokens": 100}}
    tenant = {"name": "a", "api_keys": ["k"], "default_max_tokens": 101}
    with pytest.raises(ConfigError, match=r"\(101\) is above limits\.max_tokens \(100\)"):
        load_config({**args, "tenants": [tenant]})
    assert load_config({**args, "tenants": [{**tenant, "default_max_tokens": 100}]}).tenants
