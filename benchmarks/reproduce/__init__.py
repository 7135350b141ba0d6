"""`make reproduce`: the published results of the methods knowmri implements, re-measured on three small models.

Each claim (one module in `claims/`) names the dataset runs it needs (`knowmri diagnose ... --out DIR --resume`
or `knowmri localize ...`), and computes its numbers, with 95% confidence intervals, from the runs' saved
per-sample files; `page.py` renders `docs/validity.md` and its figures from the per-claim JSON files in
`benchmarks/results/reproduce/<model>/<claim>.json`. Run with `python -m benchmarks.reproduce [--quick]`.
"""
