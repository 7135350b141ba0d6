"""`make reproduce`'s code path on a tiny model: the claims compute from saved dataset runs and the page renders.

The real runs (three presets, hours) are `make reproduce`; here every claim reads tiny runs made with the
same dataset machinery (a tiny random model, 2-3 built-in known facts, the cheapest settings), so the
per-sample keys the claims read are the methods' real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import knowmri as km
from knowmri.diagnosis import diagnose_dataset
from knowmri.testing import tiny_model

pytest.importorskip("benchmarks.reproduce")

from benchmarks.reproduce import common, page  # noqa: E402
from benchmarks.reproduce.claims import CLAIMS, circuits, dominance, neurons, patchscopes, tracing  # noqa: E402

FAST = {"causal_tracing": {"samples": 2}, "integrated_gradients": {"steps": 4, "max_steps": 4},
        "knowledge_neurons": {"steps": 2, "controls": 0, "paraphrases": 0},
        "knowledge_circuits": {"ig_steps": 1}, "patchscopes": {"max_new_tokens": 1}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[common.Ctx, Path]:
    out = tmp_path_factory.mktemp("reproduce")
    model = tiny_model("llama")
    ctx = common.Ctx("tiny", out, quick=True)
    ctx._model = model
    facts = km.load_dataset("known_1000", limit=3)
    para = km.Dataset([km.Sample(prompt=s["prompt"], prompts=[s["prompt"], s["prompt"] + ","],
                                 ground_truth=s["ground_truth"], triple_subject=s["triple_subject"],
                                 relation_id=f"P{i}") for i, s in enumerate(facts)], name="pararel")

    def run(name: str, data: km.Dataset, methods: list[str], params: dict | None = None) -> None:
        diagnose_dataset(data, model, methods=methods, params={m: FAST[m] for m in methods if m in FAST} | (params or {}),
                         samples=3, out=ctx.run_dir(name), progress=False)

    run(tracing.NAME, facts, ["causal_tracing"])
    run(dominance.NAME, facts, ["integrated_gradients"])
    run(neurons.NAME, para, ["knowledge_neurons"], {"knowledge_neurons": {**FAST["knowledge_neurons"], "threshold": 0.0}})
    run(circuits.NAME, facts, ["knowledge_circuits"])
    run(patchscopes.NAME, facts, ["patchscopes"])
    bare = km.Dataset([km.Sample(prompt=s["prompt"], ground_truth=s["ground_truth"]) for s in facts], name="bare")
    run(patchscopes.NAME + "_identity", bare, ["patchscopes", "logit_lens"],
        {"patchscopes": {"max_new_tokens": 1, "target_prompt": patchscopes.IDENTITY}, "logit_lens": {"positions": "last"}})
    for name in ("gsm8k", "emotion"):
        data = km.load_dataset(name, limit=4)
        km.localize(data, model, top_k=5, counts=[1, 2], **({"answer_key": "reasoning", "max_answer_tokens": 4}
                                                            if name == "gsm8k" else {})).save(ctx.run_dir(f"capability_{name}"))
    return ctx, out


def test_claims_compute_from_saved_runs(saved: tuple[common.Ctx, Path]) -> None:
    ctx, _ = saved
    for name, mod in CLAIMS.items():
        result = mod.compute(ctx)
        assert result["claim"] == name and result["verdict"] and result["why"]
        assert result["n"] >= 1, name
        assert "knowmri " in result["command"]
        common.save(ctx, name, json.loads(json.dumps(result, default=float)))
    tr = json.loads((ctx.dir / "tracing.json").read_text())
    assert tr["n"] == 3 and tr["total_effect"]["low"] <= tr["total_effect"]["mean"] <= tr["total_effect"]["high"]
    assert set(tr["peaks"]) == {"hidden", "mlp", "attn"}
    assert json.loads((ctx.dir / "dominance.json").read_text())["methods"]["integrated_gradients"]["n"] == 3


def test_page_renders_every_row(saved: tuple[common.Ctx, Path], tmp_path: Path) -> None:
    ctx, out = saved
    for name, mod in CLAIMS.items():
        if not (ctx.dir / f"{name}.json").exists():
            common.save(ctx, name, json.loads(json.dumps(mod.compute(ctx), default=float)))
    path = page.write(out, tmp_path / "validity.md", ["tiny"], list(CLAIMS), quick=True)
    text = path.read_text()
    for mod in CLAIMS.values():
        assert f"## {mod.TITLE}" in text
    assert "n=3 of 4 targeted" in text  # known_1000 rows: 3 facts run, 4 targeted under --quick
    assert "knowmri diagnose --model tiny" in text and "## How long each model took" in text


def test_data_parallel_runs_use_accelerate_cpu_processes() -> None:
    assert common.launcher(1)[1:] == ["-m", "knowmri"]
    cmd = common.launcher(2)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[-2:] == ["-m", "knowmri"]
