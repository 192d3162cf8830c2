"""The perplexity of texts (`ettin-jax perplexity`): a quick number that needs no harness.

Each text is scored whole, every token given BOS and the text before it, in windows of the
model's context (`scoring.loglikelihood_rolling`, lm-evaluation-harness's rolling windows).
The figures are those of the harness's perplexity tasks (wikitext): per token, per word
(whitespace-separated) and bits per UTF-8 byte, so that models with different tokenizers
compare.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from ettin_jax import files, scoring
from ettin_jax.errors import EttinError


class TextFileError(EttinError, ValueError):
    """A text file that cannot be read as texts: the file and the line are named."""


@dataclasses.dataclass(frozen=True)
class Perplexity:
    texts: int
    tokens: int  # scored tokens (BOS, which is given, is not scored)
    words: int
    bytes: int
    loglikelihood: float  # natural log, summed over every token

    @property
    def token_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.words)

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / self.bytes / math.log(2)

    def as_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {**fields, "token_perplexity": self.token_perplexity, "word_perplexity": self.word_perplexity,
                "bits_per_byte": self.bits_per_byte}  # fmt: skip


def perplexity(
    model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int | None = None, batch_size: int | None = None
) -> Perplexity:
    """The perplexity of `texts` (each scored on its own, from BOS) under `model`."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TextFileError("no text to score: every text is empty")
    bos = model.config.bos_token_id
    bos = (
        bos
        if bos is not None
        else tokenizer.bos_token_id
        if tokenizer.bos_token_id is not None
        else tokenizer.eos_token_id
    )
    documents = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    totals = scoring.loglikelihood_rolling(model, documents, bos, max_length=max_length, batch_size=batch_size)
    return Perplexity(
        texts=len(texts), tokens=sum(map(len, documents)), words=sum(len(t.split()) for t in texts),
        bytes=sum(len(t.encode("utf-8")) for t in texts), loglikelihood=float(sum(totals)),
    )  # fmt: skip


def read_texts(path: str | os.PathLike, column: str = "text") -> list[str]:
    """The texts of a file: a .jsonl file's `column` of each line (an object), any other file's
    whole UTF-8 text as one."""
    path = os.fspath(path)
    text = files.read_text(path)
    if not path.endswith(".jsonl"):
        return [text]
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TextFileError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(column), str):
            raise TextFileError(f'{path}:{number}: expected an object with a string "{column}" field')
        texts.append(record[column])
    return texts
