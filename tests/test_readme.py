"""The README's first python example runs as written, on whatever device this machine has; the
package metadata has its classifiers."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    assert match, "the README has no python block"
    return match.group(1)


def test_readme_first_example_runs_as_written() -> None:
    code = first_python_block((ROOT / "README.md").read_text())
    # a fresh interpreter in the checkout (so its fastloss is the one tested), no GPU assumed
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "last loss" in result.stdout


def test_package_metadata_has_classifiers() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    classifiers = project["classifiers"]
    assert "Programming Language :: Python :: 3" in classifiers
    assert any(c.startswith("Topic :: Scientific/Engineering :: Artificial Intelligence") for c in classifiers)
    assert "License :: OSI Approved :: Apache Software License" in classifiers
