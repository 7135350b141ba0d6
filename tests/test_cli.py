"""The command line: listings, diagnose on a local model folder, one-line errors."""

import json
import subprocess
import sys

import pytest

from knowmri.cli import main
from knowmri.testing import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.hf_model.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


def run(*args):
    return subprocess.run([sys.executable, "-m", "knowmri", *args], capture_output=True, text=True, timeout=300)


def test_methods_and_models_listings(capsys):
    assert main(["methods"]) == 0
    assert "logit_lens" in capsys.readouterr().out
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "smollm2-135m" in [p["name"] for p in data["presets"]] and "llama" in data["families"]


def test_diagnose_local_folder_writes_report(model_dir, tmp_path, capsys):
    out = tmp_path / "rep"
    code = main(["diagnose", "--model", str(model_dir), "--prompt", "The Eiffel Tower is located in the city of",
                 "--subject", "Eiffel Tower", "--target", " Paris", "--methods", "logit_lens",
                 "--param", "logit_lens.top_k=2", "--out", str(out)])
    assert code == 0
    assert (out / "report.json").is_file() and (out / "index.html").is_file()
    data = json.loads((out / "report.json").read_text())
    assert data["results"]["logit_lens"]["params"]["top_k"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["diagnose", "--prompt", ""], "prompt is empty"),
        (["diagnose", "--prompt", "Hello", "--subject", "Paris"], "does not occur"),
        (["diagnose", "--prompt", "Hello", "--methods", "nope"], "unknown method"),
        (["diagnose", "--prompt", "Hello", "--param", "oops"], "METHOD.NAME=VALUE"),
        (["diagnose", "--prompt", "Hello", "--model", "/no/such/folder"], "no such model folder"),
        (["diagnose", "--prompt", "Hello", "--model", "missing.gguf"], "no such GGUF file"),
        (["diagnose", "--prompt", "Hi", "--text", "Hi"], "exactly one input"),
    ],
    ids=["empty-prompt", "subject-not-in-prompt", "unknown-method", "bad-param", "missing-folder", "missing-gguf", "two-inputs"],
)
def test_errors_are_one_line_without_traceback(args, message):
    out = run(*args)
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if line.startswith("knowmri: error")]
    assert lines and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    model = tiny_model("bert")
    model.hf_model.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


def test_more_bad_inputs_are_one_line_errors(model_dir, bert_dir, capsys):
    cases = [
        (["diagnose", "--model", str(model_dir), "--prompt", "word " * 5000, "--methods", "logit_lens"], "longer than the model's context"),
        (["diagnose", "--model", str(bert_dir), "--prompt", "Paris is the capital of", "--methods", "self_explanation"],
         "self_explanation cannot run"),
        (["diagnose", "--model", str(model_dir), "--dataset", "no_such_dataset"], "no_such_dataset"),
        (["diagnose", "--model", str(model_dir), "--dataset", "/no/such/file.json"], "file.json"),
        (["diagnose", "--model", str(model_dir), "--dataset", "known_1000", "--index", "100000"], "out of range"),
        (["diagnose", "--model", str(model_dir), "--dataset", "known_1000", "--samples", "0"], "at least 1"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("knowmri: error") and message in err[-1], (args, err)


def test_dataset_level_diagnose(model_dir, tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["diagnose", "--model", str(model_dir), "--dataset", "known_1000", "--samples", "3",
                 "--methods", "logit_lens", "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["n_samples"] == 3 and len(data["samples"]) == 3
    assert len(data["results"]["logit_lens"]["findings"]["layer_scores"]) == tiny_model("llama").n_layers


def test_debug_flag_shows_traceback():
    out = run("--debug", "diagnose", "--prompt", "Hello", "--subject", "Paris")
    assert out.returncode != 0 and "Traceback" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "logit_lens,attention_weights", "--param", "logit_lens.top_k=abc"], "must be of type int"),
        (["--methods", "logit_lens", "--param", "integrated_gradients.steps=3"], "not among the chosen"),
        (["--methods", "logit_lens", "--param", "logit_lens.top_k=0"], "between 1 and 50"),
        (["--methods", "spine", "--param", "spine.lr=NaN"], "finite"),
        (["--methods", "spine", "--param", "spine.epochs=1000000"], "at most 10000"),
        (["--param", "nope.x=1"], "unknown method"),
        (["--methods", ""], "--methods is empty"),
        (["--target", ""], "ground_truth is empty"),
        (["--subject", ""], "triple_subject is empty"),
    ],
    ids=["bad-type", "unselected-method", "out-of-range", "nan", "epochs", "unknown-method", "no-methods",
         "empty-target", "empty-subject"],
)
def test_parameters_and_inputs_are_checked_before_the_model_loads(args, message, capsys):
    # the model does not exist: an error about it would mean the check came too late
    code = main(["diagnose", "--model", "/no/such/folder", "--prompt", "The Eiffel Tower is in", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("knowmri: error") and message in err[0], err


def test_an_unwritable_out_fails_before_the_computation(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main(["diagnose", "--model", "/no/such/folder", "--prompt", "Hello", "--out", str(blocker / "report")])
    err = capsys.readouterr().err
    assert code == 2 and "is a file, not a folder" in err and "no such model" not in err
    code = main(["diagnose", "--model", "/no/such/folder", "--prompt", "Hello", "--out", str(blocker)])
    assert code == 2 and "is a file" in capsys.readouterr().err


def test_inputs_that_do_not_go_together(capsys):
    assert main(["diagnose", "--model", "/no/such/folder", "--text", "Paris is in France", "--target", " France"]) == 2
    assert "go with --prompt" in capsys.readouterr().err
    assert main(["diagnose", "--model", "/no/such/folder", "--dataset", "known_1000", "--samples", "2",
                 "--target", " Paris"]) == 2
    assert "takes no" in capsys.readouterr().err


def test_a_misspelt_preset_fails_at_once_with_a_suggestion(capsys):
    assert main(["diagnose", "--model", "smollm2-13m", "--prompt", "Hello", "--methods", "logit_lens"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["knowmri: error: unknown preset 'smollm2-13m'; did you mean smollm2-135m?"]


def test_a_long_run_prints_its_estimate_first(model_dir, capsys, monkeypatch):
    import knowmri.cli as cli

    monkeypatch.setattr(cli, "LONG_RUN_SECONDS", 0.0)
    assert main(["diagnose", "--model", str(model_dir), "--prompt", "The Eiffel Tower is in", "--methods", "logit_lens"]) == 0
    err = capsys.readouterr().err
    assert "knowmri: this run is estimated to take" in err and "logit_lens" in err and "Ctrl+C" in err
    monkeypatch.setattr(cli, "LONG_RUN_SECONDS", 1e9)
    assert main(["diagnose", "--model", str(model_dir), "--prompt", "The Eiffel Tower is in", "--methods", "logit_lens"]) == 0
    assert "estimated" not in capsys.readouterr().err


def test_an_answer_that_is_not_whole_tokens_is_warned_about(model_dir, capsys):
    assert main(["diagnose", "--model", str(model_dir), "--prompt", "The Eiffel Tower is in", "--target", " 🗼",
                 "--methods", "logit_lens"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("knowmri: warning:")]
    assert warnings and "tokens scored" in warnings[0] and "🗼" in warnings[0]


def test_serve_refuses_negative_caps(capsys):
    assert main(["serve", "--max-run-seconds", "-1"]) == 2
    assert "must not be negative" in capsys.readouterr().err
