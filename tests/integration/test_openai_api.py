"""The official openai client against `serve run ray_configs/local.yaml`."""

import pytest

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.integration


def test_models_list(openai_client):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completion_answers(openai_client):
    out = openai_client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                                max_tokens=16)
    choice = out.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streamed_chat_concatenates_to_the_unary_greedy_text(openai_client):
    kwargs = dict(model=MODEL, temperature=0, max_tokens=24,
                  messages=[{"role": "user", "content": "Write one sentence about the sea."}])
    unary = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    pieces, usage, finish = [], None, None
    stream = openai_client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 1  # it really streamed
    assert "".join(pieces) == unary
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_completion_with_several_prompts_and_n(openai_client):
    out = openai_client.completions.create(model=MODEL, prompt=["The sky is", "Once upon a"],
                                           temperature=0, max_tokens=6, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: both completions agree
    assert all(c.text for c in out.choices)
    assert 4 <= out.usage.completion_tokens <= 4 * 6


def test_completion_from_token_ids_with_logprobs(openai_client):
    out = openai_client.completions.create(model=MODEL, prompt=[504, 3485, 314], temperature=0,
                                           max_tokens=4, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) >= 2 for top in logprobs.top_logprobs)
