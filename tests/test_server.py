"""`ettin-jax serve` end to end: the server runs as a subprocess on a tiny random checkpoint with a
word-level tokenizer (token id i >= 4 is the word `w<i-4>`), and the tests talk to it with the
`openai` client and with raw HTTP (`http.client`, `socket`).

What is checked, against the offline engine (`model.generate_batch` in this process, decoded by the
same tokenizer) wherever there is a number to compare:
- /v1/completions: prompts as a string, strings, token ids and lists of them (text gets BOS, ids
  are taken as given); greedy text; sampling with `seed` (choice j of a prompt with seed + j), `n`,
  `top_p`, and vLLM's `top_k`, `min_p`, `repetition_penalty`, `min_tokens` with `stop_token_ids`;
  stop strings (the text ends before them, finish_reason "stop"); `usage`;
- streaming: the same text as without, `data: [DONE]` last, a usage chunk when asked;
- `echo` and `logprobs`: the prompt's and the generated tokens' log-probabilities equal a float32
  forward pass within 1e-4, with the top tokens;
- errors: OpenAI error objects with their status (400, 404, 413), and the `openai` client's
  exception classes;
- 200 concurrent requests (half streamed, sampled with their own seeds) each equal to the offline
  engine's output; bad requests fail alone while good ones complete, among them numbers the engine's
  int32/int64/float32 slots cannot hold (which once killed its thread); a temperature near 0 is greedy;
- /metrics in Prometheus' text format, its counters moving by the right amounts;
- a second server (a long context, an API key from $ETTIN_JAX_API_KEY, a chat template): 401 without
  the key, chat completions, a stop string or a client that disconnects mid-stream frees the slot of a
  request that could run for tens of seconds, and SIGTERM lets the stream in flight finish, refuses
  new connections and exits 0.

The module-scoped main server is shared by most tests (its compiled programs too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import openai
import pytest
import torch
from helpers import TINY, VOCAB, torch_model
from textdata import SPECIALS

HEALTH_DEADLINE_S = 120
BOS, EOS = TINY["bos_token_id"], TINY["eos_token_id"]
WORDS = SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
NAME = "tiny-ettin"  # the main server's --served-model-name
CONTEXT = 128  # the main server's --max-length
LIMITS = {"max_n": 4, "max_tokens": 64, "max_body_bytes": 100_000}
LONG_CONTEXT = 16384  # the second server's: a long stream takes seconds, so it can be cut or drained
KEY = "sk-test-5b9d"
SAMPLING = {"temperature": 0.8, "top_p": 0.9}  # most sampled requests: one set of compiled programs
TOLERANCE = 1e-4
# A chat template that starts with BOS and joins the messages' contents.
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %} {{ m['content'] }}{% endfor %}"


# ---- the checkpoint and the offline reference ---------------------------------------------------
def word_tokenizer():
    """Ids 0-3 the specials of tests/textdata.py ([PAD], [CLS] = BOS, [SEP] = EOS, [UNK]), then one
    word per id up to the model's vocabulary: every id decodes to a word of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]"
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A random transformers causal LM and its tokenizer. The logits are sharpened, so that greedy
    tokens are not near ties (the server's and this process's float32 sums may differ in the last
    bits) while sampled text still varies, and the special tokens' are pushed far down, so that
    outputs run to max_tokens and every token is a word of the text."""
    model = torch_model("causal", 0, max_position_embeddings=LONG_CONTEXT)
    with torch.no_grad():
        model.lm_head.norm.weight.mul_(6.0)
        model.decoder.bias[: len(SPECIALS)] -= 10.0
    directory = tmp_path_factory.mktemp("serve") / "tiny-ettin"
    model.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """(ettin-jax model, tokenizer) loaded in this process from the checkpoint."""
    from transformers import AutoTokenizer

    from ettin_jax import ModernBertDecoderForCausalLM

    return ModernBertDecoderForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)


def encode(tokenizer, text: str) -> list[int]:
    """A text prompt as the server makes it: BOS, then the text's tokens."""
    return [BOS, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def offline(model, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    """The offline engine's new tokens, with the main server's engine shape and stop tokens."""
    kwargs.setdefault("eos_token_id", [EOS])
    return model.generate_batch(prompts, max_batch_size=8, max_length=CONTEXT, **kwargs)


def decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def log_softmax(model, ids: list[int]) -> np.ndarray:
    """(T, V) log-probabilities of a float32 forward pass over `ids` (normalised in float64)."""
    logits = np.asarray(model(np.array([ids])).logits[0], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ---- a server process -------------------------------------------------------------------------
@dataclasses.dataclass
class Served:
    proc: subprocess.Popen
    port: int
    log: Path
    name: str
    key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.key or "unused", max_retries=0,
                             timeout=120)  # fmt: skip

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def request(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                timeout: float = 120) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        """(status, headers, body) of one request on a connection of its own. `body`: bytes as
        they are, an iterable of bytes (sent chunked), or JSON. A header given as None is not sent."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **self.headers(), **(headers or {})}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={k: v for k, v in headers.items() if v is not None})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def post(self, path: str, body: Any, **kwargs) -> tuple[int, Any]:
        status, _, data = self.request("POST", path, body, **kwargs)
        return status, json.loads(data)

    def metrics(self) -> dict[str, float]:
        status, _, data = self.request("GET", "/metrics")
        assert status == 200
        return parse_metrics(data.decode())

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(directory: str, workdir: Path, flags: list[str], env: dict[str, str] | None = None,
                 name: str | None = None, key: str | None = None) -> Served:  # fmt: skip
    """`ettin-jax serve` in a subprocess, returned once GET /health answers 200."""
    port = free_port()
    log = workdir / f"server-{port}.log"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest", **(env or {})}
    command = [sys.executable, "-m", "ettin_jax.cli", "serve", "--model", directory, "--port", str(port), *flags]
    with open(log, "w") as output:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT)
    served = Served(proc, port, log, name or directory, key)
    deadline = time.monotonic() + HEALTH_DEADLINE_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode} before it was healthy:\n{served.output()}")
        if time.monotonic() > deadline:
            stop_server(served)
            pytest.fail(f"no 200 from /health after {HEALTH_DEADLINE_S} s:\n{served.output()}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if served.request("GET", "/health", timeout=5)[0] == 200:
                return served
        time.sleep(0.25)


def stop_server(served: Served) -> None:
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
        try:
            served.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The main server: 8 slots of CONTEXT tokens and the limits in LIMITS."""
    flags = ["--served-model-name", NAME, "--max-length", str(CONTEXT), "--max-batch-size", "8"]
    for flag, value in LIMITS.items():
        flags += ["--" + flag.replace("_", "-"), str(value)]
    served = start_server(checkpoint, tmp_path_factory.mktemp("main-server"), flags, name=NAME)
    yield served
    stop_server(served)


@pytest.fixture(scope="module")
def guarded(checkpoint, tmp_path_factory):
    """The second server: a long context, an API key (from the environment), a chat template."""
    workdir = tmp_path_factory.mktemp("guarded-server")
    template = workdir / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    flags = ["--max-length", str(LONG_CONTEXT), "--max-batch-size", "2", "--chat-template", str(template)]
    served = start_server(checkpoint, workdir, flags, env={"ETTIN_JAX_API_KEY": KEY}, key=KEY)
    yield served
    stop_server(served)


# ---- reading answers ----------------------------------------------------------------------------
def sse(data: bytes) -> list[str]:
    """The `data:` payloads of a server-sent-events body, in order."""
    events = data.decode().split("\n\n")
    assert events[-1] == "", "the body must end with a blank line"
    assert all(e.startswith("data: ") for e in events[:-1]), events
    return [e[len("data: ") :] for e in events[:-1]]


def joined_stream(chunks) -> tuple[dict[int, str], dict[int, str | None], Any]:
    """Per choice index, the streamed text and finish_reason; and the last usage seen."""
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            assert reasons.get(choice.index) is None, f"choice {choice.index} goes on after it ended"
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def assert_error(status: int, body: Any, expected_status: int, *, param: str | None = None,
                 kind: str = "invalid_request_error", message: str = "") -> None:  # fmt: skip
    """An OpenAI error object: {"error": {"message", "type", "param", "code"}}, with the status."""
    assert status == expected_status, (status, body)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == kind and error["param"] == param, error
    assert isinstance(error["message"], str) and message in error["message"], error


METRIC_LINE = re.compile(r'^([a-z_]+)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (-?[0-9.]+(e[+-]?[0-9]+)?|\+Inf)$')


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus' text format: `# HELP`/`# TYPE` lines before each family, then `name{labels} value`."""
    out, declared = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge", "histogram"), line
            declared.add(name)
        elif not line.startswith("# HELP "):
            match = METRIC_LINE.match(line)
            assert match, f"not a Prometheus sample line: {line!r}"
            family = re.sub(r"_(bucket|sum|count)$", "", match.group(1))
            assert match.group(1) in declared or family in declared, f"{line!r} has no # TYPE"
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def wait_for_metric(served: Served, key: str, at_least: float, deadline_s: float = 10) -> dict[str, float]:
    """/metrics once `key` reaches `at_least` (the request counters move once a response is sent)."""
    deadline = time.monotonic() + deadline_s
    while True:
        values = served.metrics()
        if values.get(key, 0) >= at_least or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


# ---- completions ----------------------------------------------------------------------------------
TEXTS = ["w5 w9 w13", "w40 w2 w77 w100 w8 w31"]
IDS = [[7, 30, 31, 90], [BOS, 50, 60, 70, 80, 90, 100, 110]]  # the first without BOS: taken as given


def test_prompt_forms_greedy_text_and_usage_equal_the_offline_engine(server, reference):
    model, tokenizer = reference
    prompts = [encode(tokenizer, t) for t in TEXTS] + IDS
    expected = offline(model, prompts, max_new_tokens=12)
    client = server.client()
    asked = [(TEXTS[0], [0]), (TEXTS, [0, 1]), (IDS[0], [2]), (IDS, [2, 3])]
    outs = [client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0) for prompt, _ in asked]
    short = client.completions.create(model=NAME, prompt=IDS[1], max_tokens=5, temperature=0)
    assert [len(e) for e in expected] == [12] * 4
    texts = [decode(tokenizer, e) for e in expected]
    assert len(set(texts)) == 4
    for (prompt, which), out in zip(asked, outs, strict=True):
        assert out.object == "text_completion" and out.model == NAME and out.id.startswith("cmpl-")
        assert [c.index for c in out.choices] == list(range(len(which)))
        assert [c.text for c in out.choices] == [texts[i] for i in which], prompt
        assert [c.finish_reason for c in out.choices] == ["length"] * len(which)
        assert out.usage.prompt_tokens == sum(len(prompts[i]) for i in which)
        assert out.usage.completion_tokens == 12 * len(which)
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # max_tokens shorter: a prefix of the same greedy tokens
    assert short.choices[0].text == decode(tokenizer, expected[3][:5]) and short.usage.completion_tokens == 5


def test_sampling_with_seed_n_and_top_p_equals_the_offline_engine(server, reference):
    """Choice j of prompt i is choices[i * n + j], sampled with seed + j."""
    model, tokenizer = reference
    prompts = [encode(tokenizer, t) for t in TEXTS]
    sampling = dict(do_sample=True, **SAMPLING, max_new_tokens=10)
    expected = offline(model, [p for p in prompts for _ in range(2)], seed=[11, 12, 11, 12], **sampling)
    greedy = offline(model, prompts[:1], max_new_tokens=10)[0]
    client = server.client()
    ask = dict(model=NAME, prompt=TEXTS, n=2, seed=11, **SAMPLING, max_tokens=10)
    first = client.completions.create(**ask)
    again = client.completions.create(**ask)
    one = client.completions.create(**{**ask, "n": 1, "seed": 12, "prompt": TEXTS[1]})
    other = client.completions.create(**{**ask, "seed": 1011})
    greedy_top_p = client.completions.create(**{**ask, "n": 1, "temperature": 0, "prompt": TEXTS[0]})
    texts = [decode(tokenizer, e) for e in expected]
    assert texts[0] != texts[1] and texts[2] != texts[3]  # the two seeds do differ
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == texts
    assert first.usage.completion_tokens == sum(len(e) for e in expected)
    assert [c.text for c in again.choices] == texts  # the same seed, the same text
    assert one.choices[0].text == texts[3]  # seed 12 alone is choice 1 of seed 11
    assert [c.text for c in other.choices] != texts
    assert greedy_top_p.choices[0].text == decode(tokenizer, greedy)  # top_p ignored


def test_stop_strings_end_the_text_before_them(server, reference):
    model, tokenizer = reference
    prompt = encode(tokenizer, TEXTS[1])
    tokens = offline(model, [prompt], max_new_tokens=20)[0]
    full = decode(tokenizer, tokens)
    words = full.split(" ")
    client = server.client()
    for stop in [" ".join(words[2:4]), ["never-there", words[3]], f"{words[1]} ", "wx"]:
        stops = [stop] if isinstance(stop, str) else stop
        first = min((full.find(s) for s in stops if s in full), default=-1)
        out = client.completions.create(model=NAME, prompt=TEXTS[1], max_tokens=20, temperature=0, stop=stop)
        choice = out.choices[0]
        if first < 0:  # the stop string never comes: the whole text
            assert choice.text == full and choice.finish_reason == "length", stop
            continue
        assert first > 0 and choice.text == full[:first] and choice.finish_reason == "stop", (stop, choice)
        # the tokens read: through the first whose text completes a stop string
        read = next(k for k in range(1, 21) if any(s in decode(tokenizer, tokens[:k]) for s in stops))
        assert out.usage.completion_tokens == read, stop
        streamed = client.completions.create(model=NAME, prompt=TEXTS[1], max_tokens=20, temperature=0, stop=stop,
                                             stream=True)  # fmt: skip
        texts, reasons, _ = joined_stream(streamed)
        assert texts == {0: full[:first]} and reasons == {0: "stop"}


def test_vllm_extra_fields_equal_the_offline_engine(server, reference):
    """top_k and min_p (sampled), repetition_penalty (greedy), min_tokens with stop_token_ids."""
    model, tokenizer = reference
    client = server.client()
    prompt = encode(tokenizer, TEXTS[0])
    greedy = offline(model, [prompt], max_new_tokens=12)[0]
    # one call, two requests: top_k 0 and min_p 0 leave the second one's logits as they are
    samples = offline(
        model,
        [prompt, prompt],
        do_sample=True,
        **SAMPLING,
        top_k=[2, 0],
        min_p=[0.3, 0.0],
        seed=[3, 3],
        max_new_tokens=12,
    )
    penalised_tokens = offline(model, [prompt], max_new_tokens=12, repetition_penalty=1.5)[0]
    ask = dict(model=NAME, prompt=TEXTS[0], max_tokens=12)
    filtered = client.completions.create(**ask, **SAMPLING, seed=3, extra_body={"top_k": 2, "min_p": 0.3})
    unfiltered = client.completions.create(**ask, **SAMPLING, seed=3)
    penalised = client.completions.create(**ask, temperature=0, extra_body={"repetition_penalty": 1.5})

    samples = [decode(tokenizer, tokens) for tokens in samples]
    assert samples[0] != samples[1]  # the filters do change this sample
    assert [filtered.choices[0].text, unfiltered.choices[0].text] == samples
    assert penalised_tokens != greedy
    assert penalised.choices[0].text == decode(tokenizer, penalised_tokens)

    stop_id = next(t for i, t in enumerate(greedy) if i > 0 and t not in greedy[:i])
    at = greedy.index(stop_id)
    held = offline(model, [prompt], max_new_tokens=12, min_new_tokens=at + 3, eos_token_id=[EOS, stop_id])[0]
    out = client.completions.create(**ask, temperature=0, extra_body={"stop_token_ids": [stop_id], "ignore_eos": False})
    assert out.choices[0].text == decode(tokenizer, greedy[: at + 1])  # the stop token's word included, as vLLM
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == at + 1
    out = client.completions.create(
        **ask, temperature=0, extra_body={"stop_token_ids": [stop_id], "min_tokens": at + 3}
    )
    assert len(held) >= at + 3 and held[: at + 1] != greedy[: at + 1]
    assert out.choices[0].text == decode(tokenizer, held) and out.usage.completion_tokens == len(held)


def test_streaming_gives_the_same_text_and_ends_with_done(server, reference):
    model, tokenizer = reference
    expected = offline(model, [encode(tokenizer, TEXTS[0])], max_new_tokens=6)[0]
    client = server.client()
    for ask in [
        dict(prompt=TEXTS, max_tokens=12, temperature=0),
        dict(prompt=TEXTS, max_tokens=10, **SAMPLING, n=2, seed=11),
    ]:
        whole = client.completions.create(model=NAME, **ask)
        chunks = list(client.completions.create(model=NAME, stream=True, **ask))
        assert len(chunks) > len(whole.choices)  # piece by piece
        assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
        texts, reasons, usage = joined_stream(chunks)
        assert texts == {c.index: c.text for c in whole.choices}
        assert reasons == {c.index: c.finish_reason for c in whole.choices}
        assert usage is None
    chunks = list(client.completions.create(model=NAME, prompt=IDS, max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 14
    assert chunks[-1].usage.prompt_tokens == len(IDS[0]) + len(IDS[1])
    assert all(c.usage is None for c in chunks[:-1])
    # raw HTTP: the event stream's content type, and data: [DONE] last
    status, headers, data = server.request("POST", "/v1/completions", {
        "model": NAME, "prompt": TEXTS[0], "max_tokens": 6, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})  # fmt: skip
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse(data)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 6,
                                                          "total_tokens": 10}  # fmt: skip
    text = "".join(c["text"] for e in events[:-2] for c in json.loads(e)["choices"])
    assert text == decode(tokenizer, expected)


def check_logprobs(logprobs, ids: list[int], tokenizer, table: np.ndarray, start: int, top: int) -> None:
    """logprobs of tokens ids[start:] (entry k of ids[start + k]) against (T, V) forward log-softmax `table`
    over `ids`: entry of token i scored at position i - 1, with the top `top` tokens there."""
    tokens = [tokenizer.decode([t]) for t in ids]
    assert logprobs.tokens == tokens[start:]
    # offsets count the tokens' own texts, from where the first one starts
    assert [o - logprobs.text_offset[0] for o in logprobs.text_offset] == np.cumsum(
        [0, *[len(t) for t in tokens[start:-1]]]).tolist()  # fmt: skip
    for k, i in enumerate(range(start, len(ids))):
        if i == 0:
            assert logprobs.token_logprobs[k] is None and logprobs.top_logprobs[k] is None
            continue
        row = table[i - 1]
        assert abs(logprobs.token_logprobs[k] - row[ids[i]]) < TOLERANCE, (i, logprobs.token_logprobs[k], row[ids[i]])
        best = np.argsort(-row)[:top].tolist()
        want = {tokens[i]: row[ids[i]], **{tokenizer.decode([t]): row[t] for t in best}}
        got = logprobs.top_logprobs[k]
        assert set(got) == set(want), (i, got, want)
        assert max(abs(got[t] - want[t]) for t in want) < TOLERANCE
        assert list(got.values()) == sorted(got.values(), reverse=True)


def test_echo_and_logprobs_equal_a_forward_pass(server, reference):
    model, tokenizer = reference
    prompt, encoded = IDS[1], encode(tokenizer, TEXTS[0])

    def forward_passes() -> tuple[np.ndarray, list[int], np.ndarray, np.ndarray]:
        new = offline(model, [prompt], max_new_tokens=6)[0]
        return log_softmax(model, prompt), new, log_softmax(model, prompt + new), log_softmax(model, encoded)

    client = server.client()
    # max_tokens 0: the prompt's log-likelihood, as evaluation harnesses ask for it
    scored = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    # max_tokens 1 (lm-eval's request): the prompt and the greedy token, scored over both
    one = client.completions.create(model=NAME, prompt=[prompt], max_tokens=1, echo=True, logprobs=3, temperature=0)
    # generated tokens only, whole and streamed
    ask = dict(model=NAME, prompt=prompt, max_tokens=6, logprobs=2, temperature=0)
    generated = [client.completions.create(**ask).choices[0].logprobs]
    pieces = [c.choices[0].logprobs for c in client.completions.create(**ask, stream=True) if c.choices]
    fields = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    generated.append(SimpleNamespace(**{f: [v for p in pieces if p for v in getattr(p, f)] for f in fields}))
    # a string prompt echoes its text; its logprobs start with the BOS the server put first
    text = client.completions.create(model=NAME, prompt=TEXTS[0], max_tokens=0, echo=True, logprobs=1)

    table, new, full, encoded_table = forward_passes()
    choice = scored.choices[0]
    assert choice.text == tokenizer.decode(prompt) and choice.finish_reason == "length"
    assert choice.logprobs.text_offset[0] == 0 and scored.usage.completion_tokens == 0
    check_logprobs(choice.logprobs, prompt, tokenizer, table, 0, 3)
    greedy = int(np.argmax(table[-1]))
    assert one.choices[0].text == tokenizer.decode(prompt) + tokenizer.decode([greedy])
    check_logprobs(one.choices[0].logprobs, [*prompt, greedy], tokenizer, table, 0, 3)
    for logprobs in generated:  # each token scored by a forward pass over the prompt and the tokens before it
        assert logprobs.text_offset[0] == 0
        check_logprobs(logprobs, prompt + new, tokenizer, full, len(prompt), 2)
    assert text.choices[0].text == TEXTS[0]
    check_logprobs(text.choices[0].logprobs, encoded, tokenizer, encoded_table, 0, 1)


# ---- errors -----------------------------------------------------------------------------------------
OK = {"model": NAME, "prompt": "w1 w2", "max_tokens": 2}
ERRORS = {
    "malformed JSON": ("POST", "/v1/completions", b'{"prompt": "w1",', 400, None),
    "not an object": ("POST", "/v1/completions", b"[1, 2]", 400, None),
    "unknown model": ("POST", "/v1/completions", {**OK, "model": "gpt-5"}, 404, "model"),
    "max_tokens beyond the context": ("POST", "/v1/completions", {**OK, "prompt": [5] * 70, "max_tokens": 64},
                                      400, "max_tokens"),
    "prompt longer than the context": ("POST", "/v1/completions", {**OK, "prompt": [5] * (CONTEXT + 1)}, 400,
                                       "prompt"),
    "n over --max-n": ("POST", "/v1/completions", {**OK, "n": LIMITS["max_n"] + 1}, 400, "n"),
    "max_tokens over --max-tokens": ("POST", "/v1/completions", {**OK, "max_tokens": LIMITS["max_tokens"] + 1}, 400,
                                     "max_tokens"),
    "negative temperature": ("POST", "/v1/completions", {**OK, "temperature": -0.5}, 400, "temperature"),
    "top_p over 1": ("POST", "/v1/completions", {**OK, "top_p": 1.5}, 400, "top_p"),
    "a field of the wrong type": ("POST", "/v1/completions", {**OK, "max_tokens": "many"}, 400, "max_tokens"),
    "missing prompt": ("POST", "/v1/completions", {"model": NAME}, 400, "prompt"),
    "token id outside the vocabulary": ("POST", "/v1/completions", {**OK, "prompt": [1, VOCAB]}, 400, "prompt"),
    "logprobs over --max-logprobs": ("POST", "/v1/completions", {**OK, "logprobs": 21}, 400, "logprobs"),
    "too many stop token ids": ("POST", "/v1/completions", {**OK, "stop_token_ids": list(range(3, 11))}, 400,
                                "stop_token_ids"),
    "chat without a chat template": ("POST", "/v1/chat/completions",
                                     {"model": NAME, "messages": [{"role": "user", "content": "w1"}]}, 400, "messages"),
    "unknown path": ("GET", "/v1/nowhere", None, 404, None),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_openai_error_objects(server, case):
    method, path, body, status, param = ERRORS[case]
    got, headers, data = server.request(method, path, body)
    assert headers["content-type"] == "application/json"
    kind = "not_found_error" if case == "unknown path" else "invalid_request_error"
    assert_error(got, json.loads(data), status, param=param, kind=kind)
    if case == "unknown model":
        assert json.loads(data)["error"]["code"] == "model_not_found"


def test_a_body_over_the_limit_is_413(server):
    big = {**OK, "prompt": "w1 " * (LIMITS["max_body_bytes"] // 3)}
    status, body = server.post("/v1/completions", big)  # with Content-Length: refused before it is read
    assert_error(status, body, 413, message="--max-body-bytes")
    data = json.dumps(big).encode()
    chunks = iter([data[i : i + 8192] for i in range(0, len(data), 8192)])  # chunked: no length declared
    status, _, raw = server.request("POST", "/v1/completions", chunks)
    assert_error(status, json.loads(raw), 413, message="--max-body-bytes")
    just_under = {**OK, "prompt": [5] * 8, "temperature": 0, "user": "x" * (LIMITS["max_body_bytes"] - 200)}
    assert len(json.dumps(just_under)) <= LIMITS["max_body_bytes"]
    assert server.post("/v1/completions", just_under)[0] == 200


def test_the_openai_client_raises_the_matching_exceptions(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=NAME, prompt="w1", n=LIMITS["max_n"] + 1)
    assert caught.value.status_code == 400 and caught.value.response.json()["error"]["param"] == "n"
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-5", prompt="w1")
    assert caught.value.response.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "w1"}])
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model=NAME, prompt="w1 " * LIMITS["max_body_bytes"])
    assert caught.value.status_code == 413
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]


# ---- metrics ------------------------------------------------------------------------------------------
def test_metrics_count_requests_tokens_and_first_tokens(server):
    completions = 'ettin_jax_requests_total{endpoint="/v1/completions",status="200"}'
    bad = 'ettin_jax_requests_total{endpoint="/v1/completions",status="400"}'
    before = server.metrics()
    assert before["ettin_jax_slots"] == 8 and before["ettin_jax_active_slots"] == 0
    assert before["ettin_jax_queue_length"] == 0
    status, body = server.post("/v1/completions", {**OK, "prompt": IDS, "max_tokens": 5, "n": 2, **SAMPLING})
    assert status == 200 and body["usage"]["completion_tokens"] == 20
    assert server.post("/v1/completions", {**OK, "n": 99})[0] == 400
    after = wait_for_metric(server, bad, before.get(bad, 0) + 1)
    after = wait_for_metric(server, completions, before.get(completions, 0) + 1)
    assert after[completions] == before.get(completions, 0) + 1
    assert after[bad] == before.get(bad, 0) + 1
    assert body["usage"]["prompt_tokens"] == sum(map(len, IDS))  # each prompt once, as OpenAI counts n > 1
    assert after["ettin_jax_prompt_tokens_total"] - before["ettin_jax_prompt_tokens_total"] == sum(map(len, IDS))
    assert after["ettin_jax_generation_tokens_total"] - before["ettin_jax_generation_tokens_total"] == 20
    count = "ettin_jax_time_to_first_token_seconds_count"
    assert after[count] == before[count] + 1  # one per request, when its first token comes
    assert after[count] == after['ettin_jax_time_to_first_token_seconds_bucket{le="+Inf"}']
    buckets = [v for k, v in after.items() if k.startswith("ettin_jax_time_to_first_token_seconds_bucket")]
    assert buckets == sorted(buckets) and after["ettin_jax_time_to_first_token_seconds_sum"] > 0
    assert after["ettin_jax_requests_running"] == 1  # this /metrics request
    assert after["ettin_jax_compiled_programs_total"] >= 2  # a prefill and a decode at least, by now


# ---- load ---------------------------------------------------------------------------------------------
def one_request(client: openai.OpenAI, ask: dict) -> tuple[str, str, int | None]:
    """(text, finish_reason, completion tokens) of one completion, streamed (with a usage chunk) or not."""
    if ask.get("stream"):
        texts, reasons, usage = joined_stream(client.completions.create(**ask, stream_options={"include_usage": True}))
        assert set(texts) == {0}
        return texts[0], reasons[0], usage.completion_tokens
    out = client.completions.create(**ask)
    return out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens


def test_200_concurrent_requests_each_equal_the_offline_engine(server, reference):
    model, tokenizer = reference
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, VOCAB - 4, size=rng.integers(1, 30))) for _ in range(50)]
    asks = []
    for i in range(200):
        asks.append(dict(model=NAME, prompt=texts[i % 50], seed=100 + i % 37, **SAMPLING,
                         max_tokens=int(rng.integers(8, 17)), stream=i % 2 == 1))  # fmt: skip
    expected = offline(
        model,
        [encode(tokenizer, a["prompt"]) for a in asks],
        do_sample=True,
        **SAMPLING,
        seed=[a["seed"] for a in asks],
        max_new_tokens=[a["max_tokens"] for a in asks],
    )
    client = server.client()
    with ThreadPoolExecutor(200) as pool:
        got = list(pool.map(lambda ask: one_request(client, ask), asks))
    want = [(decode(tokenizer, e), "stop" if e[-1] == EOS else "length", len(e)) for e in expected]
    assert len({w[0] for w in want}) > 150  # prompts and seeds do make different texts
    wrong = [i for i in range(200) if got[i] != want[i]]
    assert not wrong, [(i, got[i], want[i]) for i in wrong[:5]]
    deadline = time.monotonic() + 5
    while server.metrics()["ettin_jax_active_slots"] != 0:
        assert time.monotonic() < deadline, "slots still busy after every request was answered"
        time.sleep(0.05)


def test_bad_requests_fail_alone_while_others_complete(server, reference):
    model, tokenizer = reference
    good = [dict(model=NAME, prompt=TEXTS[i % 2], seed=7 + i, **SAMPLING, max_tokens=16, stream=i % 3 == 0)
            for i in range(8)]  # fmt: skip
    bad = [
        ({**OK, "prompt": [5] * (CONTEXT + 5)}, "prompt"),
        ({**OK, "top_p": 2.0}, "top_p"),
        ({**OK, "prompt": [1, 5, 10_000]}, "prompt"),
        ({**OK, "max_tokens": 100}, "max_tokens"),
        ({**OK, "stream": True, "prompt": [5] * (CONTEXT - 1)}, "max_tokens"),
        ({**OK, "stream": True, "repetition_penalty": 0}, "repetition_penalty"),
    ]
    expected = offline(
        model,
        [encode(tokenizer, g["prompt"]) for g in good],
        do_sample=True,
        **SAMPLING,
        seed=[g["seed"] for g in good],
        max_new_tokens=16,
    )
    client = server.client()
    with ThreadPoolExecutor(len(good) + len(bad)) as pool:
        goods = [pool.submit(one_request, client, g) for g in good]
        bads = [pool.submit(server.post, "/v1/completions", b) for b, _ in bad]
        for (_, param), future in zip(bad, bads, strict=True):
            status, body = future.result()
            assert_error(status, body, 400, param=param)
        assert [f.result()[0] for f in goods] == [decode(tokenizer, e) for e in expected]


def test_a_temperature_near_0_is_greedy_and_non_finite_numbers_are_refused(server, reference):
    """Below 1e-5 a temperature decodes greedily, as in vLLM (the engine would divide float32 logits by a
    float32 0 or subnormal); NaN and Infinity, which Python's JSON reader accepts, are a 400 naming the field."""
    model, tokenizer = reference
    greedy = decode(tokenizer, offline(model, [encode(tokenizer, TEXTS[1])], max_new_tokens=8)[0])
    for temperature in (1e-40, 1e-6):
        status, body = server.post("/v1/completions", {**OK, "prompt": TEXTS[1], "max_tokens": 8, "seed": 1,
                                                       "temperature": temperature})  # fmt: skip
        assert status == 200 and body["choices"][0]["text"] == greedy, (temperature, body)
    for field, value in [("temperature", "Infinity"), ("temperature", "NaN"), ("top_p", "NaN"),
                         ("repetition_penalty", "Infinity"), ("min_p", "-Infinity")]:  # fmt: skip
        raw = f'{{"prompt": "w40 w50", "max_tokens": 8, "min_tokens": 8, "{field}": {value}}}'.encode()
        status, _, data = server.request("POST", "/v1/completions", raw)
        assert_error(status, json.loads(data), 400, param=field)


def test_integers_beyond_the_engine_s_types_fail_alone(server, reference):
    """A seed beyond 64 bits, a top_k, min_tokens or stop token id beyond 32 bits (once the engine thread's death,
    hanging every request) is a 400 naming the field, while requests sent with them complete."""
    model, tokenizer = reference
    expected = decode(tokenizer, offline(model, [encode(tokenizer, TEXTS[0])], max_new_tokens=8)[0])
    good = {**OK, "prompt": TEXTS[0], "max_tokens": 8, "temperature": 0}
    bad = [({**OK, "seed": 2**64, **SAMPLING}, "seed"), ({**OK, "seed": -(2**63) - 1, **SAMPLING}, "seed"),
           ({**OK, "top_k": 2**40, **SAMPLING}, "top_k"),
           ({**OK, "min_tokens": 2**40}, "min_tokens"), ({**OK, "stop_token_ids": [2**40]}, "stop_token_ids"),
           ({**OK, "stop_token_ids": [VOCAB]}, "stop_token_ids")]  # fmt: skip
    with ThreadPoolExecutor(len(bad) + 4) as pool:  # a timeout, not a hang, if the engine dies again
        goods = [pool.submit(server.post, "/v1/completions", good, timeout=30) for _ in range(4)]
        bads = [pool.submit(server.post, "/v1/completions", b, timeout=30) for b, _ in bad]
        for (_, param), future in zip(bad, bads, strict=True):
            status, body = future.result()
            assert_error(status, body, 400, param=param)
        assert [f.result()[1]["choices"][0]["text"] for f in goods] == [expected] * 4
    status, body = server.post("/v1/completions", good, timeout=30)
    assert status == 200 and body["choices"][0]["text"] == expected
    status, _, data = server.request("GET", "/health")
    assert status == 200 and json.loads(data) == {"status": "ok"}


def test_a_seed_whose_later_choices_overflow_is_refused_or_served_whole(server):
    """seed + j for choice j must fit the engine's int64 seeds: a 400 naming seed before any response starts,
    or (seeds wrapped) every choice served."""
    ask = {**OK, "max_tokens": 4, "n": 2, "seed": 2**63 - 1, **SAMPLING}
    status, body = server.post("/v1/completions", ask, timeout=30)
    if status != 200:
        assert_error(status, body, 400, param="seed")
    else:
        assert [c["finish_reason"] for c in body["choices"]] == ["length"] * 2
    status, _, data = server.request("POST", "/v1/completions", {**ask, "stream": True}, timeout=30)
    if status != 200:
        assert_error(status, json.loads(data), 400, param="seed")
    else:
        events = sse(data)
        assert events and events[-1] == "[DONE]", data
        ended = [c["index"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
        assert sorted(ended) == [0, 1]


def test_a_temperature_beyond_float32_is_refused_or_keeps_min_tokens(server):
    raw = {**OK, "prompt": "w40 w50", "max_tokens": 8, "min_tokens": 8, "n": 2, "seed": 0, "temperature": 1e300}
    status, body = server.post("/v1/completions", raw)
    if status != 200:
        assert_error(status, body, 400, param="temperature")
    else:
        assert body["usage"]["completion_tokens"] == 16, body


# ---- the second server: API key, chat, disconnect, SIGTERM --------------------------------------------
def test_the_api_key_guards_every_path_but_health(guarded):
    for path, method, body in [("/v1/completions", "POST", {"prompt": "w1", "max_tokens": 1}),
                               ("/v1/models", "GET", None), ("/metrics", "GET", None),
                               ("/v1/chat/completions", "POST", {"messages": []})]:  # fmt: skip
        for headers in ({"Authorization": None}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            status, _, data = guarded.request(method, path, body, headers=headers)
            assert_error(status, json.loads(data), 401, message="API key")
            assert json.loads(data)["error"]["code"] == "invalid_api_key"
    status, _, data = guarded.request("GET", "/health", headers={"Authorization": None})
    assert status == 200 and json.loads(data) == {"status": "ok"}
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="wrong").models.list()
    client = guarded.client(api_key=KEY)
    models = client.models.list()
    assert [m.id for m in models.data] == [guarded.name]
    out = client.completions.create(model=guarded.name, prompt="w1 w2", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3 and len(out.choices[0].text.split()) == 3
    assert guarded.metrics()['ettin_jax_requests_total{endpoint="/v1/models",status="401"}'] == 4


def test_chat_with_a_template(guarded, reference):
    model, tokenizer = reference
    messages = [{"role": "system", "content": "w3 w4"}, {"role": "user", "content": "w20 w21 w22"}]
    prompt = [BOS, *tokenizer("w3 w4 w20 w21 w22", add_special_tokens=False)["input_ids"]]
    expected = decode(tokenizer, offline(model, [prompt], max_new_tokens=8)[0])
    client = guarded.client()
    out = client.chat.completions.create(model=guarded.name, messages=messages, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), 8)
    chunks = list(client.chat.completions.create(model=guarded.name, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def wait_until_idle(served: Served, since: float, what: str) -> None:
    """Polls /metrics until no slot is busy and no other request runs, for at most 3 s after `since` (the
    requests this is used for would run for tens of seconds otherwise)."""
    while (now := served.metrics())["ettin_jax_active_slots"] != 0 or now["ettin_jax_requests_running"] != 1:
        assert time.monotonic() - since < 3, f"a slot is still busy 3 s after {what}"
        time.sleep(0.05)


def test_a_stop_string_ends_the_request_and_frees_its_slot(guarded):
    """The stop string comes within a few tokens of a request that could run for tens of seconds."""
    client = guarded.client()
    ask = dict(model=guarded.name, prompt="w1 w2", temperature=0, extra_body={"ignore_eos": True})
    head = client.completions.create(**ask, max_tokens=6).choices[0].text
    stop = head.split(" ")[3]
    at = head.find(stop)
    out = client.completions.create(**ask, max_tokens=LONG_CONTEXT - 100, stop=stop)
    answered = time.monotonic()
    assert out.choices[0].text == head[:at] and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len(head[: at + len(stop)].split(" "))
    wait_until_idle(guarded, answered, "the stop string")


def open_stream(served: Served, body: dict) -> socket.socket:
    """A raw HTTP/1.1 streaming POST; returns the socket, the response unread."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=120)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {served.key}\r\nConnection: close\r\nContent-Length: {len(data)}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + data)
    return sock


def test_a_client_that_disconnects_mid_stream_frees_its_slot(guarded):
    max_tokens = LONG_CONTEXT - 100  # tens of seconds of generation, if nothing stops it
    before = guarded.metrics()
    sock = open_stream(guarded, {"prompt": "w1 w2", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                                 "ignore_eos": True})  # fmt: skip
    received = b""
    while received.count(b"data: ") < 4:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    assert guarded.metrics()["ettin_jax_active_slots"] == 1
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    wait_until_idle(guarded, time.monotonic(), "the client left")
    generated = guarded.metrics()["ettin_jax_generation_tokens_total"] - before["ettin_jax_generation_tokens_total"]
    assert 0 < generated < max_tokens // 4, generated
    time.sleep(0.5)
    assert (
        guarded.metrics()["ettin_jax_generation_tokens_total"] - before["ettin_jax_generation_tokens_total"]
        == generated
    )


def test_sigterm_finishes_the_stream_in_flight_refuses_new_connections_and_exits_0(guarded):
    """Last: it stops the second server."""
    max_tokens = 2000
    sock = open_stream(guarded, {"prompt": "w1 w2", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                                 "ignore_eos": True, "stream_options": {"include_usage": True}})  # fmt: skip
    stream = sock.makefile("rb")
    assert stream.readline().startswith(b"HTTP/1.1 200")
    while stream.readline() not in (b"\r\n", b""):  # the headers
        pass
    first = stream.readline()  # the first chunk's size line: the stream has started
    assert first.strip(), first
    assert guarded.metrics()["ettin_jax_active_slots"] == 1  # and is still generating
    guarded.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    while True:  # uvicorn stops listening within its next tick
        try:
            socket.create_connection(("127.0.0.1", guarded.port), timeout=1).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() - signalled < 5, "new connections are still accepted 5 s after SIGTERM"
        time.sleep(0.05)
    assert guarded.proc.poll() is None  # still draining the stream
    rest = first + stream.read()  # chunked transfer encoding, to the last chunk
    body = b""
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        size = int(size, 16)
        body, rest = body + rest[:size], rest[size + 2 :]
        if size == 0:
            break
    sock.close()
    events = sse(body)
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == max_tokens
    choices = [c for e in events[:-2] for c in json.loads(e)["choices"]]
    text = "".join(c["text"] for c in choices)
    assert len(text.split()) == max_tokens and choices[-1]["finish_reason"] == "length"
    assert guarded.proc.wait(timeout=30) == 0, guarded.output()
