"""Import arrows between qalign's packages, read from the source with ``ast`` (nothing is imported).

Lower layers must not reach up: a pure module that imports an entry point drags the CLI's
dependencies (and its import-time work) into everything that uses the lower one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "qalign"


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, at top level or inside functions (lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            # ``from qalign import eval`` names a submodule through the package.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violations(package: str, forbidden: list[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT.parent)} imports {module}"
        for path in _files(package)
        for module in sorted(_imported_modules(path))
        if any(_within(module, bad) for bad in forbidden)
    ]


def test_the_walker_sees_lazy_and_from_imports(tmp_path):
    # The rules below would pass vacuously if the walker missed imports inside functions.
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from qalign.eval.runner import run_eval\nfrom qalign import collect\n")
    assert {"qalign.eval.runner", "qalign.collect"} <= _imported_modules(source)


def test_decoding_does_not_import_eval():
    # Guided policies are built from qalign.policies, which sits below both.
    assert _files("decoding")
    assert _violations("decoding", ["qalign.eval"]) == []


def test_losses_import_only_losses():
    # Pure tensor math: anything above it (trainers, rollout, models) may use it, never the reverse.
    outside = [
        f"{path.relative_to(ROOT.parent)} imports {module}"
        for path in _files("losses")
        for module in sorted(_imported_modules(path))
        if _within(module, "qalign") and not _within(module, "qalign.losses")
    ]
    assert _files("losses")
    assert outside == []


def test_losses_package_exports_every_family():
    import qalign.losses as losses

    # One name per family, so a module left out of the package namespace shows up here.
    for name in ("quantile_advantages", "shiq_loss", "dqo_losses", "value_loss", "guidance_offset", "qprobe_pg_loss"):
        assert name in losses.__all__ and callable(getattr(losses, name))


def test_trainers_do_not_import_entry_points():
    # Entry points build trainers; a trainer that needs their work (offline collection) calls the
    # library module they use (qalign.data.collection), never the command.
    entry_points = ["qalign.collect", "qalign.train", "qalign.cli", "qalign.eval.__main__", "qalign.probe.__main__",
                    "qalign.compare.__main__"]  # fmt: skip
    assert _files("trainers")
    assert _violations("trainers", entry_points) == []
