"""Completions `echo` and vLLM's `prompt_logprobs` through the openai client against the served
default model (float32 on this CPU): the prompt's log-probs equal transformers'."""

import pytest

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is Paris, and the capital of Italy is"
ATOL = 1e-4  # float32: our kernels add in another order than transformers' (seen: 2e-5)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reference(default_model_dir):
    """The prompt's token ids and transformers' log-probs of each after the ones before it."""
    import torch
    import transformers

    from pagedserve.replicas.models.model_files import load_model_files

    ids = load_model_files(str(default_model_dir), progress=False).tokenizer.encode(PROMPT)
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return ids, torch.log_softmax(logits, dim=-1)


def test_echo_returns_the_prompt_and_its_logprobs_first(openai_client, reference):
    ids, logprobs = reference
    out = openai_client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2,
                                           max_tokens=1, temperature=0)
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    got = choice.logprobs
    assert len(got.tokens) == len(ids) + 1 and "".join(got.tokens[:len(ids)]) == PROMPT
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert got.token_logprobs[i] == pytest.approx(logprobs[i - 1, ids[i]].item(), abs=ATOL)
        best = logprobs[i - 1].max().item()
        assert max(got.top_logprobs[i].values()) == pytest.approx(best, abs=ATOL)
    assert got.text_offset[len(ids)] == len(PROMPT)  # the generated token follows the prompt
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 1


def test_streamed_echo_joins_to_the_unary_text(openai_client):
    kwargs = dict(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=6,
                  temperature=0)
    unary = openai_client.completions.create(**kwargs).choices[0]
    chunks = list(openai_client.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].text == PROMPT
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None
    assert "".join(c.choices[0].text for c in chunks) == unary.text
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == unary.logprobs.tokens


def test_echo_with_max_tokens_0_returns_the_prompt_alone(openai_client, reference):
    ids, logprobs = reference
    out = openai_client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=0,
                                           max_tokens=0)
    choice = out.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(ids)
    assert choice.logprobs.token_logprobs[-1] == pytest.approx(
        logprobs[-2, ids[-1]].item(), abs=ATOL)
    assert out.usage.completion_tokens == 0


def test_prompt_logprobs_extra_field(openai_client, reference):
    ids, logprobs = reference
    out = openai_client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1,
                                           temperature=0, extra_body={"prompt_logprobs": 2})
    choice = out.choices[0]
    scored = choice.model_extra["prompt_logprobs"]
    assert not choice.text.startswith(PROMPT)
    assert len(scored) == len(ids) and scored[0] is None
    for i in range(1, len(ids)):
        entry = scored[i][str(ids[i])]
        assert entry["logprob"] == pytest.approx(logprobs[i - 1, ids[i]].item(), abs=ATOL)
        top = logprobs[i - 1].topk(2).indices.tolist()
        assert [scored[i][str(t)]["rank"] for t in top] == [1, 2]


def test_chat_refuses_echo(openai_client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
            extra_body={"echo": True})
    assert err.value.body["param"] == "echo"
