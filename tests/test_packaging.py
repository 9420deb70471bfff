"""The wheel ships fastloss/kernels/*.py (setup.py maps kernels/ there) and imports when installed;
the editable install this suite runs under resolves fastloss.kernels to the kernels/ folder."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(out)],
        check=True,
        cwd=out,
    )
    (path,) = out.glob("fastloss-*.whl")
    return path


def test_wheel_contains_kernels(wheel: pathlib.Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    kernel_files = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert kernel_files, "no kernel sources found"
    for name in kernel_files:
        assert f"fastloss/kernels/{name}" in names
    assert "fastloss/ops/pointwise.py" in names
    assert not any(n.startswith(("tests/", "bench/", "kernels/")) for n in names)


def test_wheel_installs_and_imports(wheel: pathlib.Path, tmp_path: pathlib.Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )
    code = (
        "import fastloss, fastloss.kernels.pointwise as k, fastloss.ops.pointwise, pathlib, sys;"
        f"assert pathlib.Path(fastloss.__file__).is_relative_to({str(target)!r}), fastloss.__file__;"
        f"assert pathlib.Path(k.__file__).is_relative_to({str(target)!r}), k.__file__;"
        "print(fastloss.MSELoss()(__import__('torch').ones(3), __import__('torch').zeros(3)).item())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True,
        cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert result.stdout.strip() == "1.0"


def test_editable_layout_maps_kernels() -> None:
    """In an editable install (fastloss imported from a checkout), fastloss.kernels is that
    checkout's kernels/ folder."""
    code = "import fastloss, fastloss.kernels.pointwise as k; print(fastloss.__file__); print(k.__file__)"
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                            cwd="/")
    package, kernel = (pathlib.Path(line).resolve() for line in result.stdout.split())
    checkout = package.parent.parent
    if not (checkout / "kernels" / "pointwise.py").is_file():
        pytest.skip(f"fastloss is not an editable install from a checkout ({package})")
    assert kernel == (checkout / "kernels" / "pointwise.py").resolve()
