"""Capability localisation and enhancement on SmolLM2-135M (the README's numbers; a benchmark, not a test).

    .venv/bin/python benchmarks/bench_localize.py            # ~5-10 minutes on 2 CPU cores

1. Localise over GSM8K (worked solutions, first 16 tokens, teacher-forced) and Emotion (the
   label word): the located neurons, the stability curve (overlap and IoU between two
   disjoint halves as the samples per half grow), the layer distribution.
2. Compare the two localisations: which neurons do math and emotion share?
3. Enhance on Emotion: fine-tune only the neurons located on records 0..n-1, on a training
   split of the next n records, against as many random neurons (layer-matched) and no tuning;
   held-out loss and accuracy per arm.

Reads the full public files when present (/work/shared/data/...), else the built-in samples.
Writes benchmarks/results/localize.json and benchmarks/results/localize.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import knowmri as km
from knowmri.localize import compare_localizations, enhance, localize

GSM8K = Path("/work/shared/data/gsm8k/test.jsonl")
EMOTION = Path("/work/shared/data/emotion/test.txt")
GSM8K_OPTS = {"answer_key": "reasoning", "max_answer_tokens": 16, "template": "Question: {prompt}\nAnswer:"}


def _data(name: str, path: Path, limit: int) -> km.Dataset:
    return km.load_dataset(name, path=str(path), limit=limit) if path.is_file() else km.load_dataset(name, limit=limit)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gsm8k", type=int, default=40, help="GSM8K samples to localise over")
    p.add_argument("--emotion", type=int, default=64, help="Emotion samples to localise over (and as many to enhance on)")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = km.load_model("smollm2-135m")
    results: dict = {"model": model.info(), "command": "python benchmarks/bench_localize.py " + " ".join(argv or sys.argv[1:]),
                     "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
                     "params": vars(args)}
    gsm = _data("gsm8k", GSM8K, args.gsm8k)
    emo_all = _data("emotion", EMOTION, 2 * args.emotion)
    emo_locate, emo_tune = emo_all[: args.emotion], emo_all[args.emotion: 2 * args.emotion]
    runs = {}
    for name, data, opts in (("gsm8k", gsm, GSM8K_OPTS), ("emotion", emo_locate, {})):
        start = time.perf_counter()
        loc = localize(data, model, top_k=args.top_k, **opts)
        runs[name] = loc
        results[name] = {"samples": len(data), "source": data.origin, "seconds": round(time.perf_counter() - start, 1),
                         "stability": loc.stability, "neurons": loc.neurons[:20], "summary": loc.summary,
                         "layers": [d for d in loc.layer_distribution if d["count"]], "options": opts}
        print(loc.summary, file=sys.stderr)
    cmp = compare_localizations(runs["gsm8k"], runs["emotion"])
    results["shared"] = {k: cmp[k] for k in ("k_a", "k_b", "n_shared", "overlap", "iou", "layers_shared")}
    results["shared"]["neurons"] = cmp["shared"][:20]
    start = time.perf_counter()
    enh = enhance(emo_tune, model, runs["emotion"], epochs=args.epochs, lr=args.lr, eval_fraction=0.5)
    results["enhance"] = {"dataset": "emotion", "samples": len(emo_tune), "seconds": round(time.perf_counter() - start, 1),
                          "params": enh.params, "arms": enh.arms, "summary": enh.summary}
    print(enh.summary, file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "localize.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "localize.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    return 0


def markdown(r: dict) -> str:
    """The README snippet: stability curves, shared neurons, enhancement arms, and the command."""
    lines = [f"Capability localisation on {r['model']['name']} ({r['model']['n_layers']} layers x {r['model']['d_mlp']} "
             f"neurons), top-{r['params']['top_k']} neurons by mean |activation x gradient|:", "",
             "| dataset | samples per half | overlap | IoU |", "|---|---|---|---|"]
    for name in ("gsm8k", "emotion"):
        for s in r[name]["stability"]:
            lines.append(f"| {name} | {s['samples']} | {s['overlap']:.0%} | {s['iou']:.2f} |")
    lines += [""]
    for name in ("gsm8k", "emotion"):
        top = ", ".join(f"L{d['layer']}: {d['count']}" for d in sorted(r[name]["layers"], key=lambda d: -d["count"])[:4])
        lines.append(f"- {name} ({r[name]['samples']} samples, {r[name]['seconds']} s): located neurons per layer {top}")
    s = r["shared"]
    lines.append(f"- shared by gsm8k and emotion: {s['n_shared']} of {s['k_a']} neurons (IoU {s['iou']:.2f}), "
                 f"in layers {', '.join(str(x['layer']) for x in s['layers_shared']) or 'none'}")
    e = r["enhance"]
    lines += ["", f"Enhancement on emotion ({e['params']['train']} training / {e['params']['held_out']} held-out samples, "
              f"{e['params']['epochs']} epochs, Adam lr {e['params']['lr']}, {e['params']['neurons']} neurons per tuned arm, "
              f"{e['seconds']} s):", "", "| arm | held-out loss | accuracy | first-token accuracy |", "|---|---|---|---|"]
    for arm in ("base", "random", "located"):
        a = e["arms"][arm]
        lines.append(f"| {arm} | {a['loss']:.3f} | {a['accuracy']:.0%} | {a['first_token_accuracy']:.0%} |")
    lines += ["", f"Command: `{r['command'].strip()}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
