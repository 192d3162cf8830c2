"""The model that serves when no `--model` is given: built on this machine, deterministically.

A 4-layer, 64-wide ModernBERT decoder with random weights (seed 0) and a byte-level tokenizer
with no merges (every byte is a token), saved once in the transformers layout under
`$ETTIN_JAX_HOME` (default `~/.cache/ettin-jax`). It makes the commands and examples run on a
fresh machine with no network; its text is random bytes, not language. Pass a Hub id such as
`jhu-clsp/ettin-decoder-17m` for a real model.
"""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp
from flax import nnx

from ettin_jax import files
from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.convert import transformers_state_dict, write_transformers
from ettin_jax.modeling import ModernBertDecoderForCausalLM

NAME = "ettin-jax-default-tiny-v1"
SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")  # ids 256..260, as named in Ettin's


def config() -> ModernBertDecoderConfig:
    cls, sep, pad = 257, 258, 259  # [CLS], [SEP], [PAD]
    return ModernBertDecoderConfig(
        vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=2048, local_attention=32, pad_token_id=pad, bos_token_id=cls, cls_token_id=cls,
        eos_token_id=sep, sep_token_id=sep,
    )  # fmt: skip


def byte_tokenizer():
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


def path() -> str:
    """The directory of the default model, built on first use (atomically)."""
    target = os.path.join(files.home(), NAME)
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    staging = files.staging_dir_for(target)
    try:
        model = ModernBertDecoderForCausalLM(config(), dtype=jnp.float32, rngs=nnx.Rngs(0))
        # Every process builds its own copy (hosts need not share a disk), so this is no
        # save_pretrained, which only process 0 writes.
        write_transformers(model, staging, transformers_state_dict(model))
        byte_tokenizer().save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process built it first
            if not os.path.isfile(os.path.join(target, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
