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

    # Every distribution of the name: an editable install leaves an optim_core.egg-info in
    # the checkout's root, which a run from there finds first and which has no direct_url.
    for distribution in importlib.metadata.distributions(name="optim-core"):
        text = distribution.read_text("direct_url.json")
        if text and json.loads(text).get("dir_info", {}).get("editable", False):
            return True
    return False


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


# --------------------------------------------------------------------------- extras
TOOLKIT_EXTRAS = {"tqdm", "scikit-learn", "matplotlib"}


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines()
            if line.startswith("Requires-Dist:")]


def _name(requirement: str) -> str:
    import re

    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_the_core_install_is_numpy_array_api_compat_numba_and_threadpoolctl_alone(wheel):
    # threadpoolctl (pure Python, no dependencies): fit's scoped limit on BLAS threads.
    requirements = _requirements(wheel)
    core = {_name(r) for r in requirements if "extra ==" not in r}
    assert core == {"numpy", "array-api-compat", "numba", "threadpoolctl"}
    train = {_name(r) for r in requirements if "extra == \"train\"" in r}
    assert train == TOOLKIT_EXTRAS
    # CI installs ".[test,torch]": the test extra brings the toolkit's extras too.
    test = {_name(r) for r in requirements if "extra == \"test\"" in r}
    assert TOOLKIT_EXTRAS <= test


def test_without_the_train_extra_the_optimizers_work_and_the_toolkit_says_what_to_install():
    # As if tqdm, scikit-learn and matplotlib were not installed.
    script = """
import sys
for name in ("tqdm", "sklearn", "matplotlib"):
    sys.modules[name] = None
import numpy as np
import optim_core
from optim_core import datasets, fit, models, tools
from optim_core.optim.registry import OPTIMIZERS
from optim_core.tools import cli

for name, cls in OPTIMIZERS.items():
    params = {"w": np.ones(3, np.float32), "b": np.zeros((), np.float32)}
    before = params["w"].copy()
    opt = cls(params)
    for _ in range(2):  # two: ADOPT's first step only initializes its second moment
        opt.step({"w": np.full(3, 0.5, np.float32), "b": np.array(0.5, np.float32)})
    assert not np.array_equal(params["w"], before), name
X = np.random.default_rng(0).normal(size=(40, 3))
y = X.sum(axis=1)
history = fit(models.LinearRegression(3), X, y, optimizer="adam", lr=0.1, epochs=3,
              progress=False, seed=0)
assert history.train_loss[-1] < history.train_loss[0]
for call in (lambda: fit(models.LinearRegression(3), X, y, epochs=1, seed=0),
             lambda: datasets.load("digits"),
             lambda: tools.tune(models.LinearRegression(3), X, y, optimizers=["sgd"],
                                lrs=[0.1], batch_sizes=[8], k=2, epochs=1)):
    try:
        call()
    except ImportError as exc:
        assert "pip install 'optim-core[train]'" in str(exc), exc
    else:
        raise AssertionError("no ImportError")
assert datasets.load("synthetic", n_samples=40).X_train.shape == (30, 20)
assert cli.main(["compare", "--no-progress"]) == 1
assert not [m for m in ("tqdm", "sklearn", "matplotlib") if sys.modules.get(m)]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    assert "scikit-learn, which is not installed" in result.stderr
