"""The continuous-batching engine: each request's tokens equal `generate` on its prompt alone
(and transformers'), do not depend on their neighbours or slot, a stream of many requests
compiles a few programs, and a bad request fails alone."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from helpers import TINY, random_ids

from ettin_jax import engine as engine_module
from ettin_jax.engine import Engine
from ettin_jax.generation import GenerationError


def alone(model, prompt: list[int], **kwargs) -> list[int]:
    """`generate` on one prompt: its new tokens through the first stop token."""
    stops = kwargs.get("eos_token_id", [TINY["eos_token_id"]])
    new = model.generate([prompt], pad_token_id=0, **kwargs)[0, len(prompt) :].tolist()
    return new[: next((i + 1 for i, t in enumerate(new) if t in stops), len(new))]


def prompts(count: int, longest: int, seed: int) -> list[list[int]]:
    lengths = np.random.default_rng(seed).integers(1, longest + 1, size=count)
    return [random_ids(1, int(n), seed=seed * 1000 + i)[0].tolist() for i, n in enumerate(lengths)]


def test_greedy_equals_generate_alone_and_transformers(causal_pair, monkeypatch):
    """Ragged prompts, some longer than the chunk (prefilled a chunk per round) and than the
    window (4), outputs several windows long, stop tokens that end rows at different steps,
    fewer slots than requests (slots refilled), decode steps that attend over 16, 32 or 64
    sequence indices as the requests grow and end (the cache resized to the span)."""
    reference, model = causal_pair
    monkeypatch.setattr(engine_module, "MIN_SPAN", 16)
    sizes, resize = [], Engine._resize  # the sizes the slots' cache takes, in turn

    def record(self, span):
        resize(self, span)
        if not sizes or sizes[-1] != self.span:
            sizes.append(self.span)

    monkeypatch.setattr(Engine, "_resize", record)
    batch = prompts(10, 40, seed=1)
    kwargs = dict(max_new_tokens=14, eos_token_id=[5, 9])
    got = model.generate_batch(batch, **kwargs, max_batch_size=4, prefill_chunk=16, steps_per_call=3)
    assert set(sizes) == {16, 32, 64} and any(b < a for a, b in itertools.pairwise(sizes)), sizes  # grown and cut
    assert got == [alone(model, p, **kwargs) for p in batch]
    assert any(len(g) < 14 for g in got) and any(len(g) == 14 for g in got)  # both ways of ending
    longest = max(batch, key=len)
    with torch.no_grad():
        theirs = reference.generate(
            torch.tensor([longest]), attention_mask=torch.ones((1, len(longest)), dtype=torch.long),
            do_sample=False, max_new_tokens=14, eos_token_id=[5, 9], pad_token_id=0,
        )[0, len(longest) :].tolist()  # fmt: skip
    assert got[batch.index(longest)] == theirs


def test_sampling_does_not_depend_on_neighbours_or_slot(causal_pair):
    """The same request and seed gives the same tokens alone and among 100 others, wherever it
    is queued (so in different slots)."""
    _, model = causal_pair
    kwargs = dict(max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.3, eos_token_id=[])
    request = random_ids(1, 13, seed=99)[0].tolist()
    by_itself = model.generate_batch([request], seed=[42], **kwargs)[0]
    others = prompts(100, 20, seed=2)
    for where in (0, 57):
        batch = [*others[:where], request, *others[where:]]
        seeds = [*range(1000, 1000 + where), 42, *range(2000, 2100 - where)]
        got = model.generate_batch(batch, seed=seeds, max_batch_size=8, **kwargs)
        assert got[where] == by_itself, where
    assert len(set(map(tuple, got))) > 50  # the others do sample (their own seeds, different tokens)


def test_prompts_admitted_together_are_prefilled_with_others_of_their_length(causal_pair):
    """A 20-token prompt is not padded to 256 beside a 200-token one (lengths only: no model call), small calls are merged
    (each call has a cost of its own), and no call holds more than `prefill_batch` prompts."""
    _, model = causal_pair
    engine = Engine(model, max_batch_size=8, max_length=128, prefill_batch=4, prefill_chunk=256)

    def groups(*lengths):
        return [[len(r.prompt) for r in g] for g in engine._groups([SimpleNamespace(prompt=[1] * n) for n in lengths])]

    assert groups(200, 20, 210, 22) == [[20, 22], [200, 210]]
    assert groups(31, 17, 30, 20) == [[17, 20, 30, 31]]  # 4 x 32 in one call, not 2 x 32 twice
    assert groups(*range(10, 16)) in ([[10, 11], [12, 13, 14, 15]], [[10, 11, 12, 13], [14, 15]])


def test_a_stream_of_1000_requests_compiles_a_few_programs(causal_pair):
    _, model = causal_pair
    batch = prompts(1000, 60, seed=3)
    new = np.random.default_rng(3).integers(1, 6, size=1000).tolist()
    before = engine_module.compiled_programs()
    got = model.generate_batch(batch, max_new_tokens=new, max_batch_size=16, prefill_chunk=32, max_length=128)
    compiled = engine_module.compiled_programs() - before
    # Prefills of widths 16 and 32 for 1, 2 and 4 prompts and their inserts, a chunk step, a
    # chunk finish and its insert, decodes of 1, 2, 4, 8 and 16 slots (one cache size: max_length
    # is below MIN_SPAN), a move: 21 (fewer if an earlier test compiled some with the same shapes).
    assert compiled <= 21, compiled
    assert [len(g) <= n for g, n in zip(got, new, strict=True)] == [True] * 1000


def test_a_bad_request_fails_alone(causal_pair):
    _, model = causal_pair
    engine = Engine(model, max_batch_size=2, max_length=64)
    good = random_ids(1, 6, seed=4)[0].tolist()
    bad = {
        "longer than the context": (random_ids(1, 70, seed=5)[0].tolist(), {}, "exceeds the engine's max_length"),
        "overruns the context": (good, {"max_new_tokens": 60}, "6-token prompt plus 60 new tokens exceeds"),
        "empty": ([], {}, "is empty"),
        "outside the vocabulary": ([1, 5000], {}, "token id 5000 outside the vocabulary"),
        "unknown argument": (good, {"top_kk": 3}, "unknown argument"),
        "a seed beyond 64 bits": (good, {"seed": 2**64, "do_sample": True}, "out of range"),
        "a top_k beyond int32": (good, {"top_k": 2**40, "do_sample": True}, "out of range"),
        "a stop id outside the vocabulary": (good, {"eos_token_id": [10**6]}, "eos_token_id 1000000 is outside"),
    }
    failed = {name: engine.submit(prompt, **kw) for name, (prompt, kw, _) in bad.items()}
    fine = engine.submit(good, max_new_tokens=5)
    engine.run()
    for name, (_, _, message) in bad.items():
        assert failed[name].done and message in failed[name].error, (name, failed[name].error)
    assert fine.error is None and fine.tokens == alone(model, good, max_new_tokens=5)
    with pytest.raises(GenerationError, match=r"request 1: .*outside the vocabulary"):
        model.generate_batch([good, [1, 5000]])


def test_a_full_queue_pushes_back_and_cancelling_frees_the_slot(causal_pair):
    _, model = causal_pair
    engine = Engine(model, max_batch_size=1, max_queue=2, max_length=64, steps_per_call=2)
    long = engine.submit(random_ids(1, 5, seed=6)[0].tolist(), max_new_tokens=40, eos_token_id=[])
    engine.step()
    assert 0 < len(long.tokens) < 40
    long.cancel()
    # Five more than the queue holds: submit runs rounds itself until there is room.
    rest = [engine.submit(p, max_new_tokens=4, eos_token_id=[]) for p in prompts(5, 10, seed=7)]
    engine.run()
    assert long.finish_reason == "cancelled" and len(long.tokens) < 40
    assert [len(r.tokens) for r in rest] == [4] * 5
    assert [r.finish_reason for r in rest] == ["length"] * 5


def test_streams_tokens_from_a_background_thread(causal_pair):
    _, model = causal_pair
    engine = Engine(model, max_batch_size=2, max_length=64)
    engine.start()
    try:
        prompt = random_ids(1, 7, seed=8)[0].tolist()
        seen = []
        request = engine.submit(
            prompt, max_new_tokens=9, eos_token_id=[], on_update=lambda r: seen.append((len(r.tokens), r.done))
        )
        streamed = list(request.stream())
    finally:
        engine.stop()
    assert streamed == request.tokens == alone(model, prompt, max_new_tokens=9, eos_token_id=[])
    assert seen[-1] == (9, True) and len(seen) >= 2  # told of new tokens, then of the end
    assert request.first_token_at is not None


def test_the_engine_on_a_mesh_equals_one_device(causal_pair, monkeypatch):
    """Slots split over the mesh's batch axes, the model over all three, the slots' cache
    resized as the requests grow and end (to 32 and 64 sequence indices): the same tokens, and the
    slots keep their sharding."""
    from flax import nnx

    from ettin_jax import sharding

    _, model = causal_pair
    monkeypatch.setattr(engine_module, "MIN_SPAN", 16)
    copy = nnx.merge(*nnx.split(model))  # its own params, placed on the mesh below
    sharding.shard_model(copy, sharding.make_mesh(data=2, fsdp=2, tensor=2))
    batch = prompts(6, 40, seed=9)
    kwargs = dict(max_new_tokens=14, eos_token_id=[5, 9], max_batch_size=4, prefill_chunk=16)
    placed, resize = [], Engine._resize

    def record(self, span):
        resize(self, span)
        placed.append((self.span, self.slots.cache.layers[0].k.sharding, self.slots.tokens.sharding))

    monkeypatch.setattr(Engine, "_resize", record)
    assert copy.generate_batch(batch, **kwargs) == model.generate_batch(batch, **kwargs)
    on_mesh = [p for p in placed if isinstance(p[2], jax.sharding.NamedSharding)]
    assert {span for span, *_ in on_mesh} >= {32, 64}
    assert all(k.spec[0] is not None and tokens.spec[0] is not None for _, k, tokens in on_mesh)  # rows split


def test_logprobs_are_the_models_own_and_do_not_change_the_tokens(causal_pair):
    """Each token's raw log-probability and the top ones equal a forward pass over the prompt
    and the tokens before it (float32, 1e-5), whether the token came from the prefill or a
    decode step, sampled or not, beside a request that asks for none."""
    _, model = causal_pair
    engine = Engine(model, max_batch_size=4, max_length=64, steps_per_call=3, max_logprobs=5)
    prompt = random_ids(1, 6, seed=11)[0].tolist()
    kwargs = dict(max_new_tokens=7, eos_token_id=[], do_sample=True, seed=3)
    asked = engine.submit(prompt, logprobs=3, **kwargs)
    plain = engine.submit(prompt, **kwargs)
    engine.run()
    assert asked.tokens == plain.tokens and plain.token_logprobs == []
    sequence = np.asarray([prompt + asked.tokens])
    logits = np.asarray(model(sequence).logits[0, len(prompt) - 1 : -1], np.float64)
    expected = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    chosen = expected[np.arange(7), asked.tokens]
    np.testing.assert_allclose(asked.token_logprobs, chosen, atol=1e-5)
    for row, top in zip(expected, asked.top_logprobs, strict=True):
        assert [t for t, _ in top] == np.argsort(-row)[:3].tolist()
        np.testing.assert_allclose([v for _, v in top], np.sort(row)[::-1][:3], atol=1e-5)
    bad = engine.submit(prompt, logprobs=6, max_new_tokens=2)
    assert bad.done and "logprobs must be an integer in [0, 5]" in bad.error


def test_a_failed_round_fails_every_request_instead_of_hanging(causal_pair, monkeypatch):
    """A bug of ours inside the engine's thread ends every request with the error, and later
    submits fail at once: nothing waits forever."""
    _, model = causal_pair
    engine = Engine(model, max_batch_size=2, max_length=64)

    def broken(self):
        raise RuntimeError("injected")

    monkeypatch.setattr(Engine, "_admit", broken)
    engine.start()
    try:
        requests = [engine.submit(random_ids(1, 5, seed=i)[0].tolist(), max_new_tokens=4) for i in range(3)]
        for request in requests:
            with pytest.raises(
                GenerationError, match=r"(engine failed|stopped after an error): RuntimeError: injected"
            ):
                request.result()
        late = engine.submit([1, 2], max_new_tokens=2)
        assert late.done and "stopped after an error" in late.error
    finally:
        engine.stop()
    assert engine.error == "RuntimeError: injected"
