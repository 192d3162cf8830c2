"""`pipeline("text-generation" | "text-classification", model=...)`, as in transformers.

The tokenizer comes from the model directory through transformers' `AutoTokenizer`. Ettin was
trained with BOS (`[CLS]`, 50281) at the start of every sample, so every prompt is made to
start with it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ettin_jax import compilation, convert, default_model
from ettin_jax.detokenize import TextStream, text_of
from ettin_jax.errors import EttinError
from ettin_jax.generation import GenerationConfig, configure, resolve, tokens_only
from ettin_jax.inputs import check_inputs, describe, flag, integer
from ettin_jax.modeling import ModernBertDecoderForCausalLM, ModernBertDecoderForSequenceClassification
from ettin_jax.padding import left_pad, with_bos

TASKS = ("text-generation", "text-classification")


class PipelineError(EttinError, ValueError):
    """A pipeline argument that cannot work, named in the message."""


class PipelineTypeError(PipelineError, TypeError):
    """A pipeline argument of the wrong type (a number where text belongs): also a `TypeError`."""


ERRORS = (PipelineError, PipelineTypeError)


def texts_of(inputs: Any) -> list[str]:
    """A text or a list of texts as a list, or an error naming the first item that is not a string."""
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, bytes) or not isinstance(inputs, (Sequence, np.ndarray)):
        raise PipelineTypeError(f"inputs must be a string or a list of strings, got {describe(inputs)}")
    for i, text in enumerate(inputs):
        if not isinstance(text, str):
            raise PipelineTypeError(f"inputs[{i}] must be a string, got {describe(text)}")
    return list(inputs)


def _load_tokenizer(directory: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # transformers raises several types for a missing tokenizer
        raise OSError(f"no tokenizer could be loaded from {directory}: {e}") from e


def sample_seed(seed: int, prompt: int, sequence: int, sequences: int) -> int:
    """The seed of the `sequence`-th of `sequences` samples of the `prompt`-th prompt (from 0):
    each sample its own, and the same whichever batch, slot, round or process makes it (the
    engine keys a request's randomness on its seed alone)."""
    return seed + prompt * sequences + sequence


class TextGenerationPipeline:
    def __init__(self, model: ModernBertDecoderForCausalLM, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.bos = model.config.bos_token_id

    def encode(self, text: str) -> list[int]:
        # The tokenizer's own template may append EOS ([SEP]); a prompt must not end with it.
        return with_bos(self.tokenizer(text, add_special_tokens=False)["input_ids"], self.bos)

    def new_tokens(self, row: np.ndarray, stop_strings: Sequence[str] | None = None) -> list[int]:
        """A row of generated ids up to and including the first EOS, or the token that completes
        one of `stop_strings` (the rest is padding)."""
        ids = row.tolist()
        for i, token in enumerate(ids):
            if token in self.model.config.eos_token_ids:
                ids = ids[: i + 1]
                break
        if stop_strings:
            ids = ids[: TextStream(self.tokenizer, stop_strings).until_stop(ids)]
        return ids

    def generation_config(self, generate_kwargs: dict[str, Any]) -> GenerationConfig:
        """`generate`'s arguments as a config, checked; the pipeline returns text, not scores,
        and passes its own tokenizer (for `stop_strings`)."""
        if "tokenizer" in generate_kwargs:
            raise PipelineError("tokenizer: the pipeline reads stop strings with its own; pass it to pipeline()")
        kwargs = dict(generate_kwargs)
        config = configure(kwargs.pop("generation_config", None), **kwargs)
        tokens_only(config, "the text-generation pipeline")
        return config

    def sampling(self, **generate_kwargs: Any) -> tuple[GenerationConfig, int]:
        """`generate`'s arguments as the config of one request (one sequence), and how many
        sequences each prompt asks for (`num_return_sequences`); what every prompt shares is
        checked here, once."""
        config = GenerationConfig().replace(**generate_kwargs)
        resolve(self.model.config, config, 1)
        return config.replace(num_return_sequences=1), config.num_return_sequences

    def record(
        self,
        text: str,
        tokens: Sequence[int],
        *,
        stop_strings: Sequence[str] | None = None,
        return_full_text: bool = True,
        return_tensors: bool = False,
    ) -> dict[str, Any]:
        """One result: {"generated_text": ...}, the text ending before the first of
        `stop_strings` (the tokens end with the one that completed it), and "generated_token_ids"
        with `return_tensors`."""
        completion = text_of(self.tokenizer, tokens, stop_strings or ())
        record: dict[str, Any] = {"generated_text": (text if return_full_text else "") + completion}
        if return_tensors:
            record["generated_token_ids"] = list(tokens)
        return record

    def __call__(
        self,
        inputs: str | Sequence[str],
        *,
        batch_size: int | None = None,
        return_full_text: bool = True,
        return_tensors: bool = False,
        **generate_kwargs: Any,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """A string gives [{"generated_text": ...}] (one per return sequence); a list of
        strings gives one such list per string. `return_tensors=True` adds
        "generated_token_ids", the new tokens (through EOS). With `stop_strings` a text ends
        just before the first stop string in it, and its tokens with the one that completed it.

        A string runs `model.generate`; a list runs the continuous-batching engine
        (`model.generate_batch`) on `batch_size` decode slots (default: what the KV cache's
        memory allows). There each sample is a request of its own, with the seed
        `sample_seed(seed, prompt, sequence, num_return_sequences)`: a prompt's samples do not
        depend on the other prompts in the list."""
        texts = texts_of(inputs)
        options = {
            "return_full_text": flag(return_full_text, "return_full_text", errors=ERRORS),
            "return_tensors": flag(return_tensors, "return_tensors", errors=ERRORS),
        }
        if batch_size is not None:
            integer(batch_size, "batch_size", 1, must="a positive integer", errors=ERRORS)
        config = self.generation_config(generate_kwargs)
        options["stop_strings"] = config.stop_strings
        if isinstance(inputs, str):
            prompt = self.encode(inputs)
            out = self.model.generate([prompt], generation_config=config, tokenizer=self.tokenizer)
            rows = out[:, len(prompt) :]
            return [self.record(inputs, self.new_tokens(row, config.stop_strings), **options) for row in rows]
        if not texts:
            return []
        config, copies = self.sampling(**generate_kwargs)
        prompts = [self.encode(text) for text in texts]
        seeds = [sample_seed(config.seed, i, j, copies) for i in range(len(texts)) for j in range(copies)]
        kwargs = {k: v for k, v in generate_kwargs.items() if k != "num_return_sequences"}
        engine_args = {} if batch_size is None else {"max_batch_size": batch_size}
        tokens = self.model.generate_batch(
            [p for p in prompts for _ in range(copies)], tokenizer=self.tokenizer, **{**kwargs, "seed": seeds},
            **engine_args,
        )  # fmt: skip
        return [
            [self.record(text, tokens[i * copies + j], **options) for j in range(copies)]
            for i, text in enumerate(texts)
        ]

    def stream(self, text: str, **generate_kwargs: Any) -> Iterator[str]:
        """Yields the completion of one prompt piece by piece as tokens are made (never part of
        a character; with `stop_strings`, ending just before the first one); the arguments are
        checked at the call."""
        if not isinstance(text, str):
            raise PipelineTypeError(f"text must be a string, got {describe(text)}")
        config = self.generation_config(generate_kwargs)
        steps = self.model.generate_stream([self.encode(text)], generation_config=config, tokenizer=self.tokenizer)
        return self._pieces(steps, TextStream(self.tokenizer, config.stop_strings or ()))

    def _pieces(self, steps: Iterator[np.ndarray], text_stream: TextStream) -> Iterator[str]:
        for step in steps:
            token = int(step[0])
            if token in self.model.config.eos_token_ids:
                break
            piece = text_stream.add([token])
            if piece:
                yield piece
            if text_stream.stopped:
                return
        rest = text_stream.finish()
        if rest:
            yield rest


@functools.partial(compilation.jit, static_argnames=("graphdef", "sigmoid"))
def _probabilities(graphdef: Any, state: Any, ids: Any, mask: Any, *, sigmoid: bool) -> jax.Array:
    logits = nnx.merge(graphdef, state)(ids, attention_mask=mask).logits.astype(jnp.float32)
    return jax.nn.sigmoid(logits) if sigmoid else jax.nn.softmax(logits, axis=-1)


class TextClassificationPipeline:
    def __init__(self, model: ModernBertDecoderForSequenceClassification, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.bos = model.config.bos_token_id
        self.pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(N, L) probabilities: sigmoid for multi-label or single-output models, else softmax.
        Rows are left-padded to a bucketed width and the batch to a bucketed size, so texts of
        any length reuse a few compiled programs."""
        config = self.model.config
        rows = [with_bos(self.tokenizer(t)["input_ids"], self.bos) for t in texts]
        padded = left_pad(rows, self.pad, max_width=config.max_position_embeddings)
        ids, mask = padded.ids, padded.mask.astype(np.int32)
        ids[len(rows) :], mask[len(rows) :] = ids[0], mask[0]  # filler rows, dropped below
        check_inputs(config, ids, mask, None, None)  # token ids and length, which jit cannot check
        sigmoid = config.problem_type == "multi_label_classification" or config.num_labels == 1
        graphdef, state = nnx.split(self.model)
        return np.asarray(_probabilities(graphdef, state, ids, mask, sigmoid=sigmoid))[: len(rows)]

    def __call__(self, inputs: str | Sequence[str], *, batch_size: int = 16) -> list[dict[str, Any]]:
        """[{"label": ..., "score": ...}], one per input: the most likely label."""
        texts = texts_of(inputs)
        integer(batch_size, "batch_size", 1, must="a positive integer", errors=ERRORS)
        labels = self.model.config.id2label
        out = []
        for start in range(0, len(texts), batch_size):
            for probs in self.scores(texts[start : start + batch_size]):
                best = int(np.argmax(probs))
                out.append({"label": labels[best], "score": float(probs[best])})
        return out


def pipeline(
    task: str,
    model: str | os.PathLike | Any | None = None,
    *,
    tokenizer: Any = None,
    dtype: Any = jnp.float32,
    **kwargs: Any,
) -> TextGenerationPipeline | TextClassificationPipeline:
    """`model`: a directory, a Hub id, a loaded ettin-jax model (then pass `tokenizer`), or None
    for the embedded default (see `ettin_jax.default_model`). Extra keyword arguments go to
    `from_pretrained` (e.g. `num_labels`)."""
    if task not in TASKS:
        raise PipelineError(f"unknown task {task!r}; ettin-jax pipelines: {', '.join(TASKS)}")
    cls = ModernBertDecoderForCausalLM if task == "text-generation" else ModernBertDecoderForSequenceClassification
    if model is None or isinstance(model, (str, os.PathLike)):
        directory = default_model.path() if model is None else convert.resolve(model, kwargs.pop("revision", None))
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(directory)
        model = cls.from_pretrained(directory, dtype=dtype, param_dtype=dtype, **kwargs)
    elif not isinstance(model, cls):
        raise PipelineTypeError(f"task {task!r} needs a {cls.__name__}, got {type(model).__name__}")
    if tokenizer is None:
        raise PipelineError("pass tokenizer= with a loaded model")
    if task == "text-generation":
        return TextGenerationPipeline(model, tokenizer)
    return TextClassificationPipeline(model, tokenizer)
