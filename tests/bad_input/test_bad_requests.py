"""Hostile requests to the OpenAI-compatible server, in process (FastAPI's test client on the
app `ettin-jax serve` runs, over the embedded default model): each gets an OpenAI error object
with the right status that names the field, none is answered as if it were something else (a
bool is not a token id, a string is not a number), and the server answers a good request after
all of them. tests/test_server.py covers the same errors against a real server process."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

import ettin_jax
from ettin_jax import default_model, server
from ettin_jax.engine import Engine

NAME = "tiny"
KEY = "sk-hostile"
CONTEXT = 64
VOCAB = default_model.config().vocab_size  # the embedded default's
OK = {"model": NAME, "prompt": "ab", "max_tokens": 2}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "ab"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def client():
    generator = ettin_jax.pipeline("text-generation")  # the embedded default
    config = server.ServerConfig(model_name=NAME, max_n=4, max_tokens=16, max_logprobs=5, max_body_bytes=4096,
                                 chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")  # fmt: skip
    engine = Engine(generator.model, max_logprobs=config.max_logprobs, max_batch_size=4, max_length=CONTEXT)
    with TestClient(server.create_app(server.Server(generator, engine, config))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def guarded():
    generator = ettin_jax.pipeline("text-generation")
    config = server.ServerConfig(model_name=NAME, api_key=KEY)
    engine = Engine(generator.model, max_batch_size=2, max_length=CONTEXT)
    with TestClient(server.create_app(server.Server(generator, engine, config))) as test_client:
        yield test_client


def completion(**changes):
    return {**OK, **changes}


# name -> (path, body (dict, or raw bytes), status, the field the error must name or None)
CASES = {
    # the body itself
    "empty body": ("/v1/completions", b"", 400, None),
    "malformed JSON": ("/v1/completions", b'{"prompt": ', 400, None),
    "invalid UTF-8": ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None),
    "a JSON list": ("/v1/completions", b"[1, 2]", 400, None),
    "a JSON string": ("/v1/completions", b'"prompt"', 400, None),
    "JSON null": ("/v1/completions", b"null", 400, None),
    "NaN temperature": ("/v1/completions", b'{"model": "tiny", "prompt": "ab", "temperature": NaN}', 400,
                        "temperature"),
    "Infinity top_p": ("/v1/completions", b'{"model": "tiny", "prompt": "ab", "top_p": Infinity}', 400, "top_p"),
    "-Infinity min_p": ("/v1/completions", b'{"model": "tiny", "prompt": "ab", "min_p": -Infinity}', 400, "min_p"),
    "a body over the limit": ("/v1/completions", completion(prompt="a" * 5000), 413, None),
    # the prompt
    "no prompt": ("/v1/completions", {"model": NAME}, 400, "prompt"),
    "null prompt": ("/v1/completions", completion(prompt=None), 400, "prompt"),
    "a number as prompt": ("/v1/completions", completion(prompt=7), 400, "prompt"),
    "an object as prompt": ("/v1/completions", completion(prompt={"text": "ab"}), 400, "prompt"),
    "float token ids": ("/v1/completions", completion(prompt=[5.5, 6.0]), 400, "prompt"),
    "bool token ids": ("/v1/completions", completion(prompt=[True, False]), 400, "prompt"),
    "string token ids": ("/v1/completions", completion(prompt=["5", 6]), 400, "prompt"),
    "negative token id": ("/v1/completions", completion(prompt=[5, -1]), 400, "prompt"),
    "token id past the vocabulary": ("/v1/completions", completion(prompt=[5, VOCAB]), 400, "prompt"),
    "a huge token id": ("/v1/completions", completion(prompt=[2**70]), 400, "prompt"),
    "an empty token list": ("/v1/completions", completion(prompt=[]), 400, "prompt"),
    "an empty inner token list": ("/v1/completions", completion(prompt=[[5], []]), 400, "prompt"),
    "a prompt longer than the context": ("/v1/completions", completion(prompt=[5] * (CONTEXT + 1)), 400, "prompt"),
    "ragged nesting": ("/v1/completions", completion(prompt=[[5, [6]]]), 400, "prompt"),
    # the numbers
    "max_tokens as a string": ("/v1/completions", completion(max_tokens="2"), 400, "max_tokens"),
    "max_tokens as a float": ("/v1/completions", completion(max_tokens=2.5), 400, "max_tokens"),
    "max_tokens as a bool": ("/v1/completions", completion(max_tokens=True), 400, "max_tokens"),
    "negative max_tokens": ("/v1/completions", completion(max_tokens=-1), 400, "max_tokens"),
    "max_tokens over the limit": ("/v1/completions", completion(max_tokens=17), 400, "max_tokens"),
    "max_tokens past the context": ("/v1/completions", completion(prompt=[5] * 60, max_tokens=10), 400,
                                    "max_tokens"),
    "negative temperature": ("/v1/completions", completion(temperature=-0.1), 400, "temperature"),
    "absurd temperature": ("/v1/completions", completion(temperature=1e9), 400, "temperature"),
    "temperature as a string": ("/v1/completions", completion(temperature="hot"), 400, "temperature"),
    "top_p zero": ("/v1/completions", completion(top_p=0), 400, "top_p"),
    "top_p over 1": ("/v1/completions", completion(top_p=1.01), 400, "top_p"),
    "n zero": ("/v1/completions", completion(n=0), 400, "n"),
    "n negative": ("/v1/completions", completion(n=-3), 400, "n"),
    "n over the limit": ("/v1/completions", completion(n=5), 400, "n"),
    "n as a bool": ("/v1/completions", completion(n=True), 400, "n"),
    "seed as a string": ("/v1/completions", completion(seed="42"), 400, "seed"),
    "seed as a float": ("/v1/completions", completion(seed=1.5), 400, "seed"),
    "seed past 64 bits": ("/v1/completions", completion(seed=2**64), 400, "seed"),
    "top_k below -1": ("/v1/completions", completion(top_k=-2), 400, "top_k"),
    "top_k past 2**31": ("/v1/completions", completion(top_k=2**31), 400, "top_k"),
    "min_p over 1": ("/v1/completions", completion(min_p=1.5), 400, "min_p"),
    "repetition_penalty zero": ("/v1/completions", completion(repetition_penalty=0), 400, "repetition_penalty"),
    "negative min_tokens": ("/v1/completions", completion(min_tokens=-1), 400, "min_tokens"),
    "negative logprobs": ("/v1/completions", completion(logprobs=-1), 400, "logprobs"),
    "logprobs over the limit": ("/v1/completions", completion(logprobs=6), 400, "logprobs"),
    "echo as a string": ("/v1/completions", completion(echo="yes"), 400, "echo"),
    "stream as a number": ("/v1/completions", completion(stream=2), 400, "stream"),
    # stops
    "stop as a number": ("/v1/completions", completion(stop=5), 400, "stop"),
    "stop as a list of numbers": ("/v1/completions", completion(stop=[5]), 400, "stop"),
    "stop_token_ids of strings": ("/v1/completions", completion(stop_token_ids=["a"]), 400, "stop_token_ids"),
    "stop_token_ids past the vocabulary": ("/v1/completions", completion(stop_token_ids=[VOCAB]), 400,
                                           "stop_token_ids"),
    "unsupported presence_penalty": ("/v1/completions", completion(presence_penalty=0.5), 400, "presence_penalty"),
    "unsupported logit_bias": ("/v1/completions", completion(logit_bias={"5": 1.0}), 400, "logit_bias"),
    # the model and the paths
    "unknown model": ("/v1/completions", completion(model="gpt-5"), 404, "model"),
    "model as a number": ("/v1/completions", completion(model=5), 400, "model"),
    # chat
    "messages missing": ("/v1/chat/completions", {"model": NAME}, 400, "messages"),
    "messages not a list": ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    "a message not an object": ("/v1/chat/completions", {**CHAT, "messages": ["hi"]}, 400, "messages"),
    "top_logprobs over the limit": ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 6}, 400,
                                    "top_logprobs"),
    "negative max_completion_tokens": ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -1}, 400,
                                       "max_completion_tokens"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_request_is_an_openai_error_naming_the_field(client, case):
    path, body, status, param = CASES[case]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(path, content=data, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error


def test_the_server_still_answers_after_every_bad_request(client):
    response = client.post("/v1/completions", json=OK)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
    health = client.get("/health")
    assert health.status_code == 200


@pytest.mark.parametrize(
    "method, path, status",
    [("GET", "/v1/completions", 405), ("PUT", "/v1/models", 405), ("GET", "/v1/../etc/passwd", 404),
     ("POST", "/v1/nowhere", 404), ("DELETE", "/health", 405)],
)  # fmt: skip
def test_wrong_methods_and_paths(client, method, path, status):
    response = client.request(method, path)
    assert response.status_code == status
    assert "error" in response.json()


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": KEY}, {"authorization": f"Basic {KEY}"},
     {"authorization": "Bearer " + KEY + " "}, {"authorization": "Bearer"}],
)  # fmt: skip
def test_without_the_right_key_every_path_but_health_is_401(guarded, headers):
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/metrics")):
        response = guarded.request(method, path, json=OK if method == "POST" else None, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert response.json()["error"]["code"] == "invalid_api_key"  # as OpenAI answers
    assert guarded.get("/health", headers=headers).status_code == 200
    assert guarded.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
