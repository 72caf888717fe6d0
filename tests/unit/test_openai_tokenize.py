"""vLLM's /tokenize and /detokenize bodies against the default model's tokenizer."""

import pytest

from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.openai_prompts import render_chat
from pagedserve.cluster.openai_requests import parse_chat_request
from pagedserve.cluster.openai_tokenize import detokenize, tokenize
from pagedserve.replicas.models.model_files import load_model_files


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return load_model_files(str(default_model_dir), progress=False).tokenizer


def test_a_prompt_round_trips(tokenizer):
    answer = tokenize({"prompt": "Hello world", "return_token_strs": True}, tokenizer, 2048)
    assert answer["count"] == len(answer["tokens"]) == len(answer["token_strs"])
    assert answer["max_model_len"] == 2048
    assert detokenize({"tokens": answer["tokens"]}, tokenizer, 49152)["prompt"] == "Hello world"


def test_a_chats_tokens_are_a_chat_completions_prompt(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    answer = tokenize({"messages": messages}, tokenizer, 2048)
    expected = render_chat(parse_chat_request({"model": "m", "messages": messages}), tokenizer)
    assert answer["tokens"] == expected
    shorter = tokenize({"messages": messages, "add_generation_prompt": False}, tokenizer, 2048)
    assert shorter["count"] < answer["count"]


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"), ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ({"prompt": 5}, "prompt"), ({"messages": [{"role": "bot", "content": "x"}]},
                                "messages[0].role"),
])
def test_bad_tokenize_bodies_are_400(tokenizer, body, param):
    with pytest.raises(APIError) as err:
        tokenize(body, tokenizer, 2048)
    assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize("body, param", [
    ({"tokens": [1, -2]}, "tokens[1]"), ({"tokens": [10 ** 9]}, "tokens"), ({}, "tokens"),
    ({"tokens": "1 2"}, "tokens"),
])
def test_bad_detokenize_bodies_are_400(tokenizer, body, param):
    with pytest.raises(APIError) as err:
        detokenize(body, tokenizer, 49152)
    assert err.value.status == 400 and err.value.param == param
