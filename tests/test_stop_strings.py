"""Stop strings: `generate`, `generate_stream`, `generate_batch`, the engine and the pipeline end
a row at the token that completes a stop string, with the tokens of a run without stop strings
cut there (and transformers' tokens); the pipeline's text ends just before the stop string; and
each bad argument is an error that names it.

A tiny random model with the byte-level tokenizer: its greedy text is random bytes, and the stop
string is picked from what a run without stop strings makes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import torch_model

import ettin_jax as ej
from ettin_jax import generation
from ettin_jax.default_model import byte_tokenizer
from ettin_jax.detokenize import TextStream
from ettin_jax.engine import Engine
from ettin_jax.generation import GenerationError
from ettin_jax.pipelines import PipelineError

BOS, EOS, PAD = 257, 258, 259  # the byte tokenizer's [CLS], [SEP], [PAD]
SPECIAL = dict(vocab_size=264, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, cls_token_id=BOS,
               sep_token_id=EOS)  # fmt: skip
TEXTS = ["xyz", "Hello"]
MAX_NEW = 24
# Every generate call here keeps scores: one compiled program serves them all (the suite's time).
SCORED = dict(output_scores=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(transformers model, ours loaded from its checkpoint, the tokenizer, the prompts (BOS and
    the bytes of TEXTS), and `generate`'s output without stop strings)."""
    tokenizer = byte_tokenizer()
    reference = torch_model("causal", **SPECIAL)
    directory = tmp_path_factory.mktemp("stop-strings")
    reference.save_pretrained(directory)
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    prompts = [[BOS, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in TEXTS]
    return reference, model, tokenizer, prompts, model.generate(prompts, max_new_tokens=MAX_NEW, **SCORED)


@pytest.fixture(scope="module")
def free(setup):
    """Each prompt's new tokens without stop strings, through EOS."""
    *_, prompts, out = setup
    rows = out.sequences[:, width(prompts) :].tolist()
    return [row[: row.index(EOS) + 1] if EOS in row else row for row in rows]


def width(prompts: list[list[int]]) -> int:
    return max(map(len, prompts))


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[PAD] * (width(prompts) - len(p)) + p for p in prompts])
    return ids, (ids != PAD).long()


def decode(tokenizer, tokens) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def stop_of(tokenizer, row: list[int], avoid: list[list[int]] = ()) -> str:
    """The first two printable ASCII characters in a row's text that the text of no row in
    `avoid` holds, found early enough that tokens follow them."""
    text, elsewhere = decode(tokenizer, row[:-4]), [decode(tokenizer, o) for o in avoid]
    for i in range(len(text) - 1):
        pair = text[i : i + 2]
        if pair.isascii() and pair.isprintable() and not any(pair in t for t in elsewhere):
            return pair
    raise AssertionError(f"no stop string to pick in {text!r}")


def cut(tokenizer, row: list[int], stops: list[str]) -> list[int]:
    """The row through its first token whose text completes a stop string: the oracle, by
    decoding every prefix (no TextStream)."""
    for n in range(1, len(row) + 1):
        if any(s in decode(tokenizer, row[:n]) for s in stops):
            return row[:n]
    return row


def padded(rows: list[list[int]]) -> np.ndarray:
    width = max(map(len, rows))
    return np.array([row + [PAD] * (width - len(row)) for row in rows])


@pytest.fixture(scope="module")
def stops(setup, free):
    """Stop strings by case: one that ends row 0 only, and one per row (every row ends)."""
    tokenizer = setup[2]
    first = stop_of(tokenizer, free[0], avoid=[free[1]])
    second = stop_of(tokenizer, free[1])
    return {"row 0 stops": [first], "every row stops": [first, second]}


@pytest.mark.parametrize("case", ["row 0 stops", "every row stops"])
def test_generate_cuts_the_unstopped_tokens_at_the_stop_as_transformers_does(setup, free, stops, case):
    """The ids and the stream: the tokens without stop strings, through the one that completes a
    stop string, then padding; as transformers' generate(stop_strings=..., tokenizer=...) gives.
    The scores: those without stop strings, and logprobs 0 after the stop."""
    reference, model, tokenizer, prompts, unstopped = setup
    stop = stops[case]
    rows = [cut(tokenizer, row, stop) for row in free]
    assert len(rows[0]) < len(free[0])  # the stop ends row 0 early
    got = model.generate(prompts, max_new_tokens=MAX_NEW, stop_strings=stop, tokenizer=tokenizer, **SCORED)
    np.testing.assert_array_equal(got.sequences[:, width(prompts) :], padded(rows))
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        theirs = reference.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW, stop_strings=stop,
            tokenizer=tokenizer, pad_token_id=PAD,
        ).numpy()  # fmt: skip
    np.testing.assert_array_equal(got.sequences, theirs)
    steps = max(map(len, rows))
    assert len(got.scores) == got.logprobs.shape[1] == steps
    for i, row in enumerate(rows):
        n = len(row)
        np.testing.assert_allclose(np.stack(got.scores)[:n, i], np.stack(unstopped.scores)[:n, i], atol=1e-6)
        np.testing.assert_allclose(got.logprobs[i, :n], unstopped.logprobs[i, :n], atol=1e-6)
        assert (got.logprobs[i, :n] < 0).all() and (got.logprobs[i, n:] == 0).all()
    streamed = list(model.generate_stream(prompts, max_new_tokens=MAX_NEW, stop_strings=stop, tokenizer=tokenizer))
    np.testing.assert_array_equal(np.stack(streamed, axis=1), padded(rows))


def test_a_row_that_stops_stops_decoding(setup, free, stops, monkeypatch):
    """With every row stopped early, generation runs the chunks that reach the last stop only,
    not the whole budget."""
    _, model, tokenizer, prompts, _ = setup
    calls = []
    program = generation._chunk_program
    monkeypatch.setattr(generation, "_chunk_program", lambda *a, **k: calls.append(1) or program(*a, **k))
    stop = stops["every row stops"]
    longest = max(len(cut(tokenizer, row, stop)) for row in free)
    got = model.generate(prompts, max_new_tokens=32, stop_strings=stop, tokenizer=tokenizer, **SCORED)
    assert got.sequences.shape[1] == width(prompts) + longest
    assert len(calls) == -(-longest // generation.STOP_CHECK_STEPS) < -(-32 // generation.STOP_CHECK_STEPS)


def test_the_pipeline_text_ends_before_the_stop_and_its_tokens_with_it(setup, free, stops):
    """One prompt (`generate`), a list (the engine) and the stream: the text of the unstopped run
    cut just before the stop string; the tokens through the one that completed it."""
    _, model, tokenizer, _, _ = setup
    pipe = ej.pipeline("text-generation", model=model, tokenizer=tokenizer)
    stop = stops["row 0 stops"]
    texts = [decode(tokenizer, row) for row in free]
    expected = [texts[0][: texts[0].index(stop[0])], texts[1]]
    tokens = [cut(tokenizer, row, stop) for row in free]
    kwargs = dict(max_new_tokens=MAX_NEW, stop_strings=stop, return_full_text=False, return_tensors=True)
    alone = pipe(TEXTS[0], **kwargs)[0]
    assert (alone["generated_text"], alone["generated_token_ids"]) == (expected[0], tokens[0])
    batch = pipe(TEXTS, **kwargs)
    assert [r[0]["generated_text"] for r in batch] == expected
    assert [r[0]["generated_token_ids"] for r in batch] == tokens
    assert "".join(pipe.stream(TEXTS[0], max_new_tokens=MAX_NEW, stop_strings=stop)) == expected[0]


def test_generate_batch_takes_stop_strings_per_request(setup, free, stops):
    """Mixed requests, the same prompt with the stop string and without (None), and one stop
    string for every request; each cut right after the completing token though the engine
    decodes several steps per call."""
    _, model, tokenizer, prompts, _ = setup
    stop = stops["row 0 stops"]
    kwargs = dict(max_new_tokens=MAX_NEW, tokenizer=tokenizer, steps_per_call=8)
    got = model.generate_batch([prompts[0], prompts[0]], stop_strings=[stop, None], **kwargs)
    assert got == [cut(tokenizer, free[0], stop), free[0]]
    assert model.generate_batch(prompts, stop_strings=stop, **kwargs) == [got[0], free[1]]


def test_an_engine_request_ends_at_its_stop_string_and_frees_its_slot(setup, free, stops):
    _, model, tokenizer, prompts, _ = setup
    stop = stops["row 0 stops"]
    engine = Engine(model, max_batch_size=2, max_length=32, steps_per_call=8)  # generate_batch's, above
    request = engine.submit(prompts[0], max_new_tokens=MAX_NEW, stop_strings=stop, tokenizer=tokenizer)
    assert request.result() == cut(tokenizer, free[0], stop)
    assert request.finish_reason == "stop" and request.text.text == decode(tokenizer, free[0]).split(stop[0])[0]
    # Decoded: the tokens after the first (the prefill's), and at most the rest of the call that found the stop.
    assert engine.stats["useful_steps"] <= len(request.tokens) - 1 + engine.steps_per_call - 1 < MAX_NEW - 1


def test_a_stop_string_whole_before_an_incomplete_character_ends_at_that_token():
    """A token that ends a stop string and begins a multi-byte character: the stop is found at
    that token, not at the one that completes the character."""

    pieces = {0: b"xa", 1: b"b\xc3", 2: b"\xa9"}  # "xa", "b" and the first byte of "é", its second

    class Bytes:  # a tokenizer whose tokens are byte strings
        def decode(self, tokens, skip_special_tokens=True):
            return b"".join(pieces[t] for t in tokens).decode("utf-8", errors="replace")

    stream = TextStream(Bytes(), ["ab"])
    assert stream.until_stop([0, 1, 2]) == 2 and stream.stopped and stream.text == "x"
    assert TextStream(Bytes(), ["é"]).until_stop([0, 1, 2]) == 3  # a stop string may end in one


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(stop_strings=["ab"]), "stop_strings needs tokenizer="),
        (dict(stop_strings=5, tokenizer="tok"), "stop_strings must be a string or a list of strings"),
        (dict(stop_strings=["ab", 3]), r"stop_strings\[1\] must be a string"),
        (dict(stop_strings=""), "stop_strings is an empty string"),
        (dict(stop_strings=["ab", ""]), r"stop_strings\[1\] is an empty string"),
        (dict(stop_strings=["ab"], tokenizer=object()), "tokenizer must be a tokenizer"),
    ],
)
def test_bad_stop_strings_are_named(setup, kwargs, message):
    _, model, _, prompts, _ = setup
    for call in (model.generate, model.generate_stream, model.generate_batch):
        with pytest.raises(GenerationError, match=message):
            call(prompts, **kwargs)
    engine = Engine(model, max_batch_size=1, max_length=32)
    request = engine.submit(prompts[0], **kwargs)
    assert request.done and message.replace("\\", "") in request.error


def test_the_pipeline_passes_its_own_tokenizer(setup):
    _, model, tokenizer, _, _ = setup
    pipe = ej.pipeline("text-generation", model=model, tokenizer=tokenizer)
    with pytest.raises(PipelineError, match="tokenizer"):
        pipe("Hello", stop_strings=["ab"], tokenizer=tokenizer)
