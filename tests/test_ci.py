"""CI: .ci/run gives plain-text logs even where the runner forces colours."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ANSI_ESCAPE = "\x1b["

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_ci_logs_carry_no_ansi_colour_codes(tmp_path):
    """.ci/run in a scratch checkout whose README test command runs a failing pytest and a
    failing pip install, then its ruff finds an unused import; the runner forces colours."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "ruff").exists():
        pytest.skip("ruff is not installed next to this Python")
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text(":\n")
    (tmp_path / "test_fails.py").write_text("import os\n\n\ndef test_fails():\n"
                                            "    assert 1 == 2\n")
    command = (f"{sys.executable} -m pytest -p no:cacheprovider test_fails.py || true; "
               f"{sys.executable} -m pip install --no-index no-such-package-optim-core-ci "
               "|| true")
    (tmp_path / "README.md").write_text(f"<!-- test-command -->\n```bash\n{command}\n```\n")
    env = {**os.environ, "FORCE_COLOR": "1", "CLICOLOR_FORCE": "1", "PY_COLORS": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    # Each tool ran and reported an error (which is where colours would show) ...
    assert "assert 1 == 2" in log and "No matching distribution" in log and "F401" in log, log
    assert done.returncode != 0  # ruff's finding fails the run
    # ... in plain text.
    assert ANSI_ESCAPE not in log, log[max(0, log.find(ANSI_ESCAPE) - 200):][:400]
