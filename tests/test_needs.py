"""A missing test prerequisite is a skip on a developer's machine and a failure in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_pytest(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    test = tmp_path / "test_prerequisite.py"
    test.write_text("from tests.needs import require\n\nrequire('no_such_package_qalign')\n\n"
                    "def test_uses_it():\n    assert True\n")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                          cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip


def test_missing_package_skips_outside_ci(tmp_path):
    result = run_pytest(tmp_path, ci=False)
    assert result.returncode == 5 and "1 skipped" in result.stdout  # 5: pytest ran no test (all skipped)


def test_missing_package_fails_in_ci(tmp_path):
    result = run_pytest(tmp_path, ci=True)
    assert result.returncode != 0
    assert "no_such_package_qalign is not importable" in result.stdout and "CI must have it" in result.stdout
