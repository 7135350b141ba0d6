"""`Report`: the consolidated outcome of a diagnose: report.json, index.html, arrays beside them."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knowmri.report.result import MethodResult, jsonable


def versions() -> dict[str, str]:
    """Versions that matter for reproducing a report."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("knowmri", "torch", "transformers", "accelerate", "captum"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def read_saved_json(location: str | Path, filename: str) -> tuple[Path, dict[str, Any]]:
    """The JSON file saved as `filename` in a directory (or the file itself), parsed; clear errors."""
    path = Path(location)
    file = path / filename if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no {filename} at {path}")
    try:
        return file, json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err


def knowmri_version() -> str:
    from knowmri import __version__

    return __version__


@dataclass
class Report:
    """Results of several methods on one sample (or a dataset), and what they agree on (docs/REPORT.md)."""

    model: dict[str, Any]
    sample: dict[str, Any]
    results: dict[str, MethodResult] = field(default_factory=dict)
    consensus: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> MethodResult:
        return self.results[name]

    @property
    def ok(self) -> list[str]:
        return [n for n, r in self.results.items() if r.status == "ok"]

    def to_dict(self) -> dict[str, Any]:
        """The report.json structure."""
        return jsonable({
            "knowmri_version": knowmri_version(),
            "versions": self.meta.get("versions") or versions(),
            "model": self.model,
            "sample": self.sample,
            "results": {name: r.to_dict() for name, r in self.results.items()},
            "consensus": self.consensus,
            **{k: v for k, v in self.meta.items() if k != "versions"},
        })

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, directory: str | Path) -> Path:
        """Write report.json, a self-contained index.html and large arrays (arrays/*.npy) to `directory`."""
        import numpy as np

        from knowmri.report.html import render_html

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        files = {}
        for name, result in self.results.items():
            for key, array in result.arrays.items():
                path = out / "arrays" / f"{name}.{key}.npy"
                path.parent.mkdir(exist_ok=True)
                value = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
                np.save(path, value, allow_pickle=False)
                files.setdefault(name, {})[key] = str(path.relative_to(out))
        if files:
            data["arrays"] = files
        (out / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (out / "index.html").write_text(render_html(data), encoding="utf-8")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        if not isinstance(data, dict) or "results" not in data:
            raise ValueError("not a knowmri report: it has no 'results'")
        extra = {k: v for k, v in data.items() if k not in ("model", "sample", "results", "consensus", "knowmri_version")}
        return cls(model=data.get("model", {}), sample=data.get("sample", {}),
                   results={k: MethodResult.from_dict(v) for k, v in data["results"].items()},
                   consensus=data.get("consensus", {}), meta=extra)

    @classmethod
    def load(cls, directory: str | Path) -> Report:
        """Reopen a saved report (its directory or its report.json); arrays are loaded too."""
        import numpy as np

        file, data = read_saved_json(directory, "report.json")
        report = cls.from_dict(data)
        for name, arrays in (data.get("arrays") or {}).items():
            for key, rel in arrays.items():
                if name in report.results and (file.parent / rel).is_file():
                    report.results[name].arrays[key] = np.load(file.parent / rel, allow_pickle=False)
        return report

    def summary(self) -> str:
        """A few plain-language lines: each method's summary and the consensus verdict."""
        lines = [f"{self.model.get('name')} on {self.sample.get('prompt') or self.sample.get('dataset')!r}"]
        for name, r in self.results.items():
            lines.append(f"- {name} [{r.status}]: {r.summary or r.error or ''}")
        if self.consensus.get("verdict"):
            lines.append(f"Consensus: {self.consensus['verdict']}")
        return "\n".join(lines)

    def is_dataset(self) -> bool:
        """Whether this report aggregates a dataset run (its `sample` names a dataset, not a prompt)."""
        return "dataset" in self.sample and "prompt" not in self.sample

    def _repr_html_(self) -> str:
        """The report drawn inline in Jupyter, JupyterLab and VS Code, as index.html draws it."""
        from knowmri.report.notebook import notebook_html

        return notebook_html(self.to_dict())

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/html": self._repr_html_(), "text/plain": self.summary()}

    def show(self, method: str | list[str] | None = None) -> None:
        """Show the report (or only the named method's result, or methods' results) in the running notebook."""
        from knowmri.report import notebook

        data = notebook.select(self.to_dict(), method)
        text = "\n".join(line for line in self.summary().splitlines()
                         if method is None or not line.startswith("- ") or line[2:].split(" [")[0] in data["results"])
        notebook.display_html(notebook.notebook_html(data), text)

    def token_scores(self, directory: str | Path | None = None) -> Any:
        """A tidy DataFrame of every method's token scores: `method`, `index`, `token`, `role`, `score`, ...

        `role` is the token's role where the findings name it, else None. For a dataset report, one row per
        sample, method and token (`sample` column), from each sample's results: held by the report, or saved
        in the run `directory`'s per-sample files."""
        from knowmri.report import frames

        if not self.is_dataset():
            return frames.frame(frames.token_rows(self.results), frames.TOKEN_COLUMNS)
        rows = [row for index, results in frames.per_sample_results(self.meta.get("samples") or [], directory)
                for row in frames.token_rows(results, sample=index)]
        return frames.frame(rows, ("method", "sample", *frames.TOKEN_COLUMNS[1:]))

    def layer_scores(self) -> Any:
        """A tidy DataFrame of every method's layer scores: `method`, `layer`, `score` (mean over the samples
        of a dataset report), and `basis` where the method says what it measures."""
        from knowmri.report import frames

        return frames.frame(frames.layer_rows(self.results), frames.LAYER_COLUMNS)

    def neurons(self) -> Any:
        """A tidy DataFrame of every method's neurons, best first: `method`, `layer`, `unit`, `expert` (where a
        neuron has one), `score`, `generic`, `rank` and what else the method reports (for a dataset report,
        the most frequently located neurons with their `count`)."""
        from knowmri.report import frames

        rows = frames.neuron_rows(self.results)
        return frames.frame(rows, frames.neurons_columns(rows))
