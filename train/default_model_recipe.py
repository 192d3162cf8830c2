"""Rebuilds the embedded default model (`ettin_jax.default_model`) from nothing:

    python -m ettin_jax.train.default_model_recipe --work-dir /tmp/default-model

1. The corpus: the reStructuredText sources of Python's documentation (PSF License; its code
   examples also 0BSD), from Debian's `python3.11-doc` package (`apt-get download`, no root
   needed; `--deb FILE` takes a copy). Each source file is cut into prose paragraphs (markup
   stripped; code, tables and directives dropped). Files whose CRC-32 of the path is 0 mod 20
   are held out.
2. A byte-level BPE tokenizer (`tokenizers`), `--vocab-size` tokens, with Ettin's special tokens
   [UNK] [CLS] [SEP] [PAD] [MASK] (ids 0 to 4): [CLS] is BOS, [SEP] EOS, [PAD] padding.
3. A config.json and `ettin-jax train lm --config ... --tokenizer ...`: training from scratch.
4. The final model's weights in bfloat16, its tokenizer, a sample of the held-out text and the
   corpus' common words (both for `tests/test_default_model.py`), and a model card with the
   held-out perplexity of the shipped weights next to a uniform model's (the vocabulary size),
   written to `--dest` (default: the package's own copy, `ettin_jax/assets/default-model`).

Every step is deterministic: the same .deb and flags give the same files (training is bit for
bit on the same CPU). A run takes about 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from safetensors.numpy import load_file

from ettin_jax import ModernBertDecoderForCausalLM
from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.default_model import NAME
from ettin_jax.train.data import pack_blocks

PACKAGE = "python3.11-doc"
SOURCES = "./usr/share/doc/python3.11/html/_sources/"
LICENSE = "./usr/share/doc/python3.11-doc/copyright"
SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
HELD_OUT_EVERY = 20
DEST = Path(__file__).resolve().parents[1] / "ettin_jax" / "assets" / "default-model"


# ---- 1. the corpus ------------------------------------------------------------------------
def download_deb(directory: Path) -> Path:
    """Debian's package of Python's documentation, as `apt-get download` fetches it."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", PACKAGE], cwd=directory, check=True)
    (deb,) = sorted(directory.glob(f"{PACKAGE}_*.deb"))
    return deb


def deb_members(deb: Path) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of every regular file in a .deb's data archive: an `ar` archive read here,
    so that no dpkg is needed."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a .deb (ar) archive")
    offset = 8
    while offset < len(raw):
        header = raw[offset : offset + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        body = raw[offset + 60 : offset + 60 + size]
        offset += 60 + size + size % 2
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for member in tar:
                    if member.isfile():
                        yield member.name, tar.extractfile(member).read()
            return
    raise ValueError(f"{deb} has no data.tar member")


_ROLE = re.compile(r":[\w:+-]+:`~?!?([^`<]*?)\s*(?:<[^`>]*>)?`")  # :func:`~os.path.join` -> os.path.join
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}")  # `text <url>`_ -> text
_MARKUP = [
    (re.compile(r"``([^`]+)``"), r"\1"),  # ``literal``
    (re.compile(r"`([^`]+)`_{0,2}"), r"\1"),  # `interpreted` and `ref`_
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*"), r"\1"),
    (re.compile(r"\s*\[#\w*\]_"), ""),  # footnote references
    (re.compile(r"\|(\w+)\|"), r"\1"),  # substitutions
    (re.compile(r"\\(.)"), r"\1"),  # escapes
    (re.compile(r"::$"), ":"),  # "For example::" introduces a code block
]
_HEADING = re.compile(r"^([=\-~^*#\"'`:.+_])\1{2,}\s*$")
_LIST = re.compile(r"^(?:[*+-]|#\.|\d+\.|\(\w\))\s+")


def paragraphs(text: str) -> list[str]:
    """The prose of one reStructuredText file: paragraphs (list items included) with the inline
    markup stripped; headings, directives, comments, indented blocks (code, quotes, directive
    bodies), tables and paragraphs that are not mostly words are dropped."""
    kept = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or lines[0][:1].isspace() or lines[0].startswith(("..", "|", "+", ">>>", "=")):
            continue
        if any(_HEADING.match(line) for line in lines):
            continue
        paragraph = " ".join([_LIST.sub("", lines[0]).strip(), *(line.strip() for line in lines[1:])])
        paragraph = _LINK.sub(r"\1", _ROLE.sub(r"\1", paragraph))
        for pattern, replacement in _MARKUP:
            paragraph = pattern.sub(replacement, paragraph)
        paragraph = re.sub(r"\s+", " ", paragraph).strip()
        words = paragraph.split()
        if len(words) < 8 or sum(w.strip(".,;:()'\"!?").isalpha() for w in words) < 0.7 * len(words):
            continue
        kept.append(paragraph)
    return kept


def corpus(deb: Path) -> tuple[list[str], list[str], str]:
    """(training paragraphs, held-out paragraphs, the package's copyright file), files in path order."""
    train, held_out, license_text = [], [], ""
    for name, data in sorted(deb_members(deb)):
        if name == LICENSE:
            license_text = data.decode()
        if not (name.startswith(SOURCES) and name.endswith(".rst.txt")):
            continue
        relative = name[len(SOURCES) :]
        split = held_out if zlib.crc32(relative.encode()) % HELD_OUT_EVERY == 0 else train
        split.extend(paragraphs(data.decode("utf-8")))
    if not train or not held_out:
        raise ValueError(f"{deb} holds no documentation sources under {SOURCES}")
    return train, held_out, license_text


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")


# ---- 2. the tokenizer ---------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int, directory: Path) -> None:
    """Byte-level BPE as Ettin's (no prefix space), with its special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]", padding_side="left",
    ).save_pretrained(directory)  # fmt: skip


# ---- 3. the config and the training run ---------------------------------------------------
def write_config(args: argparse.Namespace, tokenizer_dir: Path, path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (("cls", "[CLS]"), ("sep", "[SEP]"))}
    config = ModernBertDecoderConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        max_position_embeddings=2048, local_attention=args.local_attention,
        pad_token_id=tokenizer.convert_tokens_to_ids("[PAD]"), bos_token_id=ids["cls"], cls_token_id=ids["cls"],
        eos_token_id=ids["sep"], sep_token_id=ids["sep"],
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    config.save(path.parent, "ModernBertDecoderForCausalLM")


def train_command(args: argparse.Namespace, work: Path) -> list[str]:
    return [
        sys.executable, "-m", "ettin_jax.cli", "train", "lm",
        "--config", str(work / "config" / "config.json"), "--tokenizer", str(work / "tokenizer"),
        "--train-file", str(work / "train.jsonl"), "--eval-file", str(work / "heldout.jsonl"),
        "--output-dir", str(work / "run"), "--overwrite", "--max-steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
        "--learning-rate", str(args.learning_rate), "--schedule", "cosine", "--warmup-ratio", "0.05",
        "--weight-decay", "0.1", "--seed", str(args.seed), "--save-steps", str(args.steps // 8),
        "--log-steps", "20", "--no-progress",
    ]  # fmt: skip


# ---- 4. what ships ------------------------------------------------------------------------
def export(source: Path, dest: Path) -> None:
    """The trained model with bfloat16 weights (loaded back as float32), and its tokenizer."""
    import ml_dtypes
    from safetensors.numpy import save_file

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in sorted(load_file(source / "model.safetensors").items())}
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    (dest / "model.safetensors").chmod(0o644)  # save_file's temporary file is private
    config = json.loads((source / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}, indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copyfile(source / name, dest / name)


def held_out_perplexity(model_dir: Path, texts: list[str], block_size: int) -> tuple[float, int]:
    """exp(mean token loss) over the held-out texts packed as in training (BOS + text + EOS,
    blocks of `block_size`), and the number of tokens scored. The blocks are read whole, texts
    attending across their boundaries, as for the model card's figure."""
    import jax
    from transformers import AutoTokenizer

    model = ModernBertDecoderForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    blocks, _ = pack_blocks(tokenizer, texts, block_size, config.bos_token_id, config.eos_token_id)
    loss = jax.jit(lambda ids: model(input_ids=ids, labels=ids).loss)  # the mean over B * (T - 1) tokens
    total, tokens = 0.0, 0
    for start in range(0, len(blocks) - 7, 8):  # whole batches of 8 blocks: one compiled shape
        batch = blocks[start : start + 8]
        n = batch.shape[0] * (batch.shape[1] - 1)
        total, tokens = total + float(loss(batch)) * n, tokens + n
    return math.exp(total / tokens), tokens


def common_words(texts: list[str], minimum: int) -> list[str]:
    counts = Counter(w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t))
    return sorted(w for w, n in counts.items() if n >= minimum)


MODEL_CARD = """\
# {name}

The model `ettin-jax` serves when no `--model` is given. Rebuilt from nothing by
`python -m ettin_jax.train.default_model_recipe` (train/default_model_recipe.py).

- Architecture: ModernBERT decoder (Ettin), {layers} layers ({pattern}), hidden size {hidden},
  MLP {intermediate}, {heads} heads, sliding window {window}, vocabulary {vocab}; {params:,} parameters,
  stored in bfloat16.
- Tokenizer: byte-level BPE, {tokens} tokens, trained on the corpus; [CLS] is BOS, [SEP] EOS, [PAD] padding.
- Corpus: the reStructuredText sources of Python {python}'s documentation, from Debian's
  `{deb}`, cut into prose paragraphs ({train_chars:,} characters for training, {held_chars:,}
  held out: the files whose path's CRC-32 is 0 mod {every}). Licence: the PSF License Agreement
  (Python's documentation; its code examples are also under the Zero-Clause BSD licence), Copyright
  (c) 2001-2023 Python Software Foundation; the package's copyright file is `CORPUS-COPYRIGHT`.
- Training: `ettin-jax train lm` from scratch, {steps} steps of {batch} x {block} tokens, AdamW, peak
  learning rate {lr}, cosine schedule, seed {seed}; the checkpoint with the lowest held-out loss
  (step {best}) is the one shipped.
- Held-out perplexity (these bfloat16 weights, {held_tokens:,} tokens): {ppl:.1f}, against {vocab} for a
  uniform model.
- `heldout-sample.txt`: the first held-out paragraphs; `words.txt`: the corpus' words seen at least
  {min_count} times. `tests/test_default_model.py` uses both.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="corpus, tokenizer and the training run")
    parser.add_argument("--dest", type=Path, default=DEST, help="where the shipped model is written")
    parser.add_argument("--deb", type=Path, help=f"a downloaded {PACKAGE} .deb (default: apt-get download)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=160)
    parser.add_argument("--intermediate-size", type=int, default=320)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--local-attention", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-training", action="store_true", help="reuse the run in --work-dir")
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    deb = args.deb or download_deb(work / "deb")
    train, held_out, license_text = corpus(deb)
    write_jsonl(work / "train.jsonl", train)
    write_jsonl(work / "heldout.jsonl", held_out)
    print(f"corpus: {len(train)} training paragraphs, {len(held_out)} held out, from {deb.name}", flush=True)
    if not args.skip_training:
        train_tokenizer(train, args.vocab_size, work / "tokenizer")
        write_config(args, work / "tokenizer", work / "config" / "config.json")
        command = train_command(args, work)
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)

    # The checkpoint with the lowest held-out loss (the run evaluates every steps/8 steps).
    run = work / "run"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = min((r for r in evals if "eval_loss" in r), key=lambda r: r["eval_loss"])["step"]
    export(run / "best" if (run / "best").is_dir() else run / "final", args.dest)
    perplexity, tokens = held_out_perplexity(args.dest, held_out, args.block_size)
    config = ModernBertDecoderConfig.from_pretrained(args.dest)
    sample, size = [], 0
    for paragraph in held_out:
        if size > 6000:
            break
        sample.append(paragraph)
        size += len(paragraph)
    (args.dest / "heldout-sample.txt").write_text("\n\n".join(sample) + "\n", encoding="utf-8")
    min_count = 3
    (args.dest / "words.txt").write_text("\n".join(common_words(train, min_count)) + "\n", encoding="utf-8")
    (args.dest / "CORPUS-COPYRIGHT").write_text(license_text, encoding="utf-8")
    params = sum(v.size for v in load_file(args.dest / "model.safetensors").values())
    card = MODEL_CARD.format(
        name=NAME, layers=config.num_hidden_layers, pattern=", ".join(t.split("_")[0] for t in config.layer_types),
        hidden=config.hidden_size, intermediate=config.intermediate_size, heads=config.num_attention_heads,
        window=config.local_attention // 2, vocab=config.vocab_size, params=params,
        tokens=len(json.loads((args.dest / "tokenizer.json").read_text())["model"]["vocab"]),
        python="3.11", deb=deb.name, train_chars=sum(map(len, train)), held_chars=sum(map(len, held_out)),
        every=HELD_OUT_EVERY, steps=args.steps, batch=args.batch_size, block=args.block_size, lr=args.learning_rate,
        seed=args.seed, best=best, held_tokens=tokens, ppl=perplexity, min_count=min_count,
    )  # fmt: skip
    (args.dest / "README.md").write_text(card, encoding="utf-8")
    print(f"held-out perplexity {perplexity:.2f} over {tokens} tokens (uniform: {config.vocab_size})")
    print(f"wrote {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
