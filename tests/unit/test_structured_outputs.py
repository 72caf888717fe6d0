"""Structured outputs in the engine: every completion follows its grammar (JSON schema, any
JSON object, regex, choice), beside unconstrained requests in the same batches."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.sampling_params import StructuredOutput

SCHEMAS = {
    "object": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
             "required": ["color"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"user": {
        "type": "object", "properties": {
            "id": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                     "maxItems": 3}},
        "required": ["id", "tags"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(str(default_model_dir), device="cpu", progress=False, num_kvcache_blocks=512)


def _params(spec: StructuredOutput, **extra) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 120, "structured": spec, **extra})


def test_every_answer_parses_and_validates_against_its_schema(llm):
    names = list(SCHEMAS)
    params = [_params(StructuredOutput(json_schema=json.dumps(SCHEMAS[n])),
                      temperature=0.8, seed=i, n=2) for i, n in enumerate(names)]
    outputs = llm.chat([ASK] * len(names), params, use_tqdm=False)
    for name, out in zip(names, outputs, strict=True):
        for completion in out.outputs:
            assert completion.finish_reason == "stop", (name, completion.text)
            jsonschema.validate(json.loads(completion.text), SCHEMAS[name])


def test_json_object_regex_and_choice(llm):
    paris = [{"role": "user", "content": "Reply with a JSON object with the keys city and "
                                         "country for Paris."}]
    specs = [StructuredOutput(json_object=True), StructuredOutput(regex=r"[0-9]{3}-[a-z]{2}"),
             StructuredOutput(choice=("yes", "no", "maybe not"))]
    done = llm.chat([paris, ASK, ASK], [_params(s, max_tokens=200) for s in specs],
                    use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "stop" for o in done)
    outs = [o.outputs[0].text for o in done]
    assert isinstance(json.loads(outs[0]), dict)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[1])
    assert outs[2] in ("yes", "no", "maybe not")


def test_a_grammar_masks_only_its_own_rows(llm):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.chat([ASK], free, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.chat([ASK, ASK], [free, _params(StructuredOutput(choice=("yes", "no")))],
                     use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone
    assert mixed[1].outputs[0].text in ("yes", "no")


@pytest.mark.parametrize("spec", [
    StructuredOutput(json_schema='{"type": "strin"}'),
    StructuredOutput(json_schema='{"$ref": "#/nowhere"}'),
    StructuredOutput(regex="(("),
])
def test_a_grammar_that_does_not_compile_is_a_value_error_and_nothing_is_queued(llm, spec):
    with pytest.raises(ValueError, match="structured output does not compile"):
        llm.generate("Hi", _params(spec), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"), ({"json_object": True, "regex": "a"}, "exactly one"),
    ({"json_schema": "[1]"}, "JSON object"), ({"json_schema": "{nope"}, "JSON object"),
    ({"regex": ""}, "non-empty"), ({"choice": ()}, "non-empty list"),
    ({"choice": ("a", "")}, "non-empty list"),
])
def test_bad_structured_specs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=f"structured .*{message}"):
        StructuredOutput(**kwargs)
