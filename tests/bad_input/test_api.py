"""Hostile input to the public Python API: the model's forward, `generate`, `generate_stream`,
`generate_batch`, the engine's `submit` and constructor, and the pipelines. Each bad argument is
an `EttinError` (also the `ValueError`, or for a wrong type the `TypeError`, it always was)
whose message names the argument, and for a token id its row and position; none is a silent
wrong answer (a float id truncated, an int64 id wrapped to int32) or an exception from inside
JAX. Every check runs before any program compiles, so the bad cases cost no compilation; a few
valid edge cases (numpy ints, tuples, bool masks, max_new_tokens=0) show the checks are not
too strict."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, torch_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from textdata import word_tokenizer

import ettin_jax as ej
from ettin_jax.engine import Engine
from ettin_jax.generation import GenerationError, GenerationTypeError
from ettin_jax.inputs import InputError, InputTypeError
from ettin_jax.pipelines import PipelineError, PipelineTypeError

VOCAB = TINY["vocab_size"]  # 128
NAN, INF = float("nan"), float("inf")
HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("causal")
    torch_model("causal").save_pretrained(directory)
    return ej.ModernBertDecoderForCausalLM.from_pretrained(directory)


@pytest.fixture(scope="module")
def classifier():
    return ej.ModernBertDecoderForSequenceClassification(ej.ModernBertDecoderConfig(**TINY))


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, max_batch_size=2, max_length=64)


def test_error_types_are_ettin_errors_and_the_builtin_ones():
    for kind in (InputTypeError, GenerationTypeError, PipelineTypeError):
        assert issubclass(kind, ej.EttinError) and issubclass(kind, TypeError) and issubclass(kind, ValueError)
    for kind in (InputError, GenerationError, PipelineError):
        assert issubclass(kind, ej.EttinError) and issubclass(kind, ValueError)


# ---- the five found today ------------------------------------------------------------------------
def test_a_negative_max_new_tokens_is_blamed_on_max_new_tokens(model):
    for call in (
        lambda: model.generate([[5, 6]], max_new_tokens=-1),
        lambda: model.generate([[5, 6]], max_new_tokens=-1, max_length=10),
        lambda: model.generate_batch([[5, 6]], max_new_tokens=-1),
    ):
        with pytest.raises(GenerationError, match="max_new_tokens must be an integer >= 0, got -1") as e:
            call()
        assert "max_length" not in str(e.value)


def test_generate_of_an_empty_list_says_it_is_empty(model):
    with pytest.raises(GenerationError, match="input_ids is empty: no prompts given") as e:
        model.generate([])
    assert "float64" not in str(e.value)


def test_a_string_seed_is_named(model):
    with pytest.raises(GenerationTypeError, match=r"seed must be an integer, got 'abc' \(str\)"):
        model.generate([[5, 6]], seed="abc", do_sample=True)
    with pytest.raises(GenerationTypeError, match=r"request 0: seed must be an integer, got 'abc'"):
        model.generate_batch([[5, 6]], seed="abc", do_sample=True)


@pytest.mark.parametrize("token", [3.0, 3.5, np.float32(3.0)])
def test_float_token_ids_in_a_list_are_refused_at_their_place(model, token):
    with pytest.raises(
        GenerationTypeError, match=r"input_ids\[1\]\[2\] must be an integer token id, got (np\.float32\()?3\.[05]"
    ):
        model.generate([[5, 6], [7, 8, token]])
    with pytest.raises(GenerationTypeError, match=r"request 1: inputs\[1\]\[0\] must be an integer token id"):
        model.generate_batch([[5], [token]])
    with pytest.raises(InputTypeError, match=r"input_ids\[0, 1\] must be an integer, got (np\.float32\()?3\.[05]"):
        model([[5, token]])


def test_an_eos_token_id_outside_the_vocabulary_is_refused_everywhere(model, engine):
    message = rf"eos_token_id {VOCAB} is outside the vocabulary \[0, {VOCAB}\)"
    with pytest.raises(GenerationError, match=message):
        model.generate([[5, 6]], eos_token_id=VOCAB)
    with pytest.raises(GenerationError, match=message):
        model.generate_stream([[5, 6]], eos_token_id=[2, VOCAB])  # at the call, not at the first token
    with pytest.raises(GenerationError, match="request 0: " + message):
        model.generate_batch([[5, 6]], eos_token_id=VOCAB)
    with pytest.raises(GenerationError, match=message):
        engine.submit([5, 6], eos_token_id=VOCAB).result()


# ---- the model's forward ---------------------------------------------------------------------------
FORWARD = {
    "float id 3.0 in a list": (dict(input_ids=[[5, 3.0]]), InputTypeError, r"input_ids\[0, 1\] must be an integer"),
    "bool id in a list": (dict(input_ids=[[5, 6], [True, 7]]), InputTypeError, r"input_ids\[1, 0\] .*True \(bool\)"),
    "string id": (dict(input_ids=[["a", 5]]), InputTypeError, r"input_ids\[0, 0\] must be an integer, got 'a'"),
    "None id": (dict(input_ids=[[5, None]]), InputTypeError, r"input_ids\[0, 1\] must be an integer, got None"),
    "float array": (dict(input_ids=np.ones((1, 3), np.float32)), InputTypeError, "input_ids must hold integers"),
    "bool array": (dict(input_ids=np.ones((1, 3), bool)), InputTypeError, "input_ids must hold integers, got bool"),
    "string array": (dict(input_ids=np.array([["5"]])), InputTypeError, "input_ids must hold integers, got <U1"),
    "int64 id that int32 would wrap": (
        dict(input_ids=np.array([[5, 2**33 + 5]])), InputError, r"input_ids\[0, 1\] = 8589934597 is outside"),
    "id beyond 64 bits": (dict(input_ids=[[5, 2**70]]), InputError, "input_ids holds an integer beyond 64 bits"),
    "negative id": (dict(input_ids=[[5, -1]]), InputError, r"input_ids\[0, 1\] = -1 is outside the vocabulary"),
    "empty batch": (dict(input_ids=np.zeros((0, 3), np.int32)), InputError, r"batch is empty: input_ids .*\(0, 3\)"),
    "empty rows": (dict(input_ids=[[]]), InputError, "input sequence is empty"),
    "3-D ids": (dict(input_ids=np.ones((1, 2, 3), np.int32)), InputError, r"input_ids must have shape \(batch"),
    "mask value 2": (dict(input_ids=[[5, 6]], attention_mask=[[2, 1]]), InputError, r"attention_mask\[0, 0\] = 2"),
    "mask NaN": (dict(input_ids=[[5, 6]], attention_mask=[[1.0, NAN]]), InputError, r"attention_mask\[0, 1\] = nan"),
    "mask string": (dict(input_ids=[[5, 6]], attention_mask=[["1", 1]]), InputTypeError, r"attention_mask\[0, 0\]"),
    "mask shape": (dict(input_ids=[[5, 6]], attention_mask=[[1, 1, 1]]), InputError, "attention_mask has shape"),
    "float positions": (dict(input_ids=[[5, 6]], position_ids=[[0.5, 1]]), InputTypeError, r"position_ids\[0, 0\]"),
    "negative position": (dict(input_ids=[[5, 6]], position_ids=[[-1, 0]]), InputError, "position_ids must lie in"),
    "position shape": (dict(input_ids=[[5, 6]], position_ids=[[0, 1, 2]]), InputError, "position_ids has shape"),
    "negative segment": (dict(input_ids=[[5, 6]], segment_ids=[[0, -1]]), InputError, "segment_ids must lie in"),
    "embeds NaN": (
        dict(inputs_embeds=np.where(np.arange(64) == 2, NAN, 0.0).reshape(1, 1, 64).repeat(2, 1)),
        InputError, r"inputs_embeds\[0, 0, 2\] is nan"),
    "embeds inf": (dict(inputs_embeds=jnp.full((1, 2, 64), INF)), InputError, r"inputs_embeds\[0, 0, 0\] is inf"),
    "int embeds": (dict(inputs_embeds=np.ones((1, 2, 64), np.int32)), InputTypeError, "inputs_embeds must hold float"),
    "neither ids nor embeds": (dict(), InputError, "exactly one of input_ids and inputs_embeds"),
    "logits_to_keep string": (dict(input_ids=[[5, 6]], logits_to_keep="1"), InputError, "logits_to_keep must be"),
    "logits_to_keep negative": (dict(input_ids=[[5, 6]], logits_to_keep=-1), InputError, "logits_to_keep must be"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FORWARD))
def test_bad_forward_inputs_are_named(model, case):
    kwargs, error, message = FORWARD[case]
    with pytest.raises(error, match=message):
        model(**kwargs)


@pytest.mark.parametrize(
    ("labels", "message"),
    [(np.array([[5.0, 6.0]]), "labels must be integers"), ([[5, 500]], "label 500 is not a valid token id")],
)
def test_bad_labels_are_named(model, labels, message):
    with pytest.raises(InputError, match=message):
        model([[5, 6]], labels=labels)


def test_a_ragged_batch_is_named(classifier):
    with pytest.raises(InputError, match="input_ids is not a rectangular array"):
        classifier([[5, 6], [7]])


@HYPOTHESIS
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1).filter(lambda t: not 0 <= t < VOCAB))
def test_any_id_outside_the_vocabulary_is_refused_with_its_place(model, token):
    with pytest.raises(InputError, match=rf"input_ids\[0, 1\] = {token} is outside the vocabulary"):
        model([[5, token]])
    with pytest.raises(GenerationError, match=rf"token id {token} outside the vocabulary .* input_ids\[0\]\[1\]"):
        model.generate([[5, token]])


@HYPOTHESIS
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_any_float_among_token_ids_is_refused_with_its_place(model, token):
    with pytest.raises(GenerationTypeError, match=r"input_ids\[0\]\[1\] must be an integer token id"):
        model.generate([[5, token]])


# ---- generate -------------------------------------------------------------------------------------
T, V = GenerationTypeError, GenerationError
GENERATE = {
    "max_new_tokens float": (dict(max_new_tokens=2.0), T, r"max_new_tokens must be an integer >= 0, got 2\.0"),
    "max_new_tokens string": (dict(max_new_tokens="5"), T, "max_new_tokens must be an integer"),
    "max_new_tokens bool": (dict(max_new_tokens=True), T, r"max_new_tokens .*True \(bool\)"),
    "max_new_tokens beyond int32": (dict(max_new_tokens=2**40), V, "max_new_tokens 1099511627776 is out of range"),
    "min_new_tokens negative": (dict(min_new_tokens=-1), V, "min_new_tokens must be an integer >= 0"),
    "min above max": (dict(min_new_tokens=5, max_new_tokens=2), V, "min_new_tokens=5 exceeds max_new_tokens=2"),
    "min above the default": (dict(min_new_tokens=50), V, r"min_new_tokens=50 exceeds max_new_tokens=20 \(the def"),
    "max_length zero": (dict(max_length=0), V, "max_length must be an integer >= 1"),
    "max_length float": (dict(max_length=9.5), T, "max_length must be an integer"),
    "empty array": (dict(input_ids=np.zeros((0, 3), np.int64)), V, "input_ids is empty"),
    "empty prompt": (dict(input_ids=[[5], []]), V, r"prompt 1 is empty \(input_ids\[1\]\)"),
    "text": (dict(input_ids="hello"), T, "input_ids must be token ids"),
    "None": (dict(input_ids=None), T, "input_ids must be token ids"),
    "bool id": (dict(input_ids=[[5, True]]), T, r"input_ids\[0\]\[1\] must be an integer token id, got True"),
    "string id": (dict(input_ids=[[5, "6"]]), T, r"input_ids\[0\]\[1\] must be an integer token id, got '6'"),
    "flat list with a float": (dict(input_ids=[5, 6.5]), T, r"input_ids\[1\] must be an integer token id"),
    "rows and ids mixed": (dict(input_ids=[[5, 6], 7]), T, r"input_ids\[1\] must be a list of token ids"),
    "float array": (dict(input_ids=np.array([[5.0, 6.0]])), T, "input_ids must hold integers, got float64"),
    "id outside the vocabulary": (dict(input_ids=[[5, 999]]), V, r"token id 999 outside .* at input_ids\[0\]\[1\]"),
    "mask value 2": (dict(input_ids=np.array([[5, 6]]), attention_mask=[[1, 2]]), V, r"attention_mask\[0, 1\] = 2"),
    "mask shape": (dict(input_ids=np.array([[5, 6]]), attention_mask=[[1]]), V, "attention_mask has shape"),
    "mask with lists": (dict(input_ids=[[5, 6]], attention_mask=[[1, 1]]), V, "attention_mask only with a 2-D"),
    "eos float": (dict(eos_token_id=2.0), T, "eos_token_id must be a token id or a list of them, got 2.0"),
    "eos string": (dict(eos_token_id="2"), T, "eos_token_id must be a token id or a list"),
    "eos list with a float": (dict(eos_token_id=[2, 2.5]), T, r"eos_token_id\[1\] must be an integer token id"),
    "eos negative": (dict(eos_token_id=[2, -1]), V, r"eos_token_id -1 is outside .* \(eos_token_id\[1\]\)"),
    "pad string": (dict(pad_token_id="x"), T, "pad_token_id must be an integer, got 'x'"),
    "pad beyond int32": (dict(pad_token_id=2**40), V, "pad_token_id 1099511627776 is out of range"),
    "seed float": (dict(seed=1.5), T, r"seed must be an integer, got 1\.5"),
    "seed None": (dict(seed=None), T, "seed must be an integer, got None"),
    "seed beyond 64 bits": (dict(seed=2**64), V, "seed 18446744073709551616 is out of range"),
    "do_sample string": (dict(do_sample="no"), T, "do_sample must be True or False, got 'no'"),
    "temperature string": (dict(temperature="hot"), T, "temperature must be a number >= 0, got 'hot'"),
    "top_k negative": (dict(do_sample=True, top_k=-1), V, "top_k must be a non-negative integer, got -1"),
    "top_k float": (dict(do_sample=True, top_k=2.5), T, "top_k must be a non-negative integer, got 2.5"),
    "top_k beyond int32": (dict(do_sample=True, top_k=2**40), V, "top_k 1099511627776 is out of range"),
    "top_p string": (dict(do_sample=True, top_p="x"), T, r"top_p must be a number in \(0, 1\]"),
    "min_p above 1": (dict(do_sample=True, min_p=1.1), V, r"min_p must be in \[0, 1\], got 1\.1"),
    "min_p NaN": (dict(do_sample=True, min_p=NAN), V, r"min_p must be a finite number in \[0, 1\]"),
    "num_return_sequences 0": (dict(num_return_sequences=0), V, "num_return_sequences must be a positive integer"),
    "num_return_sequences bool": (dict(num_return_sequences=True), T, "num_return_sequences must be a positive"),
    "num_return_sequences float": (dict(num_return_sequences=2.0), T, "num_return_sequences must be a positive"),
    "copies when greedy": (dict(num_return_sequences=2), V, "pass do_sample=True"),
    "generation_config a dict": (dict(generation_config={"max_new_tokens": 3}), T, "generation_config must be a"),
    "unknown argument": (dict(max_new_token=3), V, r"unknown argument\(s\) max_new_token"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(GENERATE))
def test_bad_generate_arguments_are_named(model, case):
    kwargs, error, message = GENERATE[case]
    kwargs = {"input_ids": [[5, 6, 7]], **kwargs}
    with pytest.raises(error, match=message):
        model.generate(**kwargs)
    with pytest.raises(error, match=message):  # checked at the call, before the first token
        model.generate_stream(**kwargs)


non_finite = st.sampled_from([NAN, INF, -INF, 1e39, -1e39])  # 1e39: finite, but not in float32


@HYPOTHESIS
@given(st.one_of(st.floats(max_value=0.0, exclude_max=True), non_finite), st.booleans())
def test_any_negative_or_non_finite_temperature_is_refused(model, temperature, sample):
    with pytest.raises(GenerationError, match="temperature must be"):
        model.generate([[5, 6]], do_sample=sample, temperature=temperature)


@HYPOTHESIS
@given(st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), non_finite))
def test_any_top_p_outside_0_1_is_refused(model, top_p):
    with pytest.raises(GenerationError, match=r"top_p must be .*in \(0, 1\]"):
        model.generate([[5, 6]], do_sample=True, top_p=top_p)


@HYPOTHESIS
@given(st.one_of(st.floats(max_value=0.0), non_finite))
def test_any_repetition_penalty_not_above_0_is_refused(model, penalty):
    with pytest.raises(GenerationError, match=r"repetition_penalty must be .*> 0"):
        model.generate([[5, 6]], repetition_penalty=penalty)


@HYPOTHESIS
@given(st.integers(max_value=-1))
def test_any_negative_max_new_tokens_is_refused(model, count):
    with pytest.raises(GenerationError, match="max_new_tokens") as e:
        model.generate([[5, 6]], max_new_tokens=count)
    assert "max_length" not in str(e.value)


# ---- generate_batch and the engine ------------------------------------------------------------
BATCH = {
    "no prompts": ([], {}, V, "inputs is empty: no prompts given"),
    "text": ("hello", {}, T, "inputs must be a list of prompts"),
    "a number as a prompt": ([[5], 7], {}, T, r"request 1: inputs\[1\] must be a list of integer token ids"),
    "id outside the vocabulary": (
        [[5, 6], [1, 5000]], {}, V, r"request 1: the prompt has token id 5000 outside .* inputs\[1\]\[1\]"),
    "one bad max_new_tokens": ([[5], [6]], dict(max_new_tokens=[3, -1]), V, "request 1: max_new_tokens must be"),
    "values for too few requests": ([[5], [6]], dict(seed=[1]), V, "seed has 1 values for 2 requests"),
    "NaN temperature for one": (
        [[5], [6]], dict(do_sample=True, temperature=[1.0, NAN]), V, "request 1: temperature must be a finite"),
    "too many stop ids": ([[5]], dict(eos_token_id=list(range(3, 12))), V, "eos_token_id has 9 ids; at most 8"),
    "no slots": ([[5]], dict(max_batch_size=0), V, "max_batch_size must be a positive integer, got 0"),
    "fractional slots": ([[5]], dict(max_batch_size=2.5), T, "max_batch_size must be a positive integer, got 2.5"),
    "bool steps_per_call": ([[5]], dict(steps_per_call=True), T, "steps_per_call must be a positive integer"),
    "engine max_length 0": ([[5]], dict(max_length=0), V, r"max_length must be an integer in \[1, 128\]"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BATCH))
def test_bad_generate_batch_arguments_are_named(model, case):
    inputs, kwargs, error, message = BATCH[case]
    with pytest.raises(error, match=message):
        model.generate_batch(inputs, **kwargs)


SUBMIT = {
    "float id": ([5, 6.0], {}, r"prompt\[1\] must be an integer token id, got 6\.0"),
    "text": ("abc", {}, "prompt must be a list of integer token ids, got 'abc'"),
    "empty": ([], {}, "the prompt is empty"),
    "bool logprobs": ([5], dict(logprobs=True), r"logprobs must be an integer in \[0, 20\], got True"),
    "string top_k": ([5], dict(do_sample=True, top_k="3"), "top_k must be a non-negative integer, got '3'"),
}


@pytest.mark.parametrize("case", list(SUBMIT))
def test_a_bad_submission_ends_with_its_error(engine, case):
    prompt, kwargs, message = SUBMIT[case]
    request = engine.submit(prompt, **kwargs)
    assert request.done
    with pytest.raises(GenerationError, match=message):
        request.result()


def test_an_update_callback_that_cannot_be_called_is_refused_at_submit(engine):
    with pytest.raises(GenerationTypeError, match="on_update must be a function or None, got 5"):
        engine.submit([5], on_update=5)


# ---- pipelines --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generator(model, tokenizer):
    return ej.pipeline("text-generation", model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def labeller(classifier, tokenizer):
    return ej.pipeline("text-classification", model=classifier, tokenizer=tokenizer)


GENERATOR = {
    "a number": (5, {}, PipelineTypeError, "inputs must be a string or a list of strings, got 5"),
    "a number in the list": (["w1", 5], {}, PipelineTypeError, r"inputs\[1\] must be a string, got 5"),
    "negative max_new_tokens": ("w1", dict(max_new_tokens=-1), V, "max_new_tokens must be an integer >= 0"),
    "negative max_new_tokens, list": (["w1", "w2"], dict(max_new_tokens=-1), V, "max_new_tokens must be an integer"),
    "string seed, list": (["w1"], dict(seed="abc", do_sample=True), T, "seed must be an integer, got 'abc'"),
    "zero batch_size": (["w1"], dict(batch_size=0), PipelineError, "batch_size must be a positive integer, got 0"),
    "string return_full_text": ("w1", dict(return_full_text="no"), PipelineTypeError, "return_full_text must be"),
    "negative temperature": ("w1", dict(do_sample=True, temperature=-1), V, "temperature must be > 0 when sampling"),
    "no copies": (["w1"], dict(num_return_sequences=0), V, "num_return_sequences must be a positive integer"),
    "top_p 2 in a stream": (None, dict(top_p=2.0, do_sample=True), V, r"top_p must be in \(0, 1\], got 2\.0"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(GENERATOR))
def test_bad_text_generation_arguments_are_named(generator, case):
    inputs, kwargs, error, message = GENERATOR[case]
    with pytest.raises(error, match=message):
        if inputs is None:
            generator.stream("w1", **kwargs)  # checked at the call
        else:
            generator(inputs, **kwargs)


def test_a_stream_of_a_number_is_named(generator):
    with pytest.raises(PipelineTypeError, match="text must be a string, got 5"):
        generator.stream(5)


@pytest.mark.parametrize(
    ("inputs", "batch_size", "error", "message"),
    [
        (5, 16, PipelineTypeError, "inputs must be a string or a list of strings"),
        (["w1", None], 16, PipelineTypeError, r"inputs\[1\] must be a string, got None"),
        ("w1", 0, PipelineError, "batch_size must be a positive integer, got 0"),
        ("w1", -1, PipelineError, "batch_size must be a positive integer, got -1"),
        ("w1", 1.5, PipelineTypeError, "batch_size must be a positive integer, got 1.5"),
    ],
)
def test_bad_text_classification_arguments_are_named(labeller, inputs, batch_size, error, message):
    with pytest.raises(error, match=message):
        labeller(inputs, batch_size=batch_size)


def test_bad_pipeline_construction_is_named(model, tokenizer):
    with pytest.raises(PipelineError, match="unknown task 'summarization'"):
        ej.pipeline("summarization")
    with pytest.raises(PipelineError, match="pass tokenizer= with a loaded model"):
        ej.pipeline("text-generation", model=model)
    with pytest.raises(PipelineTypeError, match="needs a ModernBertDecoderForSequenceClassification"):
        ej.pipeline("text-classification", model=model, tokenizer=tokenizer)


# ---- valid edge cases still work ---------------------------------------------------------------
def test_numpy_ints_tuples_and_jax_arrays_are_token_ids(model):
    expected = model.generate([[5, 6, 7]], max_new_tokens=3)
    for ids in (
        np.array([[5, 6, 7]], np.int64),
        np.array([5, 6, 7], np.uint8),  # 1-D: one prompt
        jnp.array([[5, 6, 7]]),
        [(5, 6, 7)],
        [[np.int64(5), np.int32(6), 7]],
        [np.array([5, 6, 7])],
    ):
        np.testing.assert_array_equal(model.generate(ids, max_new_tokens=np.int64(3)), expected)
    padded = model.generate(np.array([[0, 5, 6, 7]]), attention_mask=np.array([[False, True, True, True]]),
                            max_new_tokens=3)  # fmt: skip
    np.testing.assert_array_equal(padded, expected)
    assert model.generate([[5, 6, 7]], max_new_tokens=0).shape == (1, 3)


def test_numpy_scalars_are_generation_arguments_and_become_python_ones():
    config = ej.GenerationConfig(
        do_sample=np.bool_(True), temperature=np.float32(0.5), top_k=np.int64(5), top_p=1, min_p=0,
        repetition_penalty=np.float64(1.2), seed=np.int64(-3), eos_token_id=np.array([2, 3]), max_new_tokens=np.int32(4),
    )  # fmt: skip
    assert type(config.do_sample) is bool and type(config.top_k) is int and type(config.seed) is int
    assert type(config.temperature) is float and config.eos_token_id == [2, 3]
    greedy = ej.GenerationConfig(temperature=0, pad_token_id=VOCAB + 872)  # 0: unused when greedy; any int32 pad
    assert greedy.temperature == 0.0 and greedy.pad_token_id == VOCAB + 872


def test_valid_forward_inputs_of_several_types(model):
    expected = np.asarray(model(np.array([[5, 6]], np.int32)).logits)
    for kwargs in (
        dict(input_ids=[[5, 6]]),
        dict(input_ids=np.array([[5, 6]], np.uint64)),
        dict(input_ids=[[np.int64(5), 6]], attention_mask=[[True, 1]], position_ids=[[0, 1]]),
        dict(input_ids=jnp.array([[5, 6]]), attention_mask=np.ones((1, 2), np.float32)),
    ):
        np.testing.assert_allclose(np.asarray(model(**kwargs).logits), expected, atol=1e-6)


def test_a_valid_submission_of_numpy_ids_with_no_new_tokens_ends_at_once(engine):
    request = engine.submit(np.array([5, 6]), max_new_tokens=0, logprobs=np.int64(2), do_sample=True, seed=-1)
    assert request.done and request.error is None and request.finish_reason == "length"
    assert math.isclose(request.config.temperature, 1.0)
