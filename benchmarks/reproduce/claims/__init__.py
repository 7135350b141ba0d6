"""The claims reproduced, in the page's order (each module: NAME, TITLE, PAPER, DATA, `run(ctx)`, `compute(ctx)`)."""

from benchmarks.reproduce.claims import capability, circuits, dominance, neurons, patchscopes, tracing

CLAIMS = {m.NAME: m for m in (tracing, neurons, dominance, circuits, patchscopes, capability)}
