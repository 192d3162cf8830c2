"""The model that serves when no `--model` is given: a small decoder trained on Python's
documentation, shipped inside the package.

A 4-layer, 160-wide ModernBERT decoder (Ettin's architecture: global and sliding-window layers)
with a 4096-token byte-level BPE tokenizer, trained from scratch on the prose of Python 3.11's
documentation (PSF License). Its weights are bfloat16 (loaded as float32), 3.4 MB, in the
transformers layout under `ettin_jax/assets/default-model`, with a model card (`README.md`) that
gives its held-out perplexity. It makes the commands and examples run on a fresh machine with no
network, and writes English, if not sense. `python -m ettin_jax.train.default_model_recipe`
rebuilds it from nothing. Pass a Hub id such as `jhu-clsp/ettin-decoder-17m` for a real model.
"""

from __future__ import annotations

import os

from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.errors import EttinError

NAME = "ettin-jax-default-v2"
DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default-model")
SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")  # as named in Ettin's tokenizer


class DefaultModelError(EttinError, RuntimeError):
    """The package's copy of the default model is missing: an installation without its data files."""


def path() -> str:
    """The directory of the default model, inside the installed package (read only)."""
    if not os.path.isfile(os.path.join(DIRECTORY, "model.safetensors")):
        raise DefaultModelError(
            f"the embedded default model is missing from {DIRECTORY}: this installation of ettin-jax lacks its "
            "data files; reinstall it, or pass --model"
        )
    return DIRECTORY


def config() -> ModernBertDecoderConfig:
    """The default model's config."""
    return ModernBertDecoderConfig.from_pretrained(path())


def byte_tokenizer():
    """A byte-level tokenizer with no merges: every byte is a token (ids 0..255, in the order of
    their byte-level symbols), then SPECIAL_TOKENS (256..260; [CLS] is BOS, [SEP] EOS, [PAD]
    padding). The first default model's tokenizer, kept for tests that need every byte a token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab.update({token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]", padding_side="left",
    )  # fmt: skip
