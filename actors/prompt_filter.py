"""The serving graph's first safety check: a prompt blocklist that runs before any model (the
image check, which needs a model, is ``actors/safety.py``; the watermark
``actors/watermark.py``)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence


class PromptFilter:
    """Refuses prompts that contain a blocklisted word or phrase.

    Matching is on words, after Unicode compatibility normalisation and case folding, so
    "Bad Word", "bad-word" and "BAD  WORD" all contain the entry "bad word" while
    "badwords" does not.
    """

    def __init__(self, blocklist: Sequence[str]) -> None:
        self.entries: list[tuple[str, tuple[str, ...]]] = []
        for entry in blocklist:
            words = _words(entry)
            if not words:
                raise ValueError(f"blocklist entry {entry!r} has no words")
            self.entries.append((entry, words))

    def match(self, text: str) -> str | None:
        """The first blocklist entry ``text`` contains, or None."""
        words = _words(text)
        for entry, phrase in self.entries:
            size = len(phrase)
            if any(words[i : i + size] == phrase for i in range(len(words) - size + 1)):
                return entry
        return None


def _words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))
