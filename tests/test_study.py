"""Dataset runs into a directory: per-sample files as they finish, resume after a crash, the same report
however the run went, clear errors on other arguments, an unwritable or full directory, a failed write."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

import knowmri as km
from knowmri import diagnosis, study
from knowmri.diagnosis import diagnose_dataset
from knowmri.testing import tiny_model

METHODS = ["logit_lens", "attention_weights"]
N = 5


@pytest.fixture(scope="module")
def facts() -> km.Dataset:
    return km.load_dataset("known_1000")


def run(facts: km.Dataset, out: Path | None, **kwargs: Any) -> km.Report:
    options = {"methods": METHODS, "samples": N, "progress": False, **kwargs}
    return diagnose_dataset(facts, tiny_model("llama"), out=out, **options)


def comparable(data: dict[str, Any]) -> dict[str, Any]:
    """A report's aggregate and per-sample table without timings and provenance (which may differ)."""
    data = json.loads(json.dumps(data))
    for result in data["results"].values():
        result.pop("seconds")
    for row in data["samples"]:
        row.pop("seconds")
        row.pop("file", None)
    return {k: data[k] for k in ("model", "sample", "results", "consensus", "samples", "n_samples")}


class Crash(Exception):
    """Stands for the process dying mid-run."""


def crash_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Make the `call`-th per-sample diagnose (counting from 1) die."""
    calls = [0]
    original = diagnosis.diagnose

    def dying(*args: Any, **kwargs: Any) -> km.Report:
        calls[0] += 1
        if calls[0] == call:
            raise Crash
        return original(*args, **kwargs)

    monkeypatch.setattr(diagnosis, "diagnose", dying)


def test_each_sample_is_saved_and_the_report_equals_an_in_memory_run(facts, tmp_path):
    out = tmp_path / "run"
    report = run(facts, out)
    files = sorted(p.name for p in (out / "samples").iterdir())
    assert files == [f"{i:06d}.json" for i in range(N)]
    assert (out / "report.json").is_file() and (out / "index.html").is_file() and (out / "manifest.json").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["provenance"]["world_size"] == 1
    rows = saved["samples"]
    assert [r["index"] for r in rows] == list(range(N))
    assert all(r["file"] == f"samples/{r['index']:06d}.json" and set(r["status"]) == set(METHODS) for r in rows)
    assert all(0.0 < r["answer_prob"] < 1.0 and r["answer"] == facts[r["index"]]["ground_truth"] for r in rows)
    one = km.Report.load(out / rows[2]["file"])  # a row opens that sample's own report
    assert one.sample["prompt"] == facts[2]["prompt"] and set(one.results) == set(METHODS)
    assert comparable(saved) == comparable(run(facts, None).to_dict())
    assert comparable(saved) == comparable(report.to_dict())


def test_resume_after_a_crash_gives_the_uninterrupted_report(facts, tmp_path, monkeypatch, capsys):
    whole = run(facts, tmp_path / "whole").to_dict()
    out = tmp_path / "run"
    monkeypatch.setattr(study, "PARTIAL_EVERY", 0.0)  # a partial aggregate as often as its own cost allows
    with monkeypatch.context() as m:
        crash_at(m, 4)
        with pytest.raises(Crash):
            run(facts, out)
    assert len(list((out / "samples").glob("*.json"))) == 3 and not (out / "report.json").exists()
    partial = json.loads((out / "partial.json").read_text())
    assert 1 <= partial["partial"]["done"] <= 3 and partial["partial"]["of"] == N
    assert partial["n_samples"] == partial["partial"]["done"]
    capsys.readouterr()
    resumed = run(facts, out, resume=True, echo=True)
    assert "resuming: 3 of 5 samples already done" in capsys.readouterr().err
    assert comparable(resumed.to_dict()) == comparable(whole)
    assert resumed.meta["provenance"]["samples_found_done"] == 3
    assert not (out / "partial.json").exists()
    again = run(facts, out, resume=True)  # everything done: the report is rebuilt, nothing runs
    assert comparable(again.to_dict()) == comparable(whole)


def test_a_corrupt_sample_file_is_run_again_with_a_warning(facts, tmp_path):
    out = tmp_path / "run"
    whole = run(facts, out).to_dict()
    (out / "samples" / "000001.json").write_text('{"index": 1, "resu')  # cut short
    with pytest.warns(RuntimeWarning, match=r"000001\.json is unreadable .*: running sample 1 again"):
        resumed = run(facts, out, resume=True)
    assert comparable(resumed.to_dict()) == comparable(whole)
    assert (out / "samples" / "000001.json.corrupt").is_file()


def test_other_arguments_are_refused_by_name(facts, tmp_path):
    out = tmp_path / "run"
    run(facts, out)
    with pytest.raises(ValueError, match="--resume"):
        run(facts, out)  # without resume, an existing run is never overwritten
    cases = [({"samples": 4}, "samples 5 (now 4)"), ({"methods": ["logit_lens"]}, "methods logit_lens,attention_weights (now logit_lens)"),
             ({"seed": 1}, "seed 0 (now 1)"), ({"params": {"logit_lens": {"top_k": 3}}}, 'params {} (now {"logit_lens": {"top_k": 3}})')]
    for change, message in cases:
        with pytest.raises(ValueError, match="made with other arguments") as err:
            run(facts, out, resume=True, **change)
        assert message in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="model name 'tiny-llama' \\(now 'tiny-gpt2'\\); model architecture"):
        diagnose_dataset(facts, tiny_model("gpt2"), methods=METHODS, samples=N, progress=False, out=out, resume=True)
    other = km.Dataset([facts[i].replace(ground_truth=" Rome") if i == 2 else facts[i] for i in range(N)], name="known_1000",
                       origin="built-in")
    with pytest.raises(ValueError, match="records differ"):
        run(other, out, resume=True)


def test_an_unwritable_or_full_directory_fails_before_any_work(facts, tmp_path, monkeypatch):
    crash_at(monkeypatch, 1)  # any per-sample work would raise Crash
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot create the output directory"):
        run(facts, blocker / "run")
    monkeypatch.setattr(study.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1024})())
    with pytest.raises(ValueError, match="MiB free"):
        run(facts, tmp_path / "full")


def test_a_disk_too_small_for_the_run_is_foreseen(facts, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "MIN_FREE_BYTES", 1)
    monkeypatch.setattr(study.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 100_000})())
    with pytest.warns(RuntimeWarning, match="the 4 remaining samples need about"):
        run(facts, tmp_path / "run")  # five ~45 KB files: the four after the first do not fit in 100 KB


def test_a_failed_write_keeps_the_finished_samples(facts, tmp_path, monkeypatch):
    out = tmp_path / "run"
    whole = run(facts, tmp_path / "whole").to_dict()
    original = study.atomic_write

    def full_disk(path: Path, text: str) -> None:
        if path.name == "000002.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, text)

    with monkeypatch.context() as m:
        m.setattr(study, "atomic_write", full_disk)
        with pytest.raises(ValueError, match="No space left on device") as err:
            run(facts, out)
    assert "2 samples finished so far are kept" in str(err.value) and "--resume" in str(err.value)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["000000.json", "000001.json"]  # no partial file
    assert comparable(run(facts, out, resume=True).to_dict()) == comparable(whole)


def test_a_record_that_does_not_suit_the_model_is_noted_and_the_run_goes_on(facts, tmp_path):
    long = km.Sample(prompt="word " * 500 + "The Eiffel Tower is in", ground_truth=" Paris")
    data = km.Dataset([facts[0], long, facts[1]], name="mixed")
    report = diagnose_dataset(data, tiny_model("llama"), methods=METHODS, samples=3, progress=False, out=tmp_path / "run")
    rows = report.meta["samples"]
    assert rows[1]["error"] and "context" in rows[1]["error"] and rows[1]["status"] == {}
    assert rows[0]["error"] is None and rows[2]["status"] == {m: "ok" for m in METHODS}
    assert report["logit_lens"].findings["status_counts"] == {"ok": 2}


def test_bad_arguments_fail_before_any_work(facts, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="dataset runs"):
        km.diagnose(facts[0], tiny_model("llama"), out=tmp_path / "c")
    crash_at(monkeypatch, 1)
    with pytest.raises(ValueError, match="unknown method"):
        run(facts, tmp_path / "a", methods=["nope"])
    with pytest.raises(ValueError, match="top_k"):
        run(facts, tmp_path / "b", params={"logit_lens": {"top_k": "many"}})
    with pytest.raises(ValueError, match="output directory"):
        run(facts, None, resume=True)


def test_progress_reports_samples_and_time_left(facts, tmp_path):
    seen: list[tuple[str, float, str]] = []
    run(facts, tmp_path / "run", progress=lambda *event: seen.append(event))
    assert [e[0] for e in seen] == ["dataset"] * N and seen[-1][1] == 1.0
    assert seen[0][2].startswith("sample 1/5, ") and seen[0][2].endswith("left") and seen[-1][2] == "sample 5/5"


def test_the_estimate_is_printed_before_the_run(facts, tmp_path, capsys):
    run(facts, tmp_path / "run", echo=True)
    err = capsys.readouterr().err
    assert "estimate for 5 samples:" in err and "of compute" in err


def test_differences_finite_values_and_durations():
    old = {"model": {"name": "a", "dtype": "float32"}, "dataset": {"name": "d", "fingerprint": "x"}, "samples": 3,
           "methods": None, "params": {}, "seed": 0}
    new = {**old, "model": {"name": "a", "dtype": "bfloat16"}, "methods": ["logit_lens"]}
    assert study.differences(old, new) == ["model dtype 'float32' (now 'bfloat16')",
                                           "methods every eligible method (now logit_lens)"]
    assert study.differences(old, dict(old)) == []
    assert study.finite({"a": [float("inf"), 1.5, float("nan")]}) == {"a": [None, 1.5, None]}
    assert [study.duration(s) for s in (0.2, 40, 600, 9000)] == ["under 1 s", "about 40 s", "about 10 min", "about 2.5 h"]


def agree(a: Any, b: Any, where: str = "") -> None:
    """Two JSON values are the same up to float rounding (1e-5 relative)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            agree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            agree(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), where
    else:
        assert a == b, where


def test_a_batch_of_samples_gives_each_sample_its_one_at_a_time_results(facts, tmp_path, monkeypatch):
    """batch_size 3: the light methods' shared clean pass, attention weights' forward and integrated gradients'
    rows run for several records at once; every record's findings are those it gets alone."""
    from knowmri.methods import attention_weights, common, integrated_gradients

    methods = ["logit_lens", "attention_weights", "embedding_projection", "integrated_gradients"]
    params = {"integrated_gradients": {"steps": 4, "max_steps": 16}}
    model = tiny_model("llama")
    alone = diagnose_dataset(facts, model, methods=methods, params=params, samples=N, progress=False, out=tmp_path / "a")
    single = {"clean pass": 0, "IG": 0, "attention": 0}
    for module, name, key in ((common, "_run_clean_pass", "clean pass"), (integrated_gradients, "integrated_gradients", "IG"),
                              (attention_weights, "attention_patterns", "attention")):
        def counted(*args: Any, _f: Any = getattr(module, name), _k: str = key, **kwargs: Any) -> Any:
            single[_k] += 1
            return _f(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    batched = diagnose_dataset(facts, model, methods=methods, params=params, samples=N, progress=False,
                               out=tmp_path / "b", batch_size=3)
    assert single == {"clean pass": 0, "IG": 0, "attention": 0}  # nothing ran one sample at a time
    assert batched.meta["provenance"]["batch"] == 3 and alone.meta["provenance"]["batch"] == 1
    for i in range(N):
        a = json.loads((tmp_path / "a" / study.RunDir(tmp_path).relative(i)).read_text())
        b = json.loads((tmp_path / "b" / study.RunDir(tmp_path).relative(i)).read_text())
        assert list(a["results"]) == list(b["results"]) == methods
        for name in methods:
            assert b["results"][name]["status"] == a["results"][name]["status"] == "ok"
            agree(a["results"][name]["findings"], b["results"][name]["findings"], f"sample {i} {name}")
    for name in methods:
        agree(alone[name].findings, batched[name].findings, name)
    with pytest.raises(ValueError, match="batch_size"):
        diagnose_dataset(facts, model, methods=methods, samples=2, progress=False, batch_size=0)
    with pytest.raises(ValueError, match="for dataset runs"):
        km.diagnose(facts[0], model, batch_size=2)
    again = km.diagnose(facts, model, methods=["logit_lens"], samples=2, progress=False, batch_size=2)
    assert again.meta["provenance"]["batch"] == 2 and again.meta["n_samples"] == 2
