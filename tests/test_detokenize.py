"""Text from tokens as they come: pieces join to the whole decoded text, never split a
character, and stop strings end the text just before them, even across tokens."""

from __future__ import annotations

import pytest

from ettin_jax.default_model import byte_tokenizer
from ettin_jax.detokenize import TextStream

TEXT = "Héllo wörld, 日本語 stop here. END more"


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def pieces(tokenizer, stop=(), text=TEXT) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = [stream.add([t]) for t in ids]
    return [*out, stream.finish()], stream


def test_pieces_join_to_the_text_and_never_split_a_character(tokenizer):
    out, stream = pieces(tokenizer)
    assert "".join(out) == stream.text == TEXT and not stream.stopped
    assert all("\ufffd" not in p for p in out)
    assert "" in out  # the bytes of é before the last one showed nothing


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["END", "xyz"], "Héllo wörld, 日本語 stop here. "),
        (["wörld, 日"], "Héllo "),  # a stop string spanning multi-byte characters
        (["here", "stop"], "Héllo wörld, 日本語 "),  # the first to appear wins
        (["moreX"], TEXT),  # a stop string's start at the end is shown once no more tokens come
    ],
)
def test_stop_strings_end_the_text_before_them(tokenizer, stop, expected):
    out, stream = pieces(tokenizer, stop)
    assert "".join(out) == stream.text == expected
    assert stream.stopped == (expected != TEXT)
    if stream.stopped:
        assert stream.add([42]) == "" and stream.finish() == ""


def test_text_that_may_begin_a_stop_string_is_held_back(tokenizer):
    stream = TextStream(tokenizer, ["ENDING"])
    ids = tokenizer("ok END", add_special_tokens=False)["input_ids"]
    shown = "".join(stream.add([t]) for t in ids)
    assert shown == "ok "  # "END" may begin "ENDING": held
    assert stream.finish() == "END"
