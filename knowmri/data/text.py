"""Free text -> Sample, by rules (offline, no model): facts, questions and open prompts.

"The Eiffel Tower is located in Paris" gives prompt "The Eiffel Tower is located in",
ground_truth " Paris", triple_subject "Eiffel Tower", triple_relation "is located in",
triple_object "Paris". "The capital of France is Paris" gives subject "France" and relation
"capital" (the attribute of the subject). A question keeps the question as the prompt and
guesses its subject; an open prompt ("... in the city of") keeps the prompt and guesses the
subject and relation. The returned `TextSample.missing` lists the fact keys it could not fill.
"""

from __future__ import annotations

import re
from typing import Any

from knowmri.sample import Sample

#: The keys `from_text` tries to fill; those it cannot are listed in `TextSample.missing`.
TEXT_KEYS = ("prompt", "ground_truth", "triple_subject", "triple_relation", "triple_object")

AUX = {"is", "was", "are", "were", "has", "have", "had", "can", "could", "will", "would", "does", "did", "do",
       "may", "might", "must", "should", "cannot", "can't", "isn't", "wasn't", "aren't", "weren't", "doesn't",
       "didn't", "won't"}
_BASE = (
    "speak", "play", "write", "found", "invent", "discover", "direct", "compose", "paint", "create", "develop",
    "design", "build", "own", "lead", "marry", "live", "work", "belong", "border", "contain", "produce", "make",
    "use", "eat", "drink", "like", "love", "hate", "need", "want", "grow", "flow", "orbit", "lie", "stand", "sit",
    "run", "cover", "include", "sell", "manufacture", "employ", "govern", "rule", "host", "feature", "star", "sing",
    "teach", "study", "follow", "represent", "join", "leave", "visit", "die", "boil", "freeze", "melt", "cause",
    "carry", "connect", "open", "close", "start", "end", "begin", "describe", "hold", "keep", "meet", "become",
    "lay", "fly", "swim", "breathe", "chase", "cut", "lift", "throw", "pull", "push", "give", "take", "show",
    "tell", "know", "see", "hear", "read", "mean", "call", "name", "rise", "set", "shine", "drive", "wear", "bark",
    "cost", "weigh", "measure"
)
_IRREGULAR = (
    "wrote", "won", "built", "led", "ran", "sat", "stood", "lay", "grew", "flew", "swam", "sang", "taught", "held",
    "kept", "met", "became", "bore", "began", "made", "sold", "spoke", "gave", "took", "showed", "told", "knew",
    "saw", "heard", "meant", "fell", "brought", "bought", "thought", "found", "left", "went", "came", "drove",
    "ate", "drank", "rose", "froze", "broke", "chose", "shone", "wore"
)
VERBS = set(_IRREGULAR)
for _v in _BASE:
    VERBS.update({_v, _v + "s", _v + "es", _v + "ed", _v + "d", _v[:-1] + "ies" if _v.endswith("y") else _v})
PARTICIPLES = {"born", "written", "made", "built", "known", "found", "spoken", "sung", "taught", "held", "kept",
               "given", "taken", "shown", "seen", "heard", "read", "led", "won", "grown", "flown", "set", "sold"}
ADVERBS = {"not", "also", "still", "often", "usually", "always", "never", "mainly", "mostly", "originally",
           "officially", "generally", "currently", "widely", "best", "first", "now"}
PREPS = {"in", "by", "of", "at", "on", "from", "to", "for", "with", "as", "into", "near", "under", "over", "about",
         "between", "among", "after", "before", "during", "than", "like", "inside", "within", "across", "through",
         "along", "behind", "beyond", "since", "until", "around"}
DETS = {"the", "a", "an", "this", "that", "its", "their", "his", "her", "our", "my", "your"}
WH = {"what", "who", "where", "when", "which", "why", "how", "whose", "whom"}
STOP_CAPS = {w.capitalize() for w in WH | AUX | PREPS | DETS} | {
    "I", "It", "There", "Name", "Tell", "Please", "Hello", "Hi", "Translate", "Write", "Give", "Find", "Explain",
    "Describe", "List", "Say", "Answer", "Question", "Summarize", "Complete", "Review", "Text", "Sentiment"}
CONNECTORS = {"of", "and", "de", "da", "van", "von", "the", "du", "del", "la", "le", "di", "&"}
OPEN_END = PREPS | DETS | AUX | {"called", "named", "known", "located", "situated", "based", "and", "or"}
_PUNCT = "?!.,;:\"'"
_ABBREV = re.compile(r"(?:\b[A-Z]|Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|vs|etc|No)\.$")
_OF_PATTERN = re.compile(r"^(?:[Tt]he\s+)?(?P<r>(?:[a-z]+\s+){0,3}?[a-z]+)\s+of\s+(?P<s>.+?)\s+"
                         r"(?P<v>is|was|are|were)(?:\s+(?P<o>.+))?$")
_POSS_PATTERN = re.compile(r"^(?P<s>.+?)'s?\s+(?P<r>(?:[a-z]+\s+){0,2}[a-z]+)\s+(?P<v>is|was|are|were)"
                           r"(?:\s+(?P<o>.+))?$")


class TextSample(Sample):
    """A Sample parsed from free text; `missing` lists the fact keys (TEXT_KEYS) left unfilled."""

    def __init__(self, data: dict[str, Any], missing: list[str]) -> None:
        super().__init__(data)
        self.missing: list[str] = list(missing)


def from_text(text: str) -> TextSample:
    """Turn free text into a Sample (prompt, ground_truth, triple_*), saying what is missing."""
    if not isinstance(text, str):
        raise ValueError(f"from_text expects a string, got {type(text).__name__}")
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("the text is empty: type a fact, a question or a prompt")
    context, sentence = _last_sentence(lines[-1])
    first = sentence.split(" ", 1)[0].lower().strip(_PUNCT)
    if sentence.endswith("?") or first in WH:
        fields = _question(sentence)
    else:
        open_prompt = sentence.endswith(":") or sentence.split(" ")[-1].lower() in OPEN_END
        fields = _statement(sentence if open_prompt else _strip_period(sentence), open_prompt)
    fields["prompt"] = "\n".join([*lines[:-1], (context + " " + fields["prompt"]).strip()])
    subject = fields.get("triple_subject")
    if subject and subject not in fields["prompt"]:
        fields.pop("triple_subject")
    data = {k: v for k, v in fields.items() if v}
    return TextSample(data, [k for k in TEXT_KEYS if k not in data])


def _last_sentence(text: str) -> tuple[str, str]:
    """Split off the last sentence (not at abbreviations like 'J.K.' or 'Dr.')."""
    cut = 0
    for match in re.finditer(r"[.!?]\s+(?=[A-Z\"'])", text):
        if not _ABBREV.search(text[: match.start() + 1]) and match.end() < len(text):
            cut = match.end()
    return text[:cut].strip(), text[cut:].strip()


def _strip_period(sentence: str) -> str:
    sentence = sentence.rstrip("!").rstrip()
    if sentence.endswith(".") and not _ABBREV.search(sentence):
        sentence = sentence[:-1].rstrip()
    return sentence


def _drop_det(phrase: str) -> str:
    words = phrase.split(" ")
    if len(words) > 1 and words[0].lower() in DETS:
        return " ".join(words[1:])
    return phrase


def _fact(prompt: str, subject: str, relation: str, obj: str | None) -> dict[str, Any]:
    obj = (obj or "").strip()
    return {"prompt": prompt, "triple_subject": _drop_det(subject.strip()), "triple_relation": relation.strip(),
            "triple_object": obj, "ground_truth": " " + obj if obj else None}


def _statement(sentence: str, open_prompt: bool) -> dict[str, Any]:
    for pattern in (_OF_PATTERN, _POSS_PATTERN):
        m = pattern.match(sentence)
        if m and not _has_aux(m.group("s")) and not _starts_like_relation(m.group("o")):
            return _fact(sentence[: m.end("v")], m.group("s"), m.group("r"), m.group("o"))
    tokens = sentence.split(" ")
    words = [t.strip(_PUNCT) for t in tokens]
    lower = [w.lower() for w in words]
    j = next((i for i in range(1, len(words)) if words[i] == lower[i] and (lower[i] in AUX or lower[i] in VERBS)),
             None)
    if j is None:
        return {"prompt": sentence, "triple_subject": _proper_noun(sentence)}
    k = _relation_end(words, lower, j, open_prompt)
    obj = _trim_object(tokens[k:])
    if not obj and not open_prompt:
        return {"prompt": sentence, "triple_subject": _drop_det(" ".join(tokens[:j]).strip(_PUNCT))}
    return _fact(" ".join(tokens[:k]), " ".join(tokens[:j]).strip(_PUNCT), " ".join(tokens[j:k]), obj)


def _trim_object(tokens: list[str]) -> str:
    """The object phrase; a name's trailing modifier is cut ('Steve Jobs in 1976' -> 'Steve Jobs')."""
    if tokens and tokens[0][:1].isupper():
        for i, token in enumerate(tokens[1:], start=1):
            if token.lower() in PREPS and token.lower() not in CONNECTORS:
                tokens = tokens[:i]
                break
    return " ".join(tokens).strip(_PUNCT + " ")


def _relation_end(words: list[str], lower: list[str], j: int, open_prompt: bool) -> int:
    """Index after the relation phrase that starts at verb j (verb, adverbs, participles, prepositions)."""
    n, k = len(words), j + 1
    while k < n and lower[k] in ADVERBS:
        k += 1
    if lower[j] in AUX:
        while k < n and words[k] == lower[k] and (lower[k] in PARTICIPLES or re.fullmatch(r"[a-z]+(?:ed|en)", lower[k])):
            k += 1
    while k < n and lower[k] in PREPS:
        k += 1
    while True:
        m = k + 1 if k < n and lower[k] in DETS else k
        nouns = 0
        while m < n and words[m] == lower[m] and lower[m] not in PREPS | DETS and nouns < 3 and words[m].isalpha():
            m, nouns = m + 1, nouns + 1
        if nouns and m < n and lower[m] in PREPS and (m + 1 < n or open_prompt):
            k = m + 1
            continue
        return k


def _question(sentence: str) -> dict[str, Any]:
    m = re.search(r"\bthe\s+(?P<r>(?:[a-z]+\s+){0,3}?[a-z]+)\s+of\s+(?P<s>[^?]+?)\s*\??$", sentence)
    if m and not _has_aux(m.group("s")):
        return {"prompt": sentence, "triple_subject": _drop_det(m.group("s").strip(_PUNCT)),
                "triple_relation": m.group("r")}
    subject = _proper_noun(sentence)
    if not subject:
        words = [w.strip(_PUNCT) for w in sentence.split(" ")]
        for i, w in enumerate(words[:-1]):
            if w.lower() in DETS and words[i + 1].isalpha():
                subject = words[i + 1]
                break
        else:
            rest = [w for w in words[1:] if w and w.lower() not in AUX | DETS | PREPS | WH]
            subject = rest[0] if rest else None
    return {"prompt": sentence, "triple_subject": subject}


def _proper_noun(sentence: str) -> str | None:
    """The longest run of capitalized words (joined by 'of', 'and', ...), ignoring sentence words."""
    tokens = sentence.split(" ")
    spans: list[list[str]] = []
    current: list[str] = []
    for i, token in enumerate(tokens):
        word = token.strip(_PUNCT)
        capital = bool(word) and (word[0].isupper() or word[0].isdigit()) and word not in STOP_CAPS
        connector = bool(current) and word in CONNECTORS and i + 1 < len(tokens) and tokens[i + 1][:1].isupper()
        if capital or connector:
            current.append(token)
            if token[-1:] in "?!,;:" and capital:
                spans.append(current)
                current = []
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    best = None
    for span in spans:
        text = " ".join(span).rstrip("?!,;:")
        text = text[:-1] if text.endswith(".") and not _ABBREV.search(text) else text
        if text and text in sentence and (best is None or len(text) >= len(best)):
            best = text
    return best


def _has_aux(phrase: str) -> bool:
    return any(w.lower() in AUX for w in phrase.split(" "))


def _starts_like_relation(obj: str | None) -> bool:
    first = (obj or "").split(" ", 1)[0].lower()
    return first in PREPS or first in PARTICIPLES or bool(re.fullmatch(r"[a-z]+ed", first))
