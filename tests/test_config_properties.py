"""Property test: any config is either valid or a ConfigError naming each bad field."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.config import ConfigError, StackConfig, load_config

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
    st.text(max_size=12), st.just("16Gi"), st.just("auto"), st.just("float32"),
)  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=4)
model_fields = st.sampled_from([
    "name", "source", "aliases", "dtype", "max_model_len", "engine_args", "env", "replicas",
    "autoscaling", "resources", "bogus",
])  # fmt: skip
resources = st.dictionaries(
    st.sampled_from(["cpu", "gpu", "memory", "accelerator_type", "storage", "x"]), scalars
)
models = st.fixed_dictionaries(
    {"name": st.sampled_from(["m", "org/m", "bad name", ""]), "source": st.sampled_from(
        ["org/m", "embedded:smollm2", "embedded:nope", "/no/such/dir", ""])},
    optional={"resources": resources},
).flatmap(lambda base: st.dictionaries(model_fields, values, max_size=3).map(
    lambda extra: {**base, **extra}))  # fmt: skip
configs = st.fixed_dictionaries(
    {"models": st.lists(models, max_size=3)},
    optional={
        "router": st.dictionaries(st.sampled_from(["policy", "settings", "x"]), values),
        "limits": st.dictionaries(st.sampled_from(["max_tokens", "max_n", "per_key"]), values),
        "server": st.dictionaries(st.sampled_from(["retries", "ingress_cpus"]), values),
    },
)


@given(configs)
@settings(max_examples=300, deadline=None)
def test_every_config_is_valid_or_a_clear_error(args):
    try:
        config = load_config(args)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        assert lines[0].startswith("invalid vllm-ray-stack config")
        for line in lines[1:]:
            where, _, message = line.strip().partition(": ")
            assert where and message, line
            assert where == "(top level)" or where.split(".")[0] in args or where in args
    else:
        assert isinstance(config, StackConfig) and config.models
