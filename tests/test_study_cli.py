"""Dataset runs from the command line: killed with SIGKILL and resumed, and dealt over two CPU processes by
`accelerate launch` (gloo), each time ending with the one-process report; one-line errors for bad runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from knowmri import diagnosis
from knowmri.cli import main
from knowmri.testing import tiny_model

ROOT = str(Path(__file__).resolve().parents[1])
N = 5
KILL_AT = 4  # the per-sample diagnose that SIGKILLs its own process (samples 0..2 are saved by then)

# The CLI in a process that kills itself with SIGKILL while it computes sample KILL_AT - 1.
KILLED = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from knowmri import diagnosis
from knowmri.cli import main
original, calls = diagnosis.diagnose, [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
diagnosis.diagnose = dying
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.hf_model.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


def arguments(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["diagnose", "--model", str(model_dir), "--dataset", "known_1000", "--samples", str(N),
            "--methods", "logit_lens,attention_weights", "--out", str(out), "--device", "cpu", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "TQDM_DISABLE": "1"}


def comparable(out: Path) -> dict[str, Any]:
    data = json.loads((out / "report.json").read_text())
    for result in data["results"].values():
        result.pop("seconds")
    for row in data["samples"]:
        row.pop("seconds")
    return {k: data[k] for k in ("model", "sample", "results", "consensus", "samples", "n_samples")}


@pytest.fixture(scope="module")
def one_process(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same command run whole in this (one-thread) process."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(arguments(model_dir, out, "--json")) == 0
    return out


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_report(model_dir, one_process, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(root=ROOT, kill_at=KILL_AT))
    killed = subprocess.run([sys.executable, str(script), *arguments(model_dir, out)], env=env(), capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in (out / "samples").glob("*.json")) == [f"{i:06d}.json" for i in range(KILL_AT - 1)]
    assert not (out / "report.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "knowmri", *arguments(model_dir, out, "--resume")], env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {KILL_AT - 1} of {N} samples already done" in resumed.stderr
    assert comparable(out) == comparable(one_process)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_resume_to_the_same_report(model_dir, one_process, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original, calls = diagnosis.diagnose, [0]

    def failing(*args: Any, **kwargs: Any) -> Any:  # a first session stops after samples 0 and 1
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("stopped")
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(diagnosis, "diagnose", failing)
        assert main(arguments(model_dir, out)) == 2
    assert len(list((out / "samples").glob("*.json"))) == 2
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "knowmri", *arguments(model_dir, out, "--resume", "--json")]
    done = subprocess.run(launch, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming: 2 of {N} samples already done" in done.stderr
    assert done.stderr.count("resuming:") == 1  # the main process speaks, the other does not
    data = json.loads(done.stdout)  # only the main process prints the report
    assert data["provenance"]["world_size"] == 2
    assert json.loads((out / "report.json").read_text())["provenance"]["world_size"] == 2
    assert comparable(out) == comparable(one_process)


def test_bad_dataset_runs_are_one_line_errors(model_dir, one_process, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        (["diagnose", "--model", str(model_dir), "--prompt", "Hello", "--resume"], "--resume continues a dataset run"),
        (["diagnose", "--model", str(model_dir), "--dataset", "known_1000", "--samples", "2", "--resume"], "--out DIR"),
        (arguments(model_dir, blocker / "run"), "is a file, not a folder"),
        (arguments(model_dir, one_process), "rerun with --resume"),
        ([*arguments(model_dir, one_process, "--resume"), "--param", "logit_lens.top_k=2"],
         'params {} (now {"logit_lens": {"top_k": 2}})'),
    ]
    cases += [([*arguments(model_dir, tmp_path / "b"), "--batch-size", "0"], "--batch-size must be at least 1"),
              (["diagnose", "--model", str(model_dir), "--prompt", "Hello", "--batch-size", "2"], "for dataset runs")]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("knowmri: error") and message in err[-1], (args, err)


def test_a_batched_run_resumes_a_one_at_a_time_run(model_dir, one_process, tmp_path, capsys):
    """--batch-size changes how records are computed, not what: it may resume a run made one at a time."""
    out = tmp_path / "run"
    assert main(arguments(model_dir, out)) == 0
    for name in ("report.json", "samples/000001.json", "samples/000003.json", "samples/000004.json"):
        (out / name).unlink()  # as if stopped: three records to go
    capsys.readouterr()
    assert main(arguments(model_dir, out, "--resume", "--batch-size", "3", "--json")) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["provenance"]["batch"] == 3 and data["provenance"]["samples_found_done"] == 2
    assert_same(comparable(out), comparable(one_process))


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """The same JSON data up to float rounding (a batch's forward may round differently from one alone)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), where
    else:
        assert a == b, where
