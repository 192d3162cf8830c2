"""An OpenAI-compatible HTTP server on the continuous-batching engine: `ettin-jax serve`.

FastAPI on uvicorn, as vLLM and `transformers serve` are built. Endpoints:
- `POST /v1/completions`: OpenAI's legacy completions (prompt as a string, a list of strings,
  token ids or lists of token ids; `n`, `stop`, `seed`, `stream`, `logprobs`, `echo`), plus
  vLLM's extra sampling fields (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
  `ignore_eos`, `stop_token_ids`);
- `POST /v1/chat/completions`: only with a chat template (the tokenizer's, or `--chat-template`);
- `GET /v1/models`, `GET /health`, and `GET /metrics` (Prometheus text format).

Each choice of each prompt is one engine request: it joins the running batch as soon as it
arrives, and its tokens come back to the event loop through the request's `on_update`. Text is
decoded as tokens come (`detokenize.TextStream`), and a stop string ends the request there
(its slot is freed at the next round). `echo` with `logprobs` scores the prompt with one
forward pass (`scoring.token_logprobs`), so that `max_tokens` 0 or 1 gives the prompt's
log-likelihood, as evaluation harnesses ask for it. Log-probabilities are the model's raw ones
(before temperature or filters), as vLLM reports them by default.

Every failure is an OpenAI error object (`{"error": {"message", "type", "param", "code"}}`)
with the right status: 400 for a bad request, 401 without the API key, 404 for an unknown model
or path, 413 for a body over the limit. A client that disconnects cancels its requests. On
SIGTERM uvicorn stops accepting connections, lets the requests in flight finish (at most
`--shutdown-timeout` seconds), and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import fastapi
import pydantic
import uvicorn
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ettin_jax import scoring
from ettin_jax.detokenize import TextStream
from ettin_jax.engine import MAX_STOP_TOKENS, Engine, compiled_programs
from ettin_jax.engine import Request as EngineRequest
from ettin_jax.pipelines import TextGenerationPipeline

log = logging.getLogger(__name__)

API_KEY_ENV = "ETTIN_JAX_API_KEY"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_TEMPERATURE = 100.0  # beyond it logits are flat anyway; float32 would overflow at 3.4e38
GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (vLLM's _SAMPLING_EPS)
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What the server accepts. `max_tokens`: the most new tokens a request may ask for
    (default: whatever the context leaves); `max_n`: choices per prompt; `max_logprobs`: top
    tokens per place; `max_body_bytes`: a request body's size; `chat_template`: a Jinja chat
    template (default: the tokenizer's, if it has one)."""

    model_name: str
    api_key: str | None = None
    max_tokens: int | None = None
    max_n: int = 16
    max_logprobs: int = 20
    max_body_bytes: int = 4 << 20
    chat_template: str | None = None


# ---- errors -----------------------------------------------------------------------------------
class APIError(Exception):
    """A request the server refuses: an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# ---- request bodies (pydantic: a wrong type or range is a 400 naming the field) ----------------
# Strict types: a string is not a number, nor a bool a token id (pydantic would otherwise convert
# "2" and true); a whole float is still a float, and an int is a float.
Int = pydantic.StrictInt
Bool = pydantic.StrictBool
Float = Annotated[float, pydantic.Strict()]


class _StreamOptions(pydantic.BaseModel):
    include_usage: Bool = False


class _Sampling(pydantic.BaseModel):
    """The fields completions and chat share. Unknown fields are ignored, as OpenAI and vLLM do;
    NaN and infinite numbers (which Python's JSON reader accepts) are refused."""

    model_config = pydantic.ConfigDict(allow_inf_nan=False)

    model: pydantic.StrictStr | None = None
    temperature: Float | None = pydantic.Field(default=None, ge=0, le=MAX_TEMPERATURE)
    top_p: Float | None = pydantic.Field(default=None, gt=0, le=1)
    n: Int = pydantic.Field(default=1, ge=1)
    stop: pydantic.StrictStr | list[pydantic.StrictStr] | None = None
    seed: Int | None = pydantic.Field(default=None, ge=-(2**63), lt=2**63)
    stream: Bool = False
    stream_options: _StreamOptions | None = None
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: Int | None = pydantic.Field(default=None, ge=-1, lt=2**31)
    min_p: Float | None = pydantic.Field(default=None, ge=0, le=1)
    repetition_penalty: Float | None = pydantic.Field(default=None, gt=0)
    min_tokens: Int = pydantic.Field(default=0, ge=0, lt=2**31)
    ignore_eos: Bool = False
    stop_token_ids: list[Int] | None = None

    def unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server; use repetition_penalty", name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", "logit_bias")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: pydantic.StrictStr | list[Int] | list[list[Int]] | list[pydantic.StrictStr]
    max_tokens: Int | None = pydantic.Field(default=16, ge=0)
    logprobs: Int | None = pydantic.Field(default=None, ge=0)
    echo: Bool = False
    best_of: Int | None = None
    suffix: str | None = None


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_tokens: Int | None = pydantic.Field(default=None, ge=0)
    max_completion_tokens: Int | None = pydantic.Field(default=None, ge=0)
    logprobs: Bool = False
    top_logprobs: Int | None = pydantic.Field(default=None, ge=0)


# ---- metrics ----------------------------------------------------------------------------------
class Metrics:
    """Counters for `/metrics`, in Prometheus' text format (written here: a few lines)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.running = 0
        self.ttft = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def observe_ttft(self, seconds: float) -> None:
        self.ttft[next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))] += 1
        self.ttft_sum += seconds

    def render(self, engine: Engine) -> str:
        p = "ettin_jax"
        waiting = len(engine.queue) + len(engine._inbox) + (engine.prefilling is not None)
        lines = [
            f"# HELP {p}_requests_total HTTP requests answered, by endpoint and status.",
            f"# TYPE {p}_requests_total counter",
            *(f'{p}_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())),
            f"# HELP {p}_requests_running HTTP requests being answered.",
            f"# TYPE {p}_requests_running gauge",
            f"{p}_requests_running {self.running}",
            f"# HELP {p}_prompt_tokens_total Prompt tokens of the requests run.",
            f"# TYPE {p}_prompt_tokens_total counter",
            f"{p}_prompt_tokens_total {self.prompt_tokens}",
            f"# HELP {p}_generation_tokens_total Tokens generated.",
            f"# TYPE {p}_generation_tokens_total counter",
            f"{p}_generation_tokens_total {self.generation_tokens}",
            f"# HELP {p}_queue_length Engine requests waiting for a slot.",
            f"# TYPE {p}_queue_length gauge",
            f"{p}_queue_length {waiting}",
            f"# HELP {p}_active_slots Decode slots holding a request.",
            f"# TYPE {p}_active_slots gauge",
            f"{p}_active_slots {sum(r is not None for r in list(engine.requests))}",
            f"# HELP {p}_slots Decode slots.",
            f"# TYPE {p}_slots gauge",
            f"{p}_slots {engine.batch}",
            f"# HELP {p}_engine_seconds_total The engine's time, by part: prefill, decode (device), host.",
            f"# TYPE {p}_engine_seconds_total counter",
            *(
                f'{p}_engine_seconds_total{{part="{part}"}} {engine.stats[key]:.3f}'
                for part, key in (("prefill", "prefill_s"), ("decode", "device_s"), ("host", "host_s"))
            ),
            f"# HELP {p}_compiled_programs_total Programs the engine has compiled (one per shape it met).",
            f"# TYPE {p}_compiled_programs_total counter",
            f"{p}_compiled_programs_total {compiled_programs()}",
            f"# HELP {p}_slot_utilisation Decoded slot-steps that made a token of a request.",
            f"# TYPE {p}_slot_utilisation gauge",
            f"{p}_slot_utilisation {engine.utilisation():.4f}",
            f"# HELP {p}_time_to_first_token_seconds From a request's arrival to its first token.",
            f"# TYPE {p}_time_to_first_token_seconds histogram",
        ]
        total = 0
        for bound, count in zip((*TTFT_BUCKETS, "+Inf"), self.ttft, strict=True):
            total += count
            lines.append(f'{p}_time_to_first_token_seconds_bucket{{le="{bound}"}} {total}')
        lines += [
            f"{p}_time_to_first_token_seconds_sum {self.ttft_sum}",
            f"{p}_time_to_first_token_seconds_count {total}",
        ]
        return "\n".join(lines) + "\n"


# ---- one choice: an engine request and its text ---------------------------------------------------
class _Choice:
    """One sequence of one prompt: its engine request, the text shown so far, and its tokens."""

    def __init__(self, index: int, prompt: list[int], stream: TextStream):
        self.index, self.prompt, self.stream = index, prompt, stream
        self.request: EngineRequest | None = None
        self.used = 0  # tokens taken from the request
        self.finish_reason: str | None = None

    def advance(self) -> tuple[str, list[int], bool]:
        """The new text and tokens since the last call, and whether the choice has ended (its
        request ended, or a stop string appeared: then the request is cancelled)."""
        request = self.request
        done = request.done  # read first: once done, every token is there
        new = request.tokens[self.used :]
        piece, taken = "", []
        for token in new:
            piece += self.stream.add([token])
            taken.append(token)
            if self.stream.stopped:
                request.cancel()
                self.finish_reason = "stop"
                break
        self.used += len(taken)
        if self.finish_reason is None and done:
            if request.error:
                if request.engine.error is not None:  # not the request's fault
                    raise APIError(500, request.error, kind="server_error")
                raise APIError(400, request.error)
            piece += self.stream.finish()
            self.finish_reason = "stop" if self.stream.stopped else request.finish_reason
        return piece, taken, self.finish_reason is not None


class Server:
    """The model, its tokenizer and engine, and the request handling behind the routes."""

    def __init__(self, generator: TextGenerationPipeline, engine: Engine, config: ServerConfig):
        self.generator, self.engine, self.config = generator, engine, config
        self.model, self.tokenizer = generator.model, generator.tokenizer
        self.metrics = Metrics()
        self.chat_template = config.chat_template or getattr(self.tokenizer, "chat_template", None)

    # ---- checking a request -----------------------------------------------------------------
    async def body(self, http: fastapi.Request) -> dict[str, Any]:
        limit = self.config.max_body_bytes
        declared = http.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body has {declared} bytes; this server takes at most {limit} "
                           "(--max-body-bytes)")  # fmt: skip
        data = bytearray()
        async for chunk in http.stream():
            data += chunk
            if len(data) > limit:
                raise APIError(413, f"the request body is over {limit} bytes, this server's limit (--max-body-bytes)")
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def parse(self, cls: type[_Sampling], body: dict[str, Any]) -> Any:
        try:
            request = cls.model_validate(body)
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            # The location without pydantic's names of union branches ("str", "list[int]", ...).
            loc = [
                str(x)
                for x in first["loc"]
                if isinstance(x, int) or x in cls.model_fields or x in _StreamOptions.model_fields
            ]
            param = loc[0] if loc else None
            raise APIError(400, f"{'.'.join(loc) or 'body'}: {first['msg']}", param) from None
        if request.model is not None and request.model != self.config.model_name:
            raise APIError(404, f"the model {request.model!r} does not exist; this server serves "
                           f"{self.config.model_name!r}", "model", "model_not_found")  # fmt: skip
        request.unsupported()
        if request.n > self.config.max_n:
            raise APIError(400, f"n is {request.n}; this server allows at most {self.config.max_n} (--max-n)", "n")
        if request.seed is not None and request.seed + request.n > 2**63:
            raise APIError(400, f"seed + n - 1 must be below 2**63 (choice j samples with seed + j), got seed "
                           f"{request.seed} and n {request.n}", "seed")  # fmt: skip
        return request

    def prompts(self, prompt: Any) -> tuple[list[list[int]], list[str]]:
        """The prompt field as token lists and texts: text is tokenized and made to start with
        BOS (as every Ettin sample did); token ids are taken as they are, and decoded."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = [self.generator.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise APIError(400, f"prompt {i} is empty", "prompt")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})", "prompt")
        return prompts, [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompt]

    def budget(self, prompts: list[list[int]], asked: int | None) -> int:
        """New tokens per choice: `asked` (None: what the context leaves), checked against the
        context and the server's limit."""
        context, limit = self.engine.max_length, self.config.max_tokens
        longest = max(len(p) for p in prompts)
        if longest > context:
            raise APIError(400, f"the prompt has {longest} tokens; this model's context is {context} tokens", "prompt")
        if asked is None:
            asked = context - longest if limit is None else min(limit, context - longest)
        if limit is not None and asked > limit:
            raise APIError(400, f"max_tokens is {asked}; this server allows at most {limit} (--max-tokens)",
                           "max_tokens")  # fmt: skip
        if longest + asked > context:
            raise APIError(400, f"this model's context is {context} tokens; the request asks for {longest} prompt "
                           f"tokens and {asked} new ones (max_tokens)", "max_tokens")  # fmt: skip
        return asked

    def sampling(self, request: _Sampling, max_tokens: int) -> dict[str, Any]:
        """The engine's (transformers') arguments for a request's fields. A temperature below
        1e-5 is greedy, as in vLLM: dividing logits by it would overflow."""
        temperature = 1.0 if request.temperature is None else request.temperature
        temperature = 0.0 if temperature < GREEDY_BELOW else temperature
        vocab = self.model.config.vocab_size
        bad = [t for t in request.stop_token_ids or [] if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"stop_token_ids holds {bad[0]}, outside the vocabulary [0, {vocab})", "stop_token_ids")
        stops = [] if request.ignore_eos else list(self.model.config.eos_token_ids)
        stops += [t for t in request.stop_token_ids or [] if t not in stops]
        if len(stops) > MAX_STOP_TOKENS:
            raise APIError(400, f"at most {MAX_STOP_TOKENS} stop token ids, EOS included; got {len(stops)}",
                           "stop_token_ids")  # fmt: skip
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_tokens, min_new_tokens=request.min_tokens, do_sample=temperature > 0, eos_token_id=stops
        )
        if temperature > 0:
            kwargs["temperature"] = temperature
            if request.top_p is not None and request.top_p < 1:
                kwargs["top_p"] = request.top_p
            if request.top_k is not None and 0 < request.top_k < vocab:
                kwargs["top_k"] = request.top_k
            if request.min_p:
                kwargs["min_p"] = request.min_p
        if request.repetition_penalty is not None and request.repetition_penalty != 1:
            kwargs["repetition_penalty"] = request.repetition_penalty
        return kwargs

    def check_logprobs(self, count: int | None, field: str) -> None:
        if count is not None and count > self.config.max_logprobs:
            raise APIError(400, f"{field} is {count}; this server returns at most {self.config.max_logprobs} "
                           "(--max-logprobs)", field)  # fmt: skip

    # ---- running a request ------------------------------------------------------------------
    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 (one Server per process)
    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def submit(self, prompts: list[list[int]], n: int, kwargs: dict[str, Any], seed: int | None,
               stops: list[str], logprobs: int | None) -> tuple[list[_Choice], asyncio.Queue[int]]:  # fmt: skip
        """Submits n choices per prompt (choice j of a prompt with seed `seed + j`; without a
        seed, each its own random one); returns them and the queue their updates arrive on. A
        request the engine refuses is an `APIError` here, before any response has started."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[int] = asyncio.Queue()
        choices = [
            _Choice(i * n + j, p, TextStream(self.tokenizer, stops)) for i, p in enumerate(prompts) for j in range(n)
        ]

        def wake(index: int):
            def update(_request: EngineRequest) -> None:  # in the engine's thread
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                    loop.call_soon_threadsafe(updates.put_nowait, index)

            return update

        for k, choice in enumerate(choices):
            choice_seed = secrets.randbits(31) if seed is None else seed + k % n
            choice.request = self.engine.submit(
                choice.prompt, logprobs=logprobs, on_update=wake(k), seed=choice_seed, **kwargs
            )
            if choice.request.error is not None:
                _cancel(choices)
                status, kind = (
                    (500, "server_error") if self.engine.error is not None else (400, "invalid_request_error")
                )
                raise APIError(status, choice.request.error, kind=kind)
            updates.put_nowait(k)  # a request may end at once (max_tokens 0)
        self.metrics.prompt_tokens += sum(len(p) for p in prompts)
        return choices, updates

    async def events(self, http: fastapi.Request, choices: list[_Choice], updates: asyncio.Queue[int],
                     arrived: float) -> AsyncIterator[tuple[_Choice, str, list[int], bool]]:  # fmt: skip
        """(choice, new text, new tokens, ended) as they come. Cancels what is left if the
        client goes or the caller stops."""
        try:
            left, first = len(choices), True
            while left:
                try:
                    k = await asyncio.wait_for(updates.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                choice = choices[k]
                if choice.finish_reason is not None:
                    continue
                piece, tokens, ended = choice.advance()
                self.metrics.generation_tokens += len(tokens)
                if tokens and first:
                    self.metrics.observe_ttft(time.perf_counter() - arrived)
                    first = False
                left -= ended
                if piece or tokens or ended:
                    yield choice, piece, tokens, ended
        finally:
            _cancel(choices)

    async def finished(self, events: AsyncIterator[tuple[_Choice, str, list[int], bool]],
                       count: int) -> list[_Choice] | None:  # fmt: skip
        """The `count` choices in index order once every one has ended; None if the client left
        first (`events` then ends early)."""
        ended = {choice.index: choice async for choice, _, _, done in events if done}
        return [ended[i] for i in range(count)] if len(ended) == count else None

    def logprob_entries(self, choice: _Choice, start: int, tokens: list[int]) -> list[tuple[int, float, dict]]:
        """(token, logprob, {token text: logprob} of the top ones and the token) of `tokens`,
        which begin at index `start` of the choice's tokens."""
        request = choice.request
        out = []
        for i, token in enumerate(tokens, start):
            top = {self.token_text(t): v for t, v in reversed(request.top_logprobs[i])}
            top.setdefault(self.token_text(token), request.token_logprobs[i])
            out.append((token, request.token_logprobs[i], dict(sorted(top.items(), key=lambda kv: -kv[1]))))
        return out

    async def prompt_logprobs(
        self, prompts: list[list[int]], top: int
    ) -> list[list[tuple[int, float | None, dict | None]]]:
        """Each prompt's (token, logprob, top) entries; the first token has none."""
        scored = await asyncio.to_thread(scoring.token_logprobs, self.model, prompts, top)
        out = []
        for prompt, s in zip(prompts, scored, strict=True):
            entries: list[tuple[int, float | None, dict | None]] = [(prompt[0], None, None)]
            for token, value, ids, values in zip(prompt[1:], s.chosen, s.top_ids, s.top_values, strict=True):
                top_map = {self.token_text(int(t)): float(v) for t, v in reversed(list(zip(ids, values, strict=True)))}
                top_map.setdefault(self.token_text(token), float(value))
                entries.append((token, float(value), dict(sorted(top_map.items(), key=lambda kv: -kv[1]))))
            out.append(entries)
        return out


def _cancel(choices: list[_Choice]) -> None:
    for choice in choices:
        if choice.request is not None and not choice.request.done:
            choice.request.cancel()


def _completion_logprobs(server: Server, entries: list[tuple[int, float | None, dict | None]], offset: int) -> dict:
    """OpenAI's legacy logprobs object for (token, logprob, top) entries whose text starts at
    `offset` in the choice's text."""
    tokens, offsets = [], []
    for token, _, _ in entries:
        tokens.append(server.token_text(token))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [e[1] for e in entries],
        "top_logprobs": [e[2] for e in entries],
        "text_offset": offsets,
    }


def _chat_logprobs(server: Server, entries: list[tuple[int, float, dict]], top: int) -> dict:
    def item(text: str, value: float) -> dict:
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return {
        "content": [
            {**item(server.token_text(token), value),
             "top_logprobs": [item(t, v) for t, v in list(top_map.items())[:top]]}
            for token, value, top_map in entries
        ]
    }  # fmt: skip


class _Access:
    """ASGI middleware: the API key (every path but /health), and the request counters. Plain
    ASGI rather than FastAPI's `@app.middleware`, which would end before a streamed body does."""

    def __init__(self, app: Any, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, metrics, key = scope["path"], self.server.metrics, self.server.config.api_key
        status = 500

        def count() -> None:
            if path.startswith("/v1/"):
                metrics.requests[(path, status)] = metrics.requests.get((path, status), 0) + 1

        if key is not None and path != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {key}".encode()):
                status = 401
                count()
                error = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")  # fmt: skip
                return await error.response()(scope, receive, send)

        async def send_noting_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.running += 1
        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            metrics.running -= 1
            count()


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


# ---- the app ----------------------------------------------------------------------------------
def create_app(server: Server) -> fastapi.FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: fastapi.FastAPI):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = fastapi.FastAPI(title="ettin-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics, config = server.metrics, server.config

    @app.exception_handler(APIError)
    async def api_error(_: fastapi.Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(http: fastapi.Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, f"{http.method} {http.url.path}: {e.detail}", kind=kind).response()

    app.add_middleware(_Access, server=server)

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.engine.error is not None:  # a bug of ours stopped the engine: take this server out
            return JSONResponse({"status": "error", "error": server.engine.error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(server.engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "ettin-jax",
                "max_model_len": server.engine.max_length}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(http: fastapi.Request):
        arrived = time.perf_counter()
        request: CompletionRequest = server.parse(CompletionRequest, await server.body(http))
        if request.best_of is not None and request.best_of != request.n:
            raise APIError(400, "best_of is not supported by this server (only best_of == n)", "best_of")
        if request.suffix:
            raise APIError(400, "suffix is not supported by this server", "suffix")
        server.check_logprobs(request.logprobs, "logprobs")
        prompts, prompt_texts = server.prompts(request.prompt)
        max_tokens = server.budget(prompts, request.max_tokens)
        kwargs = server.sampling(request, max_tokens)
        top = request.logprobs
        echoed = await server.prompt_logprobs(prompts, top) if request.echo and top is not None else None
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices, updates = server.submit(prompts, request.n, kwargs, request.seed, request.stops(), top)
        events = server.events(http, choices, updates, arrived)

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            body = {"id": ident, "object": "text_completion", "created": created, "model": config.model_name,
                    "choices": choices}  # fmt: skip
            if usage is not None:
                body["usage"] = usage
            return body

        def usage(completion_tokens: int) -> dict:
            prompt_tokens = sum(len(p) for p in prompts)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

        def prompt_part(index: int) -> tuple[str, dict | None, int]:
            """The echoed prompt of choice `index`: its text, its logprobs, and the text offset
            where the completion's tokens start (offsets count the tokens' own texts)."""
            if not request.echo:
                return "", None, 0
            p = index // request.n
            if echoed is None:
                return prompt_texts[p], None, len(prompt_texts[p])
            logprobs = _completion_logprobs(server, echoed[p], 0)
            return prompt_texts[p], logprobs, logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])

        def merge(a: dict | None, b: dict | None) -> dict | None:
            if a is None or b is None:
                return a or b
            return {key: a[key] + b[key] for key in a}

        if request.stream:

            async def stream() -> AsyncIterator[str]:
                count, offsets = 0, {}  # choice -> the text offset of its next token
                async for choice, piece, tokens, ended in events:
                    text, logprobs = "", None
                    if choice.index not in offsets:
                        text, logprobs, offsets[choice.index] = prompt_part(choice.index)
                    if top is not None and tokens:
                        entries = server.logprob_entries(choice, choice.used - len(tokens), tokens)
                        more = _completion_logprobs(server, entries, offsets[choice.index])
                        offsets[choice.index] = more["text_offset"][-1] + len(more["tokens"][-1])
                        logprobs = merge(logprobs, more)
                    count += len(tokens)
                    yield _sse(chunk([{"index": choice.index, "text": text + piece, "logprobs": logprobs,
                                       "finish_reason": choice.finish_reason if ended else None}]))  # fmt: skip
                if request.stream_options is not None and request.stream_options.include_usage:
                    yield _sse(chunk([], usage(count)))
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        finished = await server.finished(events, len(choices))
        if finished is None:  # the client went away
            return fastapi.Response(status_code=499)
        out, count = [], 0
        for index, choice in enumerate(finished):
            text, logprobs, offset = prompt_part(index)
            if top is not None:
                entries = server.logprob_entries(choice, 0, choice.request.tokens[: choice.used])
                logprobs = merge(logprobs, _completion_logprobs(server, entries, offset))
            count += choice.used
            out.append({"index": index, "text": text + choice.stream.text, "logprobs": logprobs,
                        "finish_reason": choice.finish_reason})  # fmt: skip
        return chunk(out, usage(count))

    @app.post("/v1/chat/completions")
    async def chat(http: fastapi.Request):
        arrived = time.perf_counter()
        request: ChatRequest = server.parse(ChatRequest, await server.body(http))
        if server.chat_template is None:
            raise APIError(400, "this model has no chat template (Ettin's base models have none): use "
                           "/v1/completions, or start the server with --chat-template FILE", "messages")  # fmt: skip
        top = (request.top_logprobs or 0) if request.logprobs else None
        server.check_logprobs(top, "top_logprobs")
        try:
            text = server.tokenizer.apply_chat_template(
                request.messages, chat_template=server.chat_template, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # jinja2 raises several types for a template or messages it cannot render
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        prompts = [server.tokenizer(text, add_special_tokens=False)["input_ids"]]
        asked = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        kwargs = server.sampling(request, server.budget(prompts, asked))
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        choices, updates = server.submit(prompts, request.n, kwargs, request.seed, request.stops(), top)
        events = server.events(http, choices, updates, arrived)

        def usage(completion_tokens: int) -> dict:
            return {"prompt_tokens": len(prompts[0]), "completion_tokens": completion_tokens,
                    "total_tokens": len(prompts[0]) + completion_tokens}  # fmt: skip

        if request.stream:

            async def stream() -> AsyncIterator[str]:
                count, started = 0, set()
                base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": config.model_name}
                async for choice, piece, tokens, ended in events:
                    delta: dict[str, Any] = {"content": piece}
                    if choice.index not in started:
                        started.add(choice.index)
                        delta = {"role": "assistant", **delta}
                    logprobs = None
                    if top is not None and tokens:
                        entries = server.logprob_entries(choice, choice.used - len(tokens), tokens)
                        logprobs = _chat_logprobs(server, entries, top)
                    count += len(tokens)
                    yield _sse({**base, "choices": [{"index": choice.index, "delta": delta, "logprobs": logprobs,
                                                     "finish_reason": choice.finish_reason if ended else None}]})  # fmt: skip
                if request.stream_options is not None and request.stream_options.include_usage:
                    yield _sse({**base, "choices": [], "usage": usage(count)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        finished = await server.finished(events, len(choices))
        if finished is None:  # the client went away
            return fastapi.Response(status_code=499)
        out, count = [], 0
        for index, choice in enumerate(finished):
            logprobs = None
            if top is not None:
                logprobs = _chat_logprobs(
                    server, server.logprob_entries(choice, 0, choice.request.tokens[: choice.used]), top
                )
            count += choice.used
            out.append({"index": index, "message": {"role": "assistant", "content": choice.stream.text},
                        "logprobs": logprobs, "finish_reason": choice.finish_reason})  # fmt: skip
        return {"id": ident, "object": "chat.completion", "created": created, "model": config.model_name,
                "choices": out, "usage": usage(count)}  # fmt: skip

    return app


def serve(
    generator: TextGenerationPipeline,
    config: ServerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    shutdown_timeout: float = 30.0,
    **engine_args: Any,
) -> None:
    """Runs the server until SIGTERM or SIGINT, then lets the requests in flight finish (at most
    `shutdown_timeout` seconds). `engine_args` go to `Engine` (max_batch_size, max_length, ...)."""
    engine = Engine(generator.model, max_logprobs=config.max_logprobs, max_queue=1 << 16, **engine_args)
    app = create_app(Server(generator, engine, config))
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)
    )
    # uvicorn raises the signal it stopped on again once it is done, to the handler that was
    # there before it: a no-op here, so that a drained server exits 0.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)
    log.info("serving %s on http://%s:%d (%d slots of %d tokens)", config.model_name, host, port, engine.batch,
             engine.max_length)  # fmt: skip
    server.run()
