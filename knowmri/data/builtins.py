"""The 15 built-in datasets: metadata, keys, native-format parser and hub copy of each.

Each built-in ships a small sample that knowmri's authors wrote for this package (true facts,
plausibility statements, arithmetic problems, reviews, translations, code tasks; none copied
from the public data) in `knowmri/data/builtin/<name>.jsonl`, so it works offline. The full
public data is read from a local file in its native format (`path=`) or from the hub (`split=`).
"""

from __future__ import annotations

from functools import partial

from knowmri.data import formats as f
from knowmri.data import formats_tasks as t
from knowmri.data.dataset import DatasetSpec, register

FACT = ("prompt", "ground_truth", "triple_subject", "triple_relation", "triple_object")
CSK = ("prompt", "ground_truth", "triple_subject", "triple_relation", "triple_object", "label")
ROME = 'Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (ROME), https://rome.baulab.info'

_imdb = partial(t.labelled, labels=t.IMDB_LABELS, template=t.IMDB_PROMPT)
_emotion = partial(t.labelled, labels=t.EMOTION_LABELS, template=t.EMOTION_PROMPT)

SPECS = [
    DatasetSpec(
        "known_1000", "Facts a model knows, as prompt -> object continuations with their subject-relation-"
        "object triples (ROME's knowns).", ROME, FACT, f.known, "ROME knowns JSON (known_1000.json)"),
    DatasetSpec(
        "counterfact", "Facts paired with a counterfactual object (target_new), for knowledge editing and "
        "tracing.", ROME, FACT + ("target_new",), f.counterfact,
        "CounterFact JSON: ROME's nested requested_rewrite form, EasyEdit/MEND flat form, Know-MRI eval form",
        hub_id="azhx/counterfact", hub_split="train", hub_record=f.counterfact_record),
    DatasetSpec(
        "zsre", "Relation questions with an answer, a rephrasing and an edit target (zero-shot relation "
        "extraction).", 'Levy et al. 2017, "Zero-Shot Relation Extraction via Reading Comprehension"; '
        'MEND form: Mitchell et al. 2022', FACT + ("prompts", "target_new"), f.zsre,
        "zsRE JSON in MEND form {subject, src, pred, rephrase, alt, answers, loc, loc_ans}"),
    DatasetSpec(
        "pararel", "The same fact asked through several paraphrased prompts, for consistency analysis.",
        'Elazar et al. 2021, "Measuring and Improving Consistency in Pretrained Language Models", '
        "https://github.com/yanaiela/pararel", FACT + ("prompts",), f.pararel,
        "the PARAREL folder (graphs_json/P*.jsonl patterns + trex_lms_vocab/P*.jsonl tuples); split = relation ids"),
    DatasetSpec(
        "pep3k", "Physical plausibility of subject-verb-object events, answered True or False.",
        'Wang et al. 2018, "Modeling Semantic Plausibility by Injecting World Knowledge"; MEMIT-CSK: '
        'Gupta et al. 2023, "Editing Common Sense in Transformers"', CSK, f.csk,
        "MEMIT-CSK JSON {prompt, label[, subject, verb, object]}"),
    DatasetSpec(
        "twenty_q", "Commonsense properties of everyday things (20 Questions), answered True or False.",
        "allenai/twentyquestions via MEMIT-CSK (Gupta et al. 2023)", CSK, f.csk,
        "MEMIT-CSK JSON {prompt, label[, subject, verb, object]}"),
    DatasetSpec(
        "concept_edit", "Definitions of concepts, for conceptual knowledge analysis and editing.",
        'Wang et al. 2024, "Editing Conceptual Knowledge for Large Language Models" (ConceptEdit)', FACT,
        f.concept_edit, "Know-MRI eval JSON {question, answer, subject, origin_question, origin_answer} "
        "(split='mcq' for the multiple-choice form) or {concept, definition} records"),
    DatasetSpec(
        "bias_neurons", "Masked sentences probing which demographic group a model associates with a trait.",
        'Liu et al. 2024, "The Devil is in the Neurons: Interpreting and Mitigating Social Biases in '
        'Language Models" (ICLR 2024)', ("prompt", "ground_truth", "label"), f.bias,
        "bias-neuron group JSON (lists of [masked sentence, demographic, id]), a file or a folder"),
    DatasetSpec(
        "gsm8k", "Grade-school arithmetic word problems with worked solutions and final answers.",
        'Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"',
        ("prompt", "ground_truth", "reasoning"), t.gsm8k, "GSM8K JSONL {question, answer ending '#### N'}",
        hub_id="openai/gsm8k", hub_config="main", hub_record=t.gsm8k_record),
    DatasetSpec(
        "metamath", "Rephrased and backward-reasoning math questions with worked answers.",
        'Yu et al. 2024, "MetaMath: Bootstrap Your Own Mathematical Questions for Large Language Models"',
        ("prompt", "ground_truth", "reasoning"), t.metamath,
        "MetaMathQA JSON/JSONL {query, response ending 'The answer is: X', type, original_question}",
        hub_id="meta-math/MetaMathQA", hub_split="train", hub_record=t.metamath_record),
    DatasetSpec(
        "imdb", "Movie reviews labelled Positive or Negative (sentiment).",
        'Maas et al. 2011, "Learning Word Vectors for Sentiment Analysis"', ("prompt", "ground_truth", "label"),
        _imdb, "text;label lines, or records {text, label 0/1 | label_name | answer}",
        hub_id="stanfordnlp/imdb", hub_record=partial(t.labelled_record, labels=t.IMDB_LABELS,
                                                      template=t.IMDB_PROMPT)),
    DatasetSpec(
        "emotion", "Short texts labelled with one of six emotions: sadness, joy, love, anger, fear, surprise.",
        'Saravia et al. 2018, "CARER: Contextualized Affect Representations for Emotion Recognition"',
        ("prompt", "ground_truth", "label"), _emotion,
        "text;label_name lines (dair-ai), records {text, label 0-5 | label_name}, or Know-MRI eval JSON",
        hub_id="dair-ai/emotion", hub_record=partial(t.labelled_record, labels=t.EMOTION_LABELS,
                                                     template=t.EMOTION_PROMPT)),
    DatasetSpec(
        "opus_books", "Sentence pairs from translated books (English -> French).",
        'Tiedemann 2012, "Parallel Data, Tools and Interfaces in OPUS"',
        ("prompt", "ground_truth", "source_lang", "target_lang"), t.opus,
        "HF records {translation: {en, fr}} (JSON/JSONL/Parquet) or line-aligned files",
        hub_id="Helsinki-NLP/opus_books", hub_config="en-fr", hub_split="train", hub_record=t.opus_record),
    DatasetSpec(
        "opus_100", "Everyday sentence pairs between English and other languages.",
        'Zhang et al. 2020, "Improving Massively Multilingual Neural Machine Translation and Zero-Shot '
        'Translation" (OPUS-100)', ("prompt", "ground_truth", "source_lang", "target_lang"), t.opus,
        "line-aligned files opus.xx-yy-test.{xx,yy} (a file or folder; split = test/dev/train) or HF records",
        hub_id="Helsinki-NLP/opus-100", hub_config="en-fr", hub_record=t.opus_record),
    DatasetSpec(
        "mbpp", "Small Python programming tasks with reference code and unit-test asserts.",
        'Austin et al. 2021, "Program Synthesis with Large Language Models"', ("prompt", "ground_truth", "tests"),
        t.mbpp, "MBPP JSONL {task_id, text, code, test_list, test_setup_code} or sanitized JSON "
        "{prompt, code, test_imports, test_list}; split = prompt/test/validation/train",
        hub_id="google-research-datasets/mbpp", hub_config="full", hub_record=t.mbpp_record),
]

for _spec in SPECS:
    register(_spec)
