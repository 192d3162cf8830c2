"""A word-level tokenizer and synthetic data files for the training tests."""

from __future__ import annotations

import csv
import json
import random

SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]  # ids 0..3: pad, bos, eos as in the TINY config
FIRST = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
LAST = ["red", "green", "blue", "black", "white", "gold"]
FILLER = [f"w{i}" for i in range(40)]
WORDS = SPECIALS + FIRST + LAST + FILLER


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]"
    )


def xor_rows(n: int, seed: int) -> list[dict]:
    """Label decided by two words far apart: the first and the last, with 3-8 fillers between
    (beyond the 4-token window, so only the global layers see both). 'same' when both come from
    the first half of their list or both from the second half, else 'diff'."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = r.randrange(len(FIRST)), r.randrange(len(LAST))
        fill = " ".join(r.choice(FILLER) for _ in range(r.randint(3, 8)))
        same = (a < len(FIRST) // 2) == (b < len(LAST) // 2)
        rows.append({"text": f"{FIRST[a]} {fill} {LAST[b]}", "label": "same" if same else "diff"})
    return rows


def write_rows(path, rows: list[dict]) -> str:
    path = str(path)
    if path.endswith(".csv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.endswith(".jsonl"):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def dataset_dir(root, train: int, test: int) -> str:
    """A dataset directory as `datasets.load_dataset` reads one: data/train.jsonl and
    data/test.jsonl, `train` and `test` rows of the XOR task."""
    (root / "data").mkdir(parents=True)
    write_rows(root / "data" / "train.jsonl", xor_rows(train, seed=0))
    write_rows(root / "data" / "test.jsonl", xor_rows(test, seed=1))
    return str(root)
