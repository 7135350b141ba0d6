"""Any record file with a field mapping, bad-data errors, and the hub path (never the network)."""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest

from knowmri.data import load_dataset, loading

RECORDS = [
    {"q": "The Colosseum is located in the city of", "a": "Rome", "s": "Colosseum", "alts": ["Rome is home to"]},
    {"q": "The capital of Japan is", "a": "Tokyo", "s": "Japan", "alts": ["Japan's capital is"]},
]
MAPPING = {"q": "prompt", "a": "ground_truth", "s": "triple_subject"}


def _write(tmp_path, suffix):
    file = tmp_path / f"facts{suffix}"
    if suffix == ".json":
        file.write_text(json.dumps(RECORDS))
    elif suffix == ".jsonl":
        file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    elif suffix == ".csv":
        lines = ["q,a,s,alts"] + [f'{r["q"]},{r["a"]},{r["s"]},"{json.dumps(r["alts"]).replace(chr(34), chr(34) * 2)}"'
                                  for r in RECORDS]
        file.write_text("\n".join(lines) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(RECORDS), file)
    return file


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_any_file_with_mapping(tmp_path, suffix):
    file = _write(tmp_path, suffix)
    ds = load_dataset(str(file), mapping={**MAPPING, "alts": "prompts"})
    assert ds.name == "facts" and len(ds) == 2 and ds.origin == str(file)
    assert ds.support_keys == ["prompt", "prompts", "ground_truth", "triple_subject"]
    assert ds[0]["prompt"] == "The Colosseum is located in the city of"
    assert ds[0]["ground_truth"] == "Rome" and ds[1]["triple_subject"] == "Japan"
    assert ds[1]["prompts"] == ["Japan's capital is"]
    assert len(load_dataset(file, mapping=MAPPING, limit=1)) == 1


def test_identity_mapping_dotted_fields_and_numbers(tmp_path):
    file = tmp_path / "plain.jsonl"
    file.write_text(json.dumps({"prompt": "2 + 2 =", "ground_truth": 4, "other": 1}) + "\n")
    ds = load_dataset(file)
    assert ds[0]["ground_truth"] == "4" and "other" not in ds[0]
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"data": [{"x": {"text": "Hello there", "lab": "joy"}}]}))
    ds = load_dataset(nested, mapping={"x.text": "prompt", "x.lab": "label"})
    assert ds[0]["label"] == "joy"


def test_builtin_name_with_a_custom_file_and_mapping(tmp_path):
    file = _write(tmp_path, ".jsonl")
    ds = load_dataset("known_1000", path=file, mapping=MAPPING)
    assert ds.name == "known_1000" and len(ds) == 2


def test_custom_name_with_path(tmp_path):
    file = _write(tmp_path, ".json")
    assert load_dataset("my facts", path=file, mapping=MAPPING).name == "my facts"


def test_bad_data_names_file_record_and_field(tmp_path):
    file = tmp_path / "bad.jsonl"
    file.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"q": "Where is it?"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, record 1, field 'a': missing"):
        load_dataset(file, mapping=MAPPING)
    file.write_text(json.dumps({"q": "The tower is tall", "a": "x", "s": "bridge"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, record 0: the subject 'bridge' does not occur"):
        load_dataset(file, mapping=MAPPING)
    file.write_text(json.dumps({"q": {"nested": 1}, "a": "x", "s": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, record 0, field 'q': must be text"):
        load_dataset(file, mapping=MAPPING)
    file.write_text('{"q": "fine", "a": "x"}\n{"q": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, record 1: line 2 is not valid JSON"):
        load_dataset(file, mapping={"q": "prompt"})
    broken = tmp_path / "broken.json"
    broken.write_text('[{"q": "a"},')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON \(line 1"):
        load_dataset(broken, mapping={"q": "prompt"})
    listless = tmp_path / "scalars.json"
    listless.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"scalars\.json, record 0: expected an object"):
        load_dataset(listless, mapping={"q": "prompt"})
    unmapped = tmp_path / "unmapped.json"
    unmapped.write_text('[{"question": "Why?", "answer": "Because"}]')
    with pytest.raises(ValueError, match=r"unmapped\.json, record 0: no field is a template key.*mapping="):
        load_dataset(unmapped)


def test_mapping_is_checked():
    with pytest.raises(ValueError, match="did you mean 'ground_truth'"):
        load_dataset("x.jsonl", mapping={"q": "prompt", "a": "groundtruth"})
    with pytest.raises(ValueError, match="gives no 'prompt'"):
        load_dataset("x.jsonl", mapping={"a": "ground_truth"})
    with pytest.raises(ValueError, match="no such file"):
        load_dataset("does-not-exist.csv", mapping={"q": "prompt"})
    with pytest.raises(ValueError, match="unsupported file type"):
        loading.read_records(Path(__file__))


def test_hub_unreachable_fails_fast_with_a_local_file_hint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"could not reach the Hugging Face hub.*path="):
        load_dataset("gsm8k", split="test")
    with pytest.raises(RuntimeError, match=r"could not reach.*'knowmri-test/bogus-id'.*mapping="):
        load_dataset("knowmri-test/bogus-id")
    assert time.monotonic() - start < 10


def test_hub_offline_mode_error_is_wrapped(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"could not load 'knowmri-test/bogus-id' from the Hugging Face hub"):
        load_dataset("knowmri-test/bogus-id", split="train")
    assert time.monotonic() - start < 10


class _FakeSplit(list):
    def select(self, indices):
        return _FakeSplit(self[i] for i in indices)


def _fake_datasets(calls):
    rows = [{"question": "Tom has 2 + 3 apples. How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
            {"question": "What is 4 * 2?", "answer": "4 * 2 = 8\n#### 8"}]

    def load(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        if split is None:
            return {"train": _FakeSplit(rows), "test": _FakeSplit(rows[:1])}
        return _FakeSplit(rows[:1] if split.endswith("[:1]") else rows)

    return types.SimpleNamespace(load_dataset=load)


def test_hub_rows_go_through_the_native_converter(monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(calls))
    monkeypatch.setattr(loading, "_check_reachable", lambda *a: None)
    ds = load_dataset("gsm8k", split="test", limit=1)
    assert calls[-1] == ("openai/gsm8k", "main", "test[:1]")
    assert len(ds) == 1 and ds[0]["ground_truth"] == " 5" and ds[0]["reasoning"] == "2 + 3 = 5"
    assert ds.name == "gsm8k" and ds.origin.startswith("hf://openai/gsm8k")
    ds = load_dataset("openai/gsm8k")
    assert calls[-1] == ("openai/gsm8k", "main", "test") and len(ds) == 2
    ds = load_dataset("someone/math", mapping={"question": "prompt"})
    assert calls[-1] == ("someone/math", None, None) and len(ds) == 1
    assert ds.origin == "hf://someone/math [test]"


def test_hub_without_the_datasets_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RuntimeError, match="needs the 'datasets' library"):
        load_dataset("someone/data")
