"""LoRA adapters: their config, a replica's adapter slots, the router's view of who holds
which adapter, and the ingress's names for them (the real engine: tests/e2e/test_routing_cpu)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.config import ConfigError, load_config
from app.config.lora import LoraSettings
from app.engines.http_server import Answer, EngineApp
from app.engines.llm_config import engine_kwargs
from app.engines.lora import AdapterLoadError, AdapterSlots, local_source
from app.engines.router import ADAPTER_SENT_S, request_view
from app.routing import ReplicaStats, RequestView, make_policy
from app.routing.policies.base import eligible
from tests.engine_double import TOKEN, LoopbackRoutes
from tests.test_ingress import make_client


def adapter_folder(root: Path, name: str, rank: int = 8) -> str:
    """A folder shaped as `peft` saves an adapter (its config is what the checks read)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return str(folder)


def model_with(lora: dict, **extra) -> dict:
    return {"name": "base", "source": "org/base", "lora": lora, **extra}


@pytest.fixture
def lora(tmp_path) -> dict:
    adapters = [{"name": n, "source": adapter_folder(tmp_path, n)} for n in ("sql", "poet")]
    return {"adapters": adapters, "max_adapters_per_replica": 2, "max_active": 1, "max_rank": 8}


# -- config ---------------------------------------------------------------------------------------
def test_adapters_are_served_names_of_their_base_model(lora):
    config = load_config({"models": [model_with(lora, aliases=["b"])]})
    assert config.model("sql").name == "base"
    assert config.models[0].served_names == ["base", "b", "sql", "poet"]
    kwargs = engine_kwargs(config.models[0])
    assert kwargs["enable_lora"] is True
    assert (kwargs["max_loras"], kwargs["max_cpu_loras"], kwargs["max_lora_rank"]) == (1, 2, 8)


def test_vllm_accepts_the_engine_arguments_the_settings_make(lora):
    """vLLM's own LoRA config validates what `lora` turns into."""
    from vllm.config import LoRAConfig

    settings = LoraSettings.model_validate(lora)
    kwargs = {k: v for k, v in settings.engine_kwargs().items() if k != "enable_lora"}
    config = LoRAConfig(**kwargs)
    assert (config.max_loras, config.max_cpu_loras, config.max_lora_rank) == (1, 2, 8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda lo, m: m.update(aliases=["sql"]), "'sql' is used twice"),
        (lambda lo, m: m["engine_args"].update(max_loras=4), "set `lora.max_active` instead"),
        (lambda lo, m: lo["adapters"].append(dict(lo["adapters"][0])), "used twice: sql"),
        (lambda lo, m: lo.update(max_rank=12), "vLLM takes one of 1, 8, 16"),
        (lambda lo, m: lo.update(max_active=3), "max_active (3) is above"),
        (lambda lo, m: lo["adapters"][0].update(source="/nowhere/sql"), "no adapter_config.json"),
        (lambda lo, m: lo["adapters"][0].update(source="not a repo"), "give an absolute local"),
        (lambda lo, m: lo["adapters"][0].update(source="./sql"), "give an absolute path"),
        (lambda lo, m: lo["adapters"][0].update(source="s3://"), "names no bucket"),
        (lambda lo, m: lo.update(adapters=[]), "at least 1 item"),
    ],
)
def test_bad_lora_settings_say_what_is_wrong(lora, change, message):
    model = model_with(lora, engine_args={})
    change(lora, model)
    with pytest.raises(ConfigError) as error:
        load_config({"models": [model]})
    assert message in str(error.value)


def test_an_adapter_above_max_rank_is_refused_before_it_runs(tmp_path):
    lora = {"adapters": [{"name": "big", "source": adapter_folder(tmp_path, "big", rank=32)}]}
    with pytest.raises(ConfigError, match="'big' has rank 32, above max_rank \\(16\\)"):
        load_config({"models": [model_with(lora)]})


def test_an_adapter_name_may_not_be_another_models_name(lora):
    other = {"name": "sql", "source": "org/other"}
    with pytest.raises(ConfigError, match="'sql' is used twice"):
        load_config({"models": [model_with(lora), other]})


def test_object_store_and_hub_sources_are_taken_as_given(lora):
    lora["adapters"] = [
        {"name": "s3", "source": "s3://bucket/adapters/sql"},
        {"name": "hub", "source": "org/sql-lora"},
    ]
    config = load_config({"models": [model_with(lora)]})
    assert config.models[0].adapter_names == ["s3", "hub"]


# -- a replica's adapter slots --------------------------------------------------------------------
class EngineAdapters:
    """Stands in for vLLM's adapter cache: records loads and unloads, can refuse one."""

    def __init__(self, refuse: str | None = None) -> None:
        self.events: list[tuple[str, str]] = []
        self.refuse = refuse

    async def load(self, name: str, path: str) -> None:
        await asyncio.sleep(0.01)  # a load takes a while: concurrent callers wait for it
        if name == self.refuse:
            raise ValueError(f"Failed to load lora model: {path} is not an adapter")
        self.events.append(("load", name))

    async def unload(self, name: str) -> None:
        self.events.append(("unload", name))


def slots(lora: dict, tmp_path: Path, engine: EngineAdapters, **download) -> AdapterSlots:
    settings = LoraSettings.model_validate(lora)
    fetch = download.get("download", lambda uri, folder: None)
    return AdapterSlots(settings, engine.load, engine.unload, fetch, tmp_path / "cache")


@pytest.mark.anyio
async def test_slots_unload_the_least_recently_used_over_the_limit(lora, tmp_path):
    lora["adapters"].append({"name": "chef", "source": adapter_folder(tmp_path, "chef")})
    engine = EngineAdapters()
    held = slots(lora, tmp_path, engine)
    for name in ("sql", "poet", "sql", "chef"):  # poet is the least recently used when chef comes
        await held.use(name)
    assert engine.events == [("load", "sql"), ("load", "poet"), ("unload", "poet"),
                             ("load", "chef")]  # fmt: skip
    assert held.held == ["sql", "chef"]
    assert held.stats() == {"lora_adapters": ["sql", "chef"], "lora_loads": 3, "lora_unloads": 1}
    assert "chef" in held and "base" not in held


@pytest.mark.anyio
async def test_concurrent_first_requests_load_an_adapter_once(lora, tmp_path):
    engine = EngineAdapters()
    held = slots(lora, tmp_path, engine)
    await asyncio.gather(*(held.use("sql") for _ in range(5)))
    assert engine.events == [("load", "sql")]


@pytest.mark.anyio
async def test_an_adapter_that_cannot_load_is_an_error_naming_it_and_nothing_is_held(
    lora, tmp_path
):
    held = slots(lora, tmp_path, EngineAdapters(refuse="poet"))
    with pytest.raises(AdapterLoadError, match=r"adapter 'poet' .* is not an adapter"):
        await held.use("poet")
    assert held.held == [] and held.loads == 0


def test_an_object_store_adapter_is_downloaded_once_into_the_cache(lora, tmp_path):
    calls = []

    def download(uri: str, folder: str) -> None:
        calls.append(uri)
        adapter_folder(Path(folder).parent, Path(folder).name)

    settings = LoraSettings.model_validate(
        {**lora, "adapters": [{"name": "org/sql", "source": "s3://bucket/sql"}]}
    )
    adapter = settings.adapters[0]
    first = local_source(adapter, tmp_path, download)
    assert local_source(adapter, tmp_path, download) == first
    assert calls == ["s3://bucket/sql"] and Path(first).parent == tmp_path
    assert "/" not in Path(first).name  # the adapter's name is no path inside the cache


def test_an_object_store_folder_without_an_adapter_is_an_error(lora, tmp_path):
    settings = LoraSettings.model_validate(
        {**lora, "adapters": [{"name": "sql", "source": "gs://bucket/empty"}]}
    )
    with pytest.raises(AdapterLoadError, match=r"gs://bucket/empty has no adapter_config\.json"):
        local_source(settings.adapters[0], tmp_path, lambda uri, folder: None)


def test_local_and_hub_sources_go_to_the_engine_as_they_are(lora, tmp_path):
    settings = LoraSettings.model_validate(
        {**lora, "adapters": [*lora["adapters"], {"name": "hub", "source": "org/sql-lora"}]}
    )
    never = lambda uri, folder: pytest.fail("nothing to download")  # noqa: E731
    assert local_source(settings.adapters[0], tmp_path, never) == lora["adapters"][0]["source"]
    assert local_source(settings.adapters[2], tmp_path, never) == "org/sql-lora"


# -- routing ---------------------------------------------------------------------------------
def test_eligible_keeps_holders_with_room_else_every_healthy_replica():
    request = RequestView("m", text="x", lora_adapter="sql")
    free = ReplicaStats("free")
    holder = ReplicaStats("holder", lora_adapters=frozenset({"sql"}))
    assert [r.replica_id for r in eligible(request, [free, holder])] == ["holder"]
    queued = ReplicaStats("holder", lora_adapters=frozenset({"sql"}), queued=1)
    full = ReplicaStats("holder", lora_adapters=frozenset({"sql"}), in_flight=4, max_concurrency=4)
    for busy in (queued, full):  # no room there: any replica, which then loads it
        assert {r.replica_id for r in eligible(request, [free, busy])} == {"free", "holder"}
    base = RequestView("m", text="x")
    assert {r.replica_id for r in eligible(base, [free, holder])} == {"free", "holder"}


def routes_of_two() -> LoopbackRoutes:
    return LoopbackRoutes("base", ["http://127.0.0.1:1", "http://127.0.0.1:2"])


def test_the_router_sends_an_adapter_to_the_replica_that_reports_it():
    routes = routes_of_two()
    second = routes.replicas[1]
    second.routing_stats = {"lora_adapters": ["sql"], "in_flight": 3}
    routed = routes.route(RequestView("base", text="q " * 50, lora_adapter="sql"))
    assert routed.replica_id == "base-r2"
    assert routes.route(RequestView("base", text="q " * 50)).replica_id == "base-r1"


def test_the_router_counts_an_adapter_it_sent_as_held_until_reports_can_say():
    """Before the replica's next report, its next requests follow the first one."""
    routes = routes_of_two()
    homes = {
        routes.route(RequestView("base", text=f"q{i} " * 50, lora_adapter="sql")).replica_id
        for i in range(6)
    }  # fmt: skip  (none finishes: the first's replica gets busier)
    assert len(homes) == 1
    (home,) = homes
    sent = routes.router._adapters_sent[home]
    sent["sql"] = time.monotonic() - ADAPTER_SENT_S - 1  # long ago, and no report says so
    for replica in routes.replicas:
        stats = routes.router._stats(replica)
        assert "sql" not in stats.lora_adapters
    assert routes.router._adapters_sent[home] == {}


def test_every_policy_keeps_an_adapter_on_its_holders():
    replicas = [ReplicaStats("a"), ReplicaStats("b", lora_adapters=frozenset({"sql"}), in_flight=5)]
    for name in ("scored", "prefix", "kv", "session", "round_robin", "power_of_two"):
        policy = make_policy(name)
        for i in range(4):
            view = RequestView("base", text=f"p{i} " * 40, lora_adapter="sql", session_key=str(i))
            assert policy.choose(view, replicas).replica_id == "b", name


def test_a_handle_calls_adapter_is_read_from_its_body():
    pending = SimpleNamespace(
        args=["completions", {"model": "sql", "prompt": "hi"}],
        metadata=SimpleNamespace(session_id=None, multiplexed_model_id=""),
    )
    view = request_view("base", pending)
    assert (view.model, view.lora_adapter) == ("base", "sql")
    pending.args[1]["model"] = "base"
    assert request_view("base", pending).lora_adapter is None


# -- the ingress ----------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_the_ingress_lists_adapters_and_sends_their_name_to_the_engine(cpu_model, lora):
    config = {"models": [{**cpu_model, "lora": lora}]}
    async with make_client(cpu_model, config=config) as (client, engines, stack):
        cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
        assert cards["sql"]["root"] == cards["sql"]["parent"] == cpu_model["name"]
        assert (await client.get("/v1/models/poet")).json()["root"] == cpu_model["name"]
        body = {"model": "sql", "prompt": "hello", "max_tokens": 2}
        answer = await client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert engines[cpu_model["name"]].calls[-1][1]["model"] == "sql"
        view = stack.routes[cpu_model["name"]].routed[-1].view
        assert (view.model, view.lora_adapter) == (cpu_model["name"], "sql")
        base = await client.post("/v1/completions", json={**body, "model": cpu_model["name"]})
        assert base.status_code == 200
        assert stack.routes[cpu_model["name"]].routed[-1].view.lora_adapter is None


@pytest.mark.anyio
async def test_a_replicas_own_adapter_error_is_answered_as_it_is_an_engines_5xx_is_hidden():
    class Backend:
        def __init__(self, reply: Answer) -> None:
            self.reply = reply

        async def answer(self, endpoint: str, body: dict) -> Answer:
            return self.reply

        async def check_health(self) -> None:
            return None

    ours = Answer.error(503, "adapter 'x' could not be loaded", code="adapter_unavailable",
                        ours=True)  # fmt: skip
    assert await EngineApp(Backend(ours), TOKEN)._answer("completions", b"{}", "r1") is ours
    engines = Answer.error(503, "CUDA error: an illegal memory access")
    hidden = await EngineApp(Backend(engines), TOKEN)._answer("completions", b"{}", "r2")
    assert hidden.status == 500 and b"CUDA" not in hidden.body
