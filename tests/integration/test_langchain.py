"""LangChain's OpenAI chat model against the served default model: structured output and tools."""

import pytest
from pydantic import BaseModel, Field

MODEL = "SmolLM2-135M-Instruct"

pytestmark = pytest.mark.integration


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.fixture(scope="module")
def chat_model(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model=MODEL,
                                       temperature=0, max_tokens=80, max_retries=0, timeout=120)


def test_with_structured_output_returns_the_typed_object(chat_model):
    person = chat_model.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person) and 0 <= person.age <= 120


def test_bind_tools_invoke_calls_the_named_tool(chat_model):
    reply = chat_model.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?")
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)


def test_bind_tools_invoke_with_auto_choice_answers(chat_model):
    reply = chat_model.bind_tools([get_weather]).invoke("Say hello.")
    assert reply.content or reply.tool_calls
