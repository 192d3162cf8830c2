"""lm-evaluation-harness on ettin-jax: `EttinLM`, a model class of the harness (registered as
"ettin-jax"), and `evaluate`, what `ettin-jax eval` runs.

    import lm_eval
    from ettin_jax.harness import EttinLM

    results = lm_eval.simple_evaluate(model=EttinLM("jhu-clsp/ettin-decoder-150m", add_bos_token=True),
                                      tasks=["arc_easy"])

`EttinLM` scores as the harness's own `hf` backend does, so that a converted checkpoint scores
what its transformers original scores: the same tokenization (it derives from the harness's
`TemplateLM`, which splits each (context, continuation) pair), `add_bos_token` and
`prefix_token_id` as `hf` reads them, contexts truncated from the left to `max_length`, and
generations cut at the first stop string. The work runs here:
- `loglikelihood` and `loglikelihood_rolling`: `ettin_jax.scoring`, requests sorted by length
  into bucketed batches, logits only where a continuation is scored;
- `generate_until`: the continuous-batching engine (`generate_batch`), each request stopping
  at its own stop string, EOS or `max_gen_toks`.

Needs lm-eval (`pip install "ettin-jax[eval]"`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from ettin_jax import convert, default_model, scoring
from ettin_jax.errors import EttinError
from ettin_jax.modeling import ModernBertDecoderForCausalLM

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for `generate_until`
_SAMPLING = {"do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty"}  # of GenerationConfig


class HarnessError(EttinError, ValueError):
    """An argument of the harness's model, or a request it cannot run, named in the message."""


@register_model("ettin-jax")
class EttinLM(TemplateLM):
    """A causal LM for lm-evaluation-harness. `pretrained`: a directory or Hub id (default: the
    embedded model), or pass a loaded `model` with its `tokenizer`.

    `add_bos_token` and `prefix_token_id` mean what they mean to the harness's `hf` backend
    (None: the tokenizer's own special tokens; the Ettin paper evaluated with
    `add_bos_token=True`). `batch_size`: requests per batch when given (a batch takes all the
    requests of a shared context, so it may hold more), else as many as `max_batch_tokens` tokens
    hold ("auto" too; `max_batch_size`, the cap of the harness's own search, is not needed); for
    `generate_until`, decode slots. `max_length`: the most tokens a request reads (default: the
    model's context). `seed`: a sampled `generate_until` request draws with seed + its index.
    Further keyword arguments (`dtype`, `quantization`, `mesh`, ...) go to `from_pretrained`."""

    def __init__(
        self,
        pretrained: str | os.PathLike | None = None,
        *,
        model: ModernBertDecoderForCausalLM | None = None,
        tokenizer: Any = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        max_batch_tokens: int = scoring.LOGLIKELIHOOD_BATCH_TOKENS,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        device: str | None = None,
        seed: int = 0,
        dtype: str = "float32",
        **from_pretrained: Any,
    ):
        super().__init__()
        if device not in (None, "cpu", "cuda", "tpu"):
            log.warning("device=%r is ignored: JAX places the model on its default devices", device)
        if model is None:
            directory = default_model.path() if pretrained is None else convert.resolve(pretrained)
            model = ModernBertDecoderForCausalLM.from_pretrained(
                directory, dtype=dtype, param_dtype=dtype, **from_pretrained
            )
            if tokenizer is None:
                from transformers import AutoTokenizer

                # As `hf` loads it: add_bos_token=True makes the tokenizer's special tokens BOS
                # alone (Ettin's own template also appends [SEP]).
                kwargs = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
                tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        elif not isinstance(model, ModernBertDecoderForCausalLM):
            raise HarnessError(f"model must be a ModernBertDecoderForCausalLM, got {type(model).__name__}")
        if tokenizer is None:
            raise HarnessError("pass tokenizer= with a loaded model")
        self.model, self.tokenizer = model, tokenizer
        context = model.config.max_position_embeddings
        self.max_length = context if max_length is None else int(max_length)
        if not 1 <= self.max_length <= context:
            raise HarnessError(f"max_length must be in [1, {context}] (the model's context), got {max_length}")
        self.max_gen_toks = int(max_gen_toks)
        # "auto" and "auto:N" (the harness's batch-size search; `max_batch_size` caps it): the
        # token budget decides instead.
        auto = batch_size is None or str(batch_size).startswith("auto")
        if not auto and not (str(batch_size).isdigit() and int(batch_size) >= 1):
            raise HarnessError(f"batch_size must be a whole number >= 1 or auto, got {batch_size!r}")
        self.batch_size = None if auto else int(batch_size)
        if not (str(max_batch_tokens).isdigit() and int(max_batch_tokens) >= 1):
            raise HarnessError(f"max_batch_tokens must be a whole number >= 1, got {max_batch_tokens!r}")
        self.max_batch_tokens = int(max_batch_tokens)
        self.seed = int(seed)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id

    # ---- what the harness asks of a TemplateLM ----------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context, and a document's first window, is conditioned on: BOS, else EOS."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def _special_tokens(self, string: str, add_special_tokens: bool | None) -> dict[str, bool]:
        """The tokenizer's `add_special_tokens` for `string`, as the `hf` backend chooses it: as
        asked, else `add_bos_token`, else the tokenizer's default; never for a string that
        already starts with the prefix token's text."""
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            return {"add_special_tokens": False}
        chosen = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        return {} if chosen is None else {"add_special_tokens": chosen}

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs: Any
    ) -> list[int]:
        ids = self.tokenizer.encode(string, **self._special_tokens(string, add_special_tokens))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _loglikelihood_tokens(
        self, requests: Sequence[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False, **_
    ) -> list[tuple[float, bool]]:
        results = scoring.loglikelihood(
            self.model, [(context, continuation) for _, context, continuation in requests],
            max_length=self.max_length, max_batch_tokens=self.max_batch_tokens, batch_size=self.batch_size,
        )  # fmt: skip
        for (strings, _, _), answer in zip(requests, results, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        strings = [request.args[0] for request in requests]
        totals = scoring.loglikelihood_rolling(
            self.model, [self.tok_encode(s) for s in strings], self.prefix_token_id,
            max_length=self.max_length, max_batch_tokens=self.max_batch_tokens, batch_size=self.batch_size,
        )  # fmt: skip
        for string, total in zip(strings, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Each request's generation, its text cut before the first of its stop strings
        (`until`, plus EOS's text). Requests that share generation arguments run together on
        the engine, each stopping on its own."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        results: list[str] = [""] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if not 0 < max_gen_toks < self.max_length:
                raise HarnessError(f"max_gen_toks {max_gen_toks} must be in [1, max_length {self.max_length})")
            prompts = [self._context(requests[i].args[0], self.max_length - max_gen_toks) for i in indices]
            engine = {"max_batch_size": self.batch_size} if self.batch_size else {}
            sampling = self._sampling(kwargs)
            if sampling.get("do_sample"):
                sampling["seed"] = [self.seed + i for i in indices]
            tokens = self.model.generate_batch(
                prompts, max_new_tokens=max_gen_toks, stop_strings=[s for s in until if s], tokenizer=self.tokenizer,
                **sampling, **engine,
            )  # fmt: skip
            for i, new in zip(indices, tokens, strict=True):
                text = postprocess_generated_text(self.tokenizer.decode(new, skip_special_tokens=True), until, None)
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _context(self, string: str, keep: int) -> list[int]:
        """A prompt's tokens, its last `keep` (the room left for the generation); the prefix
        token for an empty one."""
        return self.tok_encode(string, left_truncate_len=keep) or [self.prefix_token_id]

    @staticmethod
    def _sampling(kwargs: dict[str, Any]) -> dict[str, Any]:
        """The harness's generation arguments as `generate`'s: greedy unless `do_sample` with a
        temperature > 0 (`hf` sets a missing temperature to 0), `max_length` dropped (the
        prompt's and the generation's lengths decide it, as under `hf`), and an error naming
        any other argument that is not a sampling setting."""
        kwargs = dict(kwargs)
        if kwargs.pop("max_length", None) is not None:
            log.warning("max_length in the generation arguments is ignored: use max_gen_toks")
        unknown = sorted(set(kwargs) - _SAMPLING)
        if unknown:
            raise HarnessError(
                f"unknown generation argument(s) {', '.join(unknown)}; ettin-jax takes {sorted(_SAMPLING)}"
            )
        if not kwargs.get("do_sample") or not kwargs.get("temperature", 0.0):
            return {k: v for k, v in kwargs.items() if k not in ("do_sample", "temperature")}
        return kwargs
