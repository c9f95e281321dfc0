"""Prompt tokens counted with the model's tokenizer at admission (`app.ingress.prompt_tokens`),
with the embedded model's real tokenizer (the prepared SmolLM2 folder), and the 4-characters
estimate when the ingress has no tokenizer."""

from __future__ import annotations

import re

import pytest

from app.engines import embedded
from app.ingress.gateway import admission_cost
from app.ingress.prompt_tokens import PromptCounter
from app.ingress.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    approx_tokens,
)
from app.tenants import FairQueue
from tests.test_auth_limits import bearer
from tests.test_ingress import make_client

tokenizers = pytest.importorskip("tokenizers")
MODEL_DIR = embedded.model_dir("smollm2")
CJK = "日本語のテキストを数えます。東京は日本の首都です。"
EMOJI = "ok 👍👍 🎉 done"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer():
    embedded.prepare("smollm2")  # the embedded model's folder (once per machine, as serving does)
    return tokenizers.Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def counter(tokenizer) -> PromptCounter:
    """As the engine hands it over: the tokenizer's JSON, its chat template, special tokens."""
    return PromptCounter.from_spec(
        {
            "tokenizer": tokenizer.to_str(),
            "chat_template": (MODEL_DIR / "chat_template.jinja").read_text(),
            "special_tokens": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
        }
    )


def encoded(tokenizer, text: str, special: bool = True) -> int:
    return len(tokenizer.encode(text, add_special_tokens=special).ids)


def completion(**fields) -> CompletionRequest:
    return CompletionRequest(model="smollm2", **fields)


# -- counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Once upon a time,", CJK, EMOJI, "  spaces\n\nand\ttabs ", "x"])
def test_a_text_prompt_counts_as_the_tokenizer_encodes_it(counter, tokenizer, text):
    exact = encoded(tokenizer, text)
    assert counter.count(completion(prompt=text)) == exact
    assert counter.count(EmbeddingRequest(model="smollm2", input=text)) == exact
    assert counter.count(TokenizeRequest(model="smollm2", prompt=text)) == exact


def test_cjk_and_emoji_are_counted_exactly_not_estimated(counter, tokenizer):
    for text in (CJK, EMOJI):
        request = completion(prompt=text, max_tokens=10)
        exact = encoded(tokenizer, text)
        assert exact != approx_tokens(text)  # the estimate is off for these texts
        request.counted(counter.count(request))
        assert request.prompt_tokens() == exact
        assert request.estimated_tokens() == exact + 10


def test_lists_of_prompts_ids_and_sequences_are_counted(counter, tokenizer):
    texts = ["Hello there", CJK, EMOJI]
    request = completion(prompt=texts, n=2, max_tokens=5)
    prompt = sum(encoded(tokenizer, t) for t in texts)
    assert counter.count(request) == prompt
    request.counted(counter.count(request))
    assert request.estimated_tokens() == prompt + 5 * 2 * 3  # n for each of the 3 prompts
    assert counter.count(completion(prompt=[5, 6, 7, 8])) == 4  # ids count as their number
    ids = completion(prompt=[[1, 2], [3], [4, 5, 6]], max_tokens=2, best_of=3)
    assert counter.count(ids) == 6
    ids.counted(6)
    assert ids.estimated_tokens() == 6 + 2 * 3 * 3
    assert counter.count(EmbeddingRequest(model="smollm2", input=[[1, 2, 3]])) == 3
    assert counter.count(DetokenizeRequest(model="smollm2", tokens=[1, 2])) == 2


def test_a_chat_counts_its_rendered_template_like_transformers(counter, tokenizer):
    """Rendered as `apply_chat_template(add_generation_prompt=True)`, tokenized without special
    tokens: what vLLM counts as a chat's `usage.prompt_tokens`."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    chats = [
        FRANCE,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": CJK + " " + EMOJI},
            {"role": "assistant", "content": "\n\nA reply."},
            {"role": "user", "content": "  and again\n"},
        ],
    ]
    for messages in chats:
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        exact = len(hf(text, add_special_tokens=False)["input_ids"])
        assert counter.count(ChatCompletionRequest(model="smollm2", messages=messages)) == exact
        assert counter.count(TokenizeRequest(model="smollm2", messages=messages)) == exact
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text",
             "text": "the capital?"}]}]  # fmt: skip
    joined = [{"role": "user", "content": "What is\nthe capital?"}]  # vLLM joins text parts
    assert counter.chat(parts) == counter.chat(joined)
    without = counter.count(
        ChatCompletionRequest(model="smollm2", messages=FRANCE, add_generation_prompt=False)
    )
    assert without == counter.chat(FRANCE) - encoded(tokenizer, "<|im_start|>assistant\n", False)


def test_a_template_that_does_not_render_gives_no_count(tokenizer):
    failing = PromptCounter(tokenizer, "{{ raise_exception('needs tools') }}")
    request = ChatCompletionRequest(model="smollm2", messages=FRANCE, max_tokens=3)
    assert failing.count(request) is None
    request.counted(failing.count(request))
    assert request.estimated_tokens() == approx_tokens([m.content for m in request.messages]) + 3
    assert PromptCounter(tokenizer).count(request) is None  # no template at all


# -- at admission ---------------------------------------------------------------------------


def test_the_fair_queue_cost_uses_the_counted_prompt(counter, tokenizer):
    queue = FairQueue(max_queue_per_tenant=4, max_wait_s=1, weights={})
    request = completion(prompt=CJK, max_tokens=7)
    estimated = admission_cost(queue, request)
    assert estimated == queue.service_units(approx_tokens(CJK), 7)
    request.counted(counter.count(request))
    assert admission_cost(queue, request) == queue.service_units(encoded(tokenizer, CJK), 7)


def _limited(cpu_model, tokens_per_minute: int | None) -> dict:
    per_key = {"tokens_per_minute": tokens_per_minute} if tokens_per_minute else {}
    return {
        "models": [cpu_model],
        "auth": {"api_keys": ["sk-a"], "api_keys_env": None},
        "limits": {"per_key": per_key},
    }


def _needs(response) -> int:
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "tokens_exceed_limit"
    return int(re.search(r"needs about (\d+) tokens", response.json()["error"]["message"])[1])


@pytest.mark.anyio
async def test_admission_charges_the_counted_prompt_once_the_ingress_has_a_tokenizer(
    cpu_model, counter, tokenizer
):
    """A limit of 1 token a minute refuses every request with the charge it computed."""
    body = {"model": "smollm2", "prompt": CJK, "max_tokens": 50}
    exact, estimate = encoded(tokenizer, CJK) + 50, approx_tokens(CJK) + 50
    assert exact != estimate  # SmolLM2's byte-level tokens: more than one per kanji
    async with make_client(cpu_model, config=_limited(cpu_model, 1)) as (client, _, _):
        gateway = client._transport.app.gateway
        assert gateway.counts_tokens and not gateway.counters
        refused = await client.post("/v1/completions", json=body, headers=bearer("sk-a"))
        assert _needs(refused) == estimate  # no tokenizer yet: the estimate
        gateway.counters["smollm2"] = counter  # as `fetch_tokenizers` sets it
        refused = await client.post("/v1/completions", json=body, headers=bearer("sk-a"))
        assert _needs(refused) == exact
        listed = {**body, "prompt": [CJK, EMOJI], "n": 2}
        refused = await client.post("/v1/completions", json=listed, headers=bearer("sk-a"))
        prompts = encoded(tokenizer, CJK) + encoded(tokenizer, EMOJI)
        assert _needs(refused) == prompts + 50 * 2 * 2  # n=2 for each of the 2 prompts
        chat = {"model": "smollm2", "messages": FRANCE, "max_tokens": 9}
        refused = await client.post("/v1/chat/completions", json=chat, headers=bearer("sk-a"))
        assert _needs(refused) == counter.chat(FRANCE) + 9


@pytest.mark.anyio
async def test_nothing_is_counted_when_nothing_charges_tokens(cpu_model, counter):
    async with make_client(cpu_model, config=_limited(cpu_model, None)) as (client, _, _):
        gateway = client._transport.app.gateway
        assert not gateway.counts_tokens
        gateway.counters["smollm2"] = counter
        request = completion(prompt=CJK, max_tokens=4)
        gateway.admit("key", request).release()
        assert request._prompt_tokens is None  # not tokenized: the plain path costs nothing


@pytest.fixture
def anyio_backend():
    return "asyncio"
