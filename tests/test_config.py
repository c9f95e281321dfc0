"""The config model: valid configs load, every invalid one fails naming field, value and rule."""

from __future__ import annotations

import copy

import pytest

from app.config import ConfigError, StackConfig, load_config, parse_quantity
from app.serve_config import read_serve_config
from tests.conftest import SERVE_CONFIGS


def test_every_serve_config_validates():
    files = sorted(SERVE_CONFIGS.glob("*.yaml"))
    assert {f.name for f in files} >= {"opt125m.yaml", "smollm2-cpu.yaml", "multi-model.yaml"}
    for path in files:
        loaded = read_serve_config(path)
        assert loaded.apps, path


def test_opt125m_is_the_production_stack_minimal_example():
    (app,) = read_serve_config(SERVE_CONFIGS / "opt125m.yaml").apps
    (spec,) = app.config.models
    assert spec.source == "facebook/opt-125m"
    assert spec.replicas == 1 and spec.autoscaling is None
    res = spec.resources
    assert (res.gpu, res.cpu, res.memory, res.storage) == (1, 6, "16Gi", "10Gi")


def test_multi_model_config_has_two_models_behind_one_app():
    (app,) = read_serve_config(SERVE_CONFIGS / "multi-model.yaml").apps
    assert [m.name for m in app.config.models] == ["smollm2", "smollm2-embed"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: m.update(dtype="float8"), ["models.0.dtype", "'float8'", "'float32'"]),
        (
            lambda m: m.update(max_model_len=0),
            ["models.0.max_model_len", "greater than or equal to 16"],
        ),
        (lambda m: m.update(replicas=0), ["models.0.replicas", "(got 0)"]),
        (lambda m: m.update(resources={"cpu": -1}), ["models.0.resources.cpu", "(got -1)"]),
        (
            lambda m: m.update(resources={"memory": "16 gigs"}),
            ["models.0.resources.memory", "16 gigs", "16Gi"],
        ),
        (lambda m: m.update(resources={"accelerator_type": "L4"}), ["accelerator_type", "gpu"]),
        (lambda m: m.update(source="embedded:llama9"), ["models.0.source", "embedded:smollm2"]),
        (lambda m: m.update(source="/no/such/folder"), ["models.0.source", "does not exist"]),
        (lambda m: m.update(name="bad name!"), ["models.0.name", "'bad name!'"]),
        (
            lambda m: m.update(engine_args={"max_model_len": 4}),
            ["engine_args.max_model_len", "max_model_len"],
        ),
        (
            lambda m: m.update(autoscaling={"min_replicas": 3, "max_replicas": 2}),
            ["min_replicas (3) > max_replicas (2)"],
        ),
        (lambda m: m.update(colour="blue"), ["models.0.colour", "Extra inputs are not permitted"]),
        (lambda m: m.pop("source"), ["models.0.source", "Field required"]),
    ],
)
def test_invalid_model_fields_are_named(cpu_model, change, expected):
    model = copy.deepcopy(cpu_model)
    change(model)
    with pytest.raises(ConfigError) as info:
        load_config({"models": [model]})
    message = str(info.value)
    for part in expected:
        assert part in message, message


def test_router_policy_lists_allowed_values(cpu_model):
    with pytest.raises(
        ConfigError, match=r"router.policy: Input should be 'round_robin', .*'scored'.*'fastest'"
    ):
        load_config({"models": [cpu_model], "router": {"policy": "fastest"}})


def test_router_settings_must_fit_the_policy(cpu_model):
    router = {"policy": "scored", "settings": {"w_prefix": 2.0, "w_magic": 1}}
    with pytest.raises(ConfigError, match=r"router: settings do not fit policy 'scored'.*w_magic"):
        load_config({"models": [cpu_model], "router": router})
    load_config(
        {"models": [cpu_model], "router": {"policy": "prefix", "settings": {"block_size": 32}}}
    )


def test_names_and_aliases_are_unique(cpu_model):
    other = {**cpu_model, "name": "other", "aliases": ["default"]}
    with pytest.raises(ConfigError, match="'default' is used twice"):
        load_config({"models": [cpu_model, other]})


def test_no_models_is_an_error():
    with pytest.raises(ConfigError, match="models: List should have at least 1 item"):
        load_config({"models": []})


def test_model_lookup_by_alias(cpu_model):
    config = StackConfig.model_validate({"models": [cpu_model]})
    assert config.model("default").name == "smollm2"
    assert config.model("nope") is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("16Gi", 16 * 2**30),
        ("512Mi", 512 * 2**20),
        ("500m", 0.5),
        ("2", 2),
        ("1e3", 1000),
        ("1k", 1000),
    ],
)
def test_quantities(text, value):
    assert parse_quantity(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["16 Gi", "Gi", "16GB", "-1Gi", ""])
def test_bad_quantities(text):
    with pytest.raises(ValueError):
        parse_quantity(text)


def test_serve_config_errors_name_file_and_application(tmp_path, cpu_model):
    import yaml

    bad = {**cpu_model, "dtype": "int3"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"applications": [
        {"name": "vrstack", "import_path": "app.builder:build_app", "args": {"models": [bad]}}
    ]}))  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"(?s)bad.yaml: applications\[0\] \(vrstack\).*models.0.dtype"
    ):
        read_serve_config(path)


def test_the_kv_policy_needs_the_engines_prefix_caches(cpu_model):
    config = load_config({"models": [cpu_model], "router": {"policy": "kv"}})
    assert config.router.policy == "kv"
    off = {**cpu_model, "engine_args": {"enable_prefix_caching": False}}
    with pytest.raises(ConfigError) as err:
        load_config({"models": [off], "router": {"policy": "kv"}})
    assert "enable_prefix_caching: false" in str(err.value)
    assert load_config({"models": [off]}).router.policy == "scored"  # others do not need them
