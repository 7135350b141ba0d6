"""The wheel and sdist `python -m build` makes hold the package data (architectures, built-in datasets, the
report renderer, the web UI) and take their version from `knowmri.__version__`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import knowmri

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "knowmri"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("build") is None:
        pytest.skip("needs the dev extra's build")
    out = tmp_path_factory.mktemp("dist")
    work = tmp_path_factory.mktemp("src")
    # build from a copy, so no build/ or egg-info lands in the tree
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(work / "src.tar"), "HEAD"], check=True)
    with tarfile.open(work / "src.tar") as tar:
        tar.extractall(work / "src", filter="data")
    src = work / "src"
    for path in PACKAGE.rglob("*"):  # the working tree's files, committed or not
        if path.is_file() and "__pycache__" not in path.parts:
            target = src / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], check=True,
                   capture_output=True)
    return out


def package_data() -> set[str]:
    return {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}


def test_wheel_holds_the_package_data_and_the_version(dist: Path) -> None:
    wheels = list(dist.glob("knowmri-*.whl"))
    assert [w.name for w in wheels] == [f"knowmri-{knowmri.__version__}-py3-none-any.whl"]
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
    data = package_data()
    assert {"knowmri/models/archs.toml", "knowmri/report/static/render.js", "knowmri/report/static/report.css",
            "knowmri/report/templates/report.html.j2", "knowmri/data/builtin/known_1000.jsonl"} <= data
    assert any(n.startswith("knowmri/server/static/") for n in data)
    assert data <= names, sorted(data - names)
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        assert "knowmri = knowmri.cli:main" in wheel.read(entry).decode()


def test_sdist_holds_the_sources(dist: Path) -> None:
    sdists = list(dist.glob("knowmri-*.tar.gz"))
    assert [s.name for s in sdists] == [f"knowmri-{knowmri.__version__}.tar.gz"]
    with tarfile.open(sdists[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"pyproject.toml", "knowmri/__init__.py", "knowmri/models/archs.toml"} <= names
