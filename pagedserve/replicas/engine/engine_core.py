"""The engine's own process: steps `LLMEngine` back to back and talks over one pipe.

A server process is busy with I/O (a Serve replica hands every stream its deltas); sharing a
GIL with it slowed the engine's steps by an order of magnitude. Here the engine has a process to
itself: between two steps it reads the commands waiting on the pipe, and after each step it
sends one message with the outputs and the counters.

Messages in:  ("add", id, request_id, prompt, params) ("abort", id, request_id) ("stats", id)
              ("hashes", id) ("want", request_id) ("stop",)
Messages out: ("ready", stats, phases) ("result", id, ok, value, stats) ("outputs", outputs, stats)
              ("dead", message)
Outputs are deltas (`Request.delta`: what is new for a request since its previous output),
built only for requests whose consumer said it wants news ("want"; an add counts as one) and
for finished requests; they travel as plain tuples (`encode_delta`), which `engine_client`
decodes.
"""

from __future__ import annotations


def run_engine_core(config: dict, conn, torch_threads: int | None = None,
                    init_method: str | None = None, shared_weights=None) -> None:
    """Process entry point: build the engine, report ready, serve the pipe until told to stop.

    `init_method` is where the other tensor-parallel ranks wait for this one (rank 0).
    `shared_weights` (a `SharedWeights`) supplies the weights instead of the model's files.
    The ready message carries the start-up phases' wall times.
    """
    import time

    started = time.perf_counter()
    from pagedserve.kernels.triton_cache import use_node_cache

    use_node_cache()  # before triton is imported: this engine reads and fills the node's cache
    import torch  # noqa: F401 (timed: the engine's imports are a phase of its start)

    from pagedserve.replicas.engine.llm_engine import LLMEngine  # noqa: F401

    imports_s = time.perf_counter() - started
    tensors = shared_weights.named_tensors() if shared_weights is not None else None
    serve_engine(conn, config, torch_threads, init_method, {"engine_imports": imports_s},
                 tensors=tensors)


_PEER_GONE = (EOFError, BrokenPipeError, ConnectionResetError)


def serve_engine(conn, config: dict, torch_threads: int | None, init_method: str | None,
                 phases: dict[str, float], tensors=None, model=None, engine=None,
                 files=None) -> None:
    """Build the engine, send ("ready", stats, phases) or ("dead", why), then serve `conn`.

    `phases`: what the process did before (imports, a standby's preload), reported with the
    engine's own phases. `tensors`/`model`: weights from elsewhere than the model's files;
    `engine`: one built already (a standby's), served as it is; `files`: the model's config
    and tokenizer, read ahead (a standby's). A server process that left
    before the engine was ready ends this one quietly: there is nobody to serve.
    """
    try:
        if engine is None:
            engine = _build_engine(conn, config, torch_threads, init_method, tensors, model,
                                   files)
            if engine is None:
                return
            phases = {**phases, **engine.startup_phases}
        conn.send(("ready", engine.stats(), phases))
    except _PEER_GONE:
        return
    _EngineCore(engine, conn).serve()


def _build_engine(conn, config: dict, torch_threads: int | None, init_method: str | None,
                  tensors, model, files):
    """The engine, or None after telling the server process why it failed."""
    import torch

    from pagedserve.config import EngineConfig
    from pagedserve.replicas.engine.llm_engine import LLMEngine

    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        return LLMEngine(EngineConfig(**config), progress=False, init_method=init_method,
                         tensors=tensors, model=model, files=files, defer_graphs=True)
    except BaseException as err:
        conn.send(("dead", f"engine failed to start: {err!r}"))
        return None


def encode_delta(out) -> tuple:
    """A delta `RequestOutput` as plain tuples, lists and strings: they pickle and unpickle
    several times faster than dataclasses (no class lookups, no per-object `__reduce__`). The
    prompt stays behind: the client sent it."""
    completions = [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs,
                    c.finish_reason, c.stop_reason) for c in out.outputs]
    return out.request_id, completions, out.finished, out.num_cached_tokens, out.prompt_logprobs


class _EngineCore:
    def __init__(self, engine, conn) -> None:
        self.engine = engine
        self.conn = conn
        self.wanted: set[str] = set()
        self.stopping = False

    def serve(self) -> None:
        deferred = True  # start-up work left for idle moments (`LLMEngine.idle_work`)
        try:
            while not self.stopping:
                idle = not self.engine.has_unfinished_requests()
                self._handle_commands(block=idle and not deferred)
                if self.stopping:
                    continue
                if not self.engine.has_unfinished_requests():
                    deferred = deferred and self.engine.idle_work()
                    continue
                outputs = self.engine.step(stream=self.wanted.__contains__)
                if outputs:
                    self.conn.send(("outputs", self._encode(outputs), self.engine.stats()))
            self.engine.shutdown()  # a clean stop: the other tensor-parallel ranks end too
        except _PEER_GONE:  # the server process is gone
            return
        except BaseException as err:
            self.conn.send(("dead", repr(err)))
            raise

    def _encode(self, outputs: list) -> list[tuple]:
        for out in outputs:
            self.wanted.discard(out.request_id)
        return [encode_delta(out) for out in outputs]

    def _handle_commands(self, block: bool) -> None:
        while self.conn.poll(None if block else 0):
            block = False
            self._handle(self.conn.recv())

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "want":
            self.wanted.add(msg[1])
            return
        if kind == "stop":
            self.stopping = True
            return
        command_id, args = msg[1], msg[2:]
        try:
            ok, value = True, self._command(kind, *args)
        except Exception as err:  # bad input: the caller gets the error, the engine goes on
            ok, value = False, err
        # The counters travel with the result, so a caller told "added" never reads older ones.
        self.conn.send(("result", command_id, ok, value, self.engine.stats()))

    def _command(self, kind: str, *args):
        if kind == "add":
            request_id, prompt, params = args
            self.engine.add_request(request_id, prompt, params)
            self.wanted.add(request_id)
            return None
        if kind == "abort":
            self.wanted.discard(args[0])
            self.engine.abort(args[0])
            return None
        if kind == "stats":
            return self.engine.stats()
        if kind == "hashes":
            return self.engine.block_manager.cached_block_hashes()
        raise ValueError(f"unknown engine command {kind!r}")
