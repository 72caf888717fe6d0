"""`pagedserve chat`: a terminal chat against a running pagedserve (or any OpenAI-compatible)
server. Answers stream as they are generated; the conversation is kept and sent with every
turn; `/reset` starts over, `/exit` (or Ctrl-D) leaves. A server that is down or answers with
an error gets a one-line message, and the chat goes on (the failed turn is not kept).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator

import httpx

from pagedserve.cluster.openai_sse import sse_data

PROMPT = "you> "
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 300.0  # a long answer on a busy CPU server


def api_key_from_env() -> str | None:
    """The API key to send when none is given: $PAGEDSERVE_API_KEY, else $OPENAI_API_KEY."""
    return os.environ.get("PAGEDSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")


class ChatError(Exception):
    """A turn failed; the message is for the user."""


class ChatSession:
    """The conversation and the calls that continue it."""

    def __init__(self, url: str, model: str | None = None, system: str | None = None,
                 max_tokens: int = 256, temperature: float | None = None,
                 api_key: str | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        """`api_key`: sent as a bearer token. `transport`: an httpx transport to use instead
        of the network (tests)."""
        self.url = url.rstrip("/")
        self.model = model
        self.system = system
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.history: list[dict] = []
        self.reset()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.Client(transport=transport, headers=headers, timeout=httpx.Timeout(
            READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def resolve_model(self) -> str:
        """The model to talk to: `--model`, else the first the server lists."""
        if self.model is None:
            response = self._call("GET", "/v1/models")
            models = [m["id"] for m in response.json().get("data", [])]
            if not models:
                raise ChatError(f"the server at {self.url} lists no models")
            self.model = models[0]
        return self.model

    def turn(self, text: str) -> Iterator[str]:
        """Send `text` with the history; yield the answer's pieces as they arrive."""
        body = {"model": self.resolve_model(), "stream": True, "max_tokens": self.max_tokens,
                "messages": [*self.history, {"role": "user", "content": text}]}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        answer = []
        try:
            with self._http.stream("POST", f"{self.url}/v1/chat/completions",
                                   json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ChatError(_http_error(response))
                for piece in _sse_pieces(response.iter_lines()):
                    answer.append(piece)
                    yield piece
        except httpx.HTTPError as err:
            raise ChatError(_unreachable(self.url, err)) from None
        self.history += [{"role": "user", "content": text},
                         {"role": "assistant", "content": "".join(answer)}]

    def _call(self, method: str, path: str) -> httpx.Response:
        try:
            response = self._http.request(method, f"{self.url}{path}")
        except httpx.HTTPError as err:
            raise ChatError(_unreachable(self.url, err)) from None
        if response.status_code >= 400:
            raise ChatError(_http_error(response))
        return response


def _sse_pieces(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if (chunk := sse_data(line)) is None:
            continue
        if "error" in chunk:  # the server failed mid-stream
            raise ChatError(f"the server failed while answering: {chunk['error'].get('message')}")
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                yield piece


def _http_error(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300] or response.reason_phrase
    return f"the server answered HTTP {response.status_code}: {message}"


def _unreachable(url: str, err: Exception) -> str:
    if isinstance(err, httpx.TimeoutException):
        return f"the server at {url} did not answer in time ({type(err).__name__})"
    return (f"cannot reach the server at {url} ({type(err).__name__}); is it running? "
            "(`pagedserve serve` starts one)")


def run_chat(session: ChatSession, read: Callable[[str], str] = input,
             write: Callable[[str], None] | None = None) -> int:
    """The read-answer loop; returns the exit status."""
    write = write or _write
    try:
        write(f"chatting with {session.resolve_model()} at {session.url} "
              "(/reset clears the history, /exit leaves)\n")
    except ChatError as err:
        write(f"error: {err}\n")
        return 1
    while True:
        try:
            text = read(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        if text == "/exit":
            return 0
        if text == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        if not text:
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]}: /reset or /exit\n")
            continue
        try:
            for piece in session.turn(text):
                write(piece)
            write("\n")
        except ChatError as err:
            write(f"\nerror: {err}\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
