"""A built wheel holds every package: pyproject lists packages explicitly (editable installs hide a
missing one; dsla_model.engine was missing, so `pip install .` had no engine)."""
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the CI machine's)

ROOT = Path(__file__).resolve().parents[2]


def test_every_python_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("kernels", "dsla_model", "distill_workers", "deploy")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found == listed
