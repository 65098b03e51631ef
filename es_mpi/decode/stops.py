"""When a row is finished: EOS, a stop string, or the token limit.

Stop strings are matched on each row's new text incrementally: after each
token only the text of the last few tokens is decoded (enough to hold the
longest stop string plus the new token), so checking costs O(stop length)
per token, not O(completion).  As in transformers' StopStringCriteria a row
stops at the token that completes a stop string, whether or not that token
runs past its end; the completion text is then cut just after it.
"""
from __future__ import annotations

from typing import Sequence


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """`text` cut just after the earliest-ending stop string, and whether one was found."""
    best = -1
    for s in stop_strings:
        j = text.find(s)
        if j >= 0 and (best < 0 or j + len(s) < best):
            best = j + len(s)
    return (text[:best], True) if best >= 0 else (text, False)


class StopMatcher:
    def __init__(self, tokenizer, eos_ids: Sequence[int], stop_strings: Sequence[str]):
        self.tok = tokenizer
        self.eos = frozenset(int(e) for e in eos_ids)
        self.stops = tuple(s for s in stop_strings if s)
        # a token decodes to at least one character (special tokens aside), so
        # the last len(longest stop) + 1 tokens hold any occurrence that the
        # newest token completes
        self.window = max((len(s) for s in self.stops), default=0) + 1

    def finished(self, ids: list[int]) -> bool:
        """Does the row whose new tokens are `ids` end with its last token?"""
        if ids[-1] in self.eos:
            return True
        if not self.stops:
            return False
        tail = self.tok.decode(ids[-self.window:], skip_special_tokens=True)
        return any(s in tail for s in self.stops)
