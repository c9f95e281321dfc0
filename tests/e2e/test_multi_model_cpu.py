"""serve_configs/multi-model.yaml end to end: two real vLLM engines behind one URL."""

from __future__ import annotations

import math

import openai
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(multi_model) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{multi_model.base_url}/v1", api_key="unused", max_retries=0)


def test_both_models_listed(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {"smollm2", "default", "smollm2-embed", "embeddings"}


def test_model_field_picks_the_engine(client):
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8
    )
    assert reply.choices[0].message.content
    emb = client.embeddings.create(model="embeddings", input=["red apple", "green apple"])
    assert emb.model == "smollm2-embed" and len(emb.data) == 2
    first = emb.data[0].embedding
    assert len(first) > 100 and math.isclose(sum(x * x for x in first), 1.0, rel_tol=1e-3)


def test_wrong_task_for_a_model_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="smollm2-embed", messages=[{"role": "user", "content": "hi"}]
        )
