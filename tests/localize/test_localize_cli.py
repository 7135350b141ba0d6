"""`knowmri localize` / `knowmri enhance`: JSON and HTML written, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knowmri.cli import main
from knowmri.testing import build_tiny
from tests.localize.conftest import capitals


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("cli")
    model = build_tiny("gpt2")
    model.hf_model.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    data = root / "capitals.jsonl"
    data.write_text("".join(json.dumps(dict(s)) + "\n" for s in capitals(12)), encoding="utf-8")
    return str(root / "model"), str(data)


def test_localize_writes_json_and_html(files: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, data = files
    code = main(["localize", "--model", model, "--dataset", data, "--top-k", "5", "--out", str(tmp_path), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "localization.json").read_text())
    assert printed["neurons"] == saved["neurons"] and len(saved["neurons"]) == 5
    assert [s["samples"] for s in saved["stability"]] == [5, 6]
    assert "Plotly" in (tmp_path / "index.html").read_text()


def test_enhance_writes_json_html_and_deltas(files: tuple[str, str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    model, data = files
    loc_dir = tmp_path / "loc"
    assert main(["localize", "--model", model, "--dataset", data, "--top-k", "4", "--out", str(loc_dir)]) == 0
    assert "neurons" in capsys.readouterr().out
    code = main(["enhance", "--model", model, "--dataset", data, "--neurons", str(loc_dir), "--epochs", "1",
                 "--out", str(tmp_path / "enh")])
    assert code == 0
    assert "located" in capsys.readouterr().out
    saved = json.loads((tmp_path / "enh" / "enhancement.json").read_text())
    assert {"located", "random", "base"} <= set(saved) and saved["params"]["neurons"] == 4
    assert (tmp_path / "enh" / "deltas_located.safetensors").is_file() and (tmp_path / "enh" / "index.html").is_file()


def test_errors_are_one_line(files: tuple[str, str], capsys: pytest.CaptureFixture) -> None:
    model, data = files
    assert main(["localize", "--model", model, "--dataset", data, "--top-k", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("knowmri: error:") and "top_k" in err[-1]
    assert main(["localize", "--model", model, "--dataset", data, "--samples", "0"]) == 2
    assert "samples" in capsys.readouterr().err
