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


def _editable_install() -> bool:
    import importlib.metadata
    import json

    try:
        text = importlib.metadata.distribution("optim-core").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return False
    return bool(text) and json.loads(text).get("dir_info", {}).get("editable", False)


@pytest.mark.skipif(_editable_install(), reason="an editable install maps optim_core.backends "
                    "to its own checkout, before any other")
def test_a_source_checkout_maps_its_backends_into_the_package(tmp_path):
    # Python started in a checkout's root imports the source optim_core/, which has no
    # backends/: optim_core.backends must then be the checkout's backends/, and no
    # top-level module "backends" may appear.
    import shutil

    checkout = tmp_path / "checkout"
    for folder in ("optim_core", "backends"):
        shutil.copytree(ROOT / folder, checkout / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "import sys, numpy as np, optim_core\n"
        "opt = optim_core.Adam([np.ones(4)], impl='fused')\n"
        "opt.step([np.ones(4)])\n"
        "import optim_core.backends as b\n"
        "print(optim_core.__file__, b.__file__, 'backends' in sys.modules, "
        "opt.implementation.name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=checkout, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    package, backends, top_level, implementation = result.stdout.split()
    assert Path(package).parent == checkout / "optim_core"
    assert Path(backends) == checkout / "backends" / "__init__.py"
    assert top_level == "False" and implementation == "fused-numba"
    cli = subprocess.run([sys.executable, "-m", "optim_core", "--help"], cwd=checkout,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and "compare" in cli.stdout, cli.stderr[-2000:]
