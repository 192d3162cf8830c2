"""Text from tokens as they come, and stop strings.

`TextStream` turns a growing list of token ids into text pieces that are safe to show: a
byte-level tokenizer may split one character over several tokens, so a piece ends only where
the decoded text is whole (no trailing U+FFFD), and each time only the tokens of the last piece
are decoded again, as context (the offsets of vLLM's and TGI's detokenizers). With stop strings, text that could
be the start of one is held back until it is known not to be; when one appears, the text ends
just before it, as OpenAI's API does.

Token ids end differently: `until_stop` says which token completed a stop string, and a row of
ids keeps that token (a token cannot be split), as transformers' `StopStringCriteria` does. So
the text of such ids contains the stop string; the text a `TextStream` shows does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence gives


class TextStream:
    """`add(tokens)` returns the next piece of text to show; `finish()` the rest. `stopped` is
    True once a stop string was found (the text then ends before it); `text` is all shown."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), *, skip_special_tokens: bool = True):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self._prefix, self._read = 0, 0  # tokens[prefix:read] were decoded for context only
        self._pending = ""  # decoded but not yet shown: it may begin a stop string
        self.text = ""
        self.stopped = False

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def add(self, tokens: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.tokens.extend(int(t) for t in tokens)
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        if len(after) <= len(before):
            return ""  # nothing new
        if after.endswith(REPLACEMENT):  # a character still incomplete: nothing is shown yet...
            whole = after[len(before) :].rstrip(REPLACEMENT)
            if any(stop in self._pending + whole for stop in self.stop):
                # ...unless a stop string is already whole before it (a token that ends one and
                # begins a multi-byte character): the stop is this token's, not the next one's.
                return self._show(whole)
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return self._show(after[len(before) :])

    def until_stop(self, tokens: Sequence[int]) -> int:
        """Adds `tokens` one at a time until one completes a stop string, and returns how many
        were added: all of them, or through the one that completed it (none once stopped). A
        row of token ids that stops there ends at `tokens[:until_stop(tokens)]`."""
        if self.stopped:
            return 0
        if not self.stop:
            self.add(tokens)
            return len(tokens)
        for i, token in enumerate(tokens):
            self.add([token])
            if self.stopped:
                return i + 1
        return len(tokens)

    def _show(self, new: str, final: bool = False) -> str:
        pending = self._pending + new
        for stop in self.stop:
            at = pending.find(stop)
            if at >= 0:
                pending, self.stopped = pending[:at], True
        if self.stopped or final or not self.stop:
            self._pending, piece = "", pending
        else:  # hold back the longest tail that begins some stop string
            hold = max((n for s in self.stop for n in range(1, len(s)) if pending.endswith(s[:n])), default=0)
            self._pending, piece = pending[len(pending) - hold :], pending[: len(pending) - hold]
        self.text += piece
        return piece

    def finish(self) -> str:
        """The text held back (incomplete characters decoded as they are, a possible stop
        string's start), once no more tokens come."""
        if self.stopped:
            return ""
        rest = self._decode(self.tokens[self._prefix :])[len(self._decode(self.tokens[self._prefix : self._read])) :]
        self._read = len(self.tokens)
        return self._show(rest, final=True)


def text_of(
    tokenizer: Any, tokens: Sequence[int], stop: Sequence[str] = (), *, skip_special_tokens: bool = True
) -> str:
    """The whole text of `tokens`, ending just before the first stop string: what a `TextStream`
    shows of them once they have all come (without stop strings, `tokenizer.decode(tokens)`)."""
    stream = TextStream(tokenizer, stop, skip_special_tokens=skip_special_tokens)
    stream.add(tokens)
    stream.finish()
    return stream.text
