"""Reading a Patchscopes decode as text: does it name the subject, or only echo the source token?

A decode counts as naming the subject only when its first line names a word of the subject that the source
token's own text does not contain (`names_entity`): the source state of " Islands" decoding to "Islands" is an
echo of the token (`is_echo`), not evidence that "Marshall Islands" was resolved.
"""

from __future__ import annotations

import re
from typing import Any


def expected_tokens(model: Any, text: str) -> list[int]:
    """The first token of each word of `text`, with and without a leading space (what decoding may produce)."""
    words = re.findall(r"\w+", text) or [text.strip()]
    tok = model.tokenizer
    ids = {
        tok(form, add_special_tokens=False)["input_ids"][:1][0]
        for w in words
        for form in (w, " " + w)
        if tok(form, add_special_tokens=False)["input_ids"]
    }
    return sorted(ids - set(tok.all_special_ids)) or sorted(ids)


def mentions(text: str, reference: str) -> bool:
    """Whether decoded `text` names `reference`: one of its words (3+ characters, or the whole of it) appears."""
    named = words(reference) or [reference.strip().lower()]
    low = text.lower()
    return any(w and re.search(rf"(?<!\w){re.escape(w)}", low) for w in named)


def words(text: str) -> list[str]:
    """The lower-cased words of `text` with 3+ characters (shorter ones are too common to name anything)."""
    return [w for w in re.findall(r"\w+", text.lower()) if len(w) >= 3]


def first_line(text: str) -> str:
    """The decode's first non-empty line: the description; later lines are the model inventing more examples."""
    return next((line for line in text.split("\n") if line.strip()), "")


def entity_words(reference: str, source_token: str, target_prompt: str = "") -> list[str]:
    """The words of `reference` a decode must name to show more than the source token: words that the source
    token's text does not contain (" Islands" contains "islands") and that the target prompt does not offer."""
    own = source_token.strip().lower()
    offered = set(words(target_prompt))
    return [w for w in dict.fromkeys(words(reference)) if w not in own and w not in offered]


def _names_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?:'?s)?(?!\w)", text.lower()) is not None


def names_entity(decoded: str, reference: str, source_token: str, target_prompt: str = "") -> bool:
    """Whether the decode's first line names `reference` beyond the source token's own text: it contains a
    whole word of `reference` (plural or possessive allowed) from `entity_words`."""
    line = first_line(decoded)
    return any(_names_word(line, w) for w in entity_words(reference, source_token, target_prompt))


def is_echo(decoded: str, reference: str, source_token: str, target_prompt: str = "") -> bool:
    """Whether the decode's first line only repeats the source token's text: a word there starts with the
    token's text but no word of `reference` beyond it is named (`names_entity` is False)."""
    own = source_token.strip().lower()
    line = first_line(decoded).lower()
    starts_a_word = own and re.search(rf"(?<!\w){re.escape(own)}", line) is not None
    return bool(starts_a_word) and not names_entity(decoded, reference, source_token, target_prompt)
