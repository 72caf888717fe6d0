"""`pagedserve chat`'s session: history, /reset, /exit and the errors a user can meet
(the real server and terminal are exercised in tests/local_cluster/test_observability.py)."""

import json
import socket

import httpx

from pagedserve.cli import main
from pagedserve.cli_chat import ChatSession, run_chat


def _sse(*pieces: str, error: str | None = None) -> bytes:
    events = [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    if error:
        events.append({"error": {"message": error}})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"


class FakeServer:
    """Answers /v1/models and /v1/chat/completions; records the chat bodies it got."""

    def __init__(self, replies: list) -> None:
        self.replies = list(replies)  # per turn: (status, body bytes)
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m1"}]})
        self.bodies.append(json.loads(request.content))
        status, body = self.replies.pop(0)
        return httpx.Response(status, content=body,
                              headers={"content-type": "text/event-stream" if status == 200
                                       else "application/json"})


def _chat(server: FakeServer, lines: list[str], system: str | None = "be brief") -> tuple:
    session = ChatSession("http://server", system=system,
                          transport=httpx.MockTransport(server))
    out: list[str] = []
    feed = iter(lines)

    def read(prompt: str) -> str:
        out.append(prompt)
        return next(feed)  # StopIteration never: each test ends with /exit or EOF

    return run_chat(session, read, out.append), "".join(out), session


def test_streams_keeps_history_and_resets():
    server = FakeServer([(200, _sse("Hel", "lo")), (200, _sse("again")), (200, _sse("fresh"))])
    status, out, session = _chat(server, ["hi", "more", "/reset", "new", "/exit"])
    assert status == 0
    assert "chatting with m1" in out and "Hello\n" in out and "(history cleared)" in out
    first, second, third = server.bodies
    assert first["stream"] is True and first["model"] == "m1"
    assert [m["content"] for m in second["messages"]] == ["be brief", "hi", "Hello", "more"]
    assert [m["content"] for m in third["messages"]] == ["be brief", "new"]
    assert session.history[-1] == {"role": "assistant", "content": "fresh"}


def test_http_errors_are_one_line_and_the_turn_is_not_kept():
    server = FakeServer([
        (400, json.dumps({"error": {"message": "max_tokens is too large"}}).encode()),
        (503, b"upstream down"),
        (200, _sse("par", error="replica died")),
        (200, _sse("ok")),
    ])
    status, out, session = _chat(server, ["a", "b", "c", "d", "/exit"], system=None)
    assert status == 0
    assert "error: the server answered HTTP 400: max_tokens is too large" in out
    assert "error: the server answered HTTP 503: upstream down" in out
    assert "error: the server failed while answering: replica died" in out
    assert [m["content"] for m in server.bodies[-1]["messages"]] == ["d"]  # a, b, c not kept
    assert session.history == [{"role": "user", "content": "d"},
                               {"role": "assistant", "content": "ok"}]


def test_unknown_command_and_end_of_input():
    server = FakeServer([])
    session = ChatSession("http://server", transport=httpx.MockTransport(server))
    out: list[str] = []
    lines = iter(["/help"])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert run_chat(session, read, out.append) == 0
    assert "unknown command /help" in "".join(out) and server.bodies == []


def test_server_down_is_a_clear_error(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["chat", "--url", url]) == 1
    assert f"cannot reach the server at {url}" in capsys.readouterr().out


def test_api_key_is_sent_as_a_bearer_token():
    seen = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m1"}]})
        return httpx.Response(200, content=_sse("ok"))

    session = ChatSession("http://server", api_key="sk-test-key",
                          transport=httpx.MockTransport(server))
    assert "".join(session.turn("hi")) == "ok"
    assert seen == ["Bearer sk-test-key"] * 2
