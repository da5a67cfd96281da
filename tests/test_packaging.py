"""Packaging: backends/ ships as optim_core.backends and never as a top-level module."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = out.glob("optim_core-*.whl")
    return path


def test_wheel_holds_backends_inside_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "optim_core/backends/__init__.py" in names
    assert not any(n.startswith("backends/") for n in names)
    top_levels = {n.split("/")[0] for n in names if not n.startswith("optim_core-")}
    assert top_levels == {"optim_core"}


def test_installed_package_imports_from_another_folder(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env_path = str(target)
    ok = subprocess.run(
        [sys.executable, "-c",
         "import optim_core, optim_core.backends; print(optim_core.backends.__file__)"],
        cwd=elsewhere, capture_output=True, text=True, env={"PYTHONPATH": env_path})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().startswith(str(target))
    missing = subprocess.run([sys.executable, "-c", "import backends"], cwd=elsewhere,
                             capture_output=True, text=True, env={"PYTHONPATH": env_path})
    assert missing.returncode != 0
    assert "No module named 'backends'" in missing.stderr
