"""A production (non-dev) install runs: every runtime import is a declared runtime dependency, and the demo
runs with the dev extra's packages made unimportable.

A fresh venv built from the lock without ``dev`` takes far longer than this test's 3-minute budget here (torch,
flwr[simulation]/ray, prefect), so the install is checked in two parts instead:

1. statically: every third-party module that ``flows``, ``tasks`` and ``schemas`` import (lazy imports in
   functions included) belongs to a distribution named in ``[project.dependencies]`` (not only reached through
   another package, not only in ``dev``); the optional ``s3`` extra is the one exception, and it is imported
   only behind :func:`tasks.extras.require_store_protocol`;
2. dynamically: ``fedscan demo`` runs in a subprocess whose ``sitecustomize`` swaps site-packages for a view
   without every dev-only distribution (those that ``dev`` pulls in and the runtime dependencies and ``s3`` do
   not: modules and metadata), in its children too (Ray workers, Flower apps): a runtime import of an oracle
   (scikit-image was one, before #20) fails the demo, and so does a federated run that fails.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"flows", "tasks", "schemas"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _closure(requirements: list[str]) -> set[str]:
    """The installed distributions these requirements pull in (markers evaluated, extras followed)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # an optional dependency of a dependency, not installed here
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(sub)
    return {name for name, _ in seen}


def _imports() -> dict[str, set[str]]:
    """Top-level third-party module → the first-party files that import it."""
    found: dict[str, set[str]] = {}
    for pkg in sorted(FIRST_PARTY):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_runtime_import_is_a_declared_runtime_dependency():
    project = _project()
    declared = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    s3 = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["s3"]}
    # optional extras outside the lock (not installed here): their module must be imported under a guard
    unlocked = {
        canonicalize_name(Requirement(r).name)
        for extra, reqs in project["optional-dependencies"].items()
        if extra not in ("s3", "dev")
        for r in reqs
    }
    owners = md.packages_distributions()
    undeclared = {}
    for module, files in _imports().items():
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        if not dists and canonicalize_name(module) in unlocked:
            continue
        assert dists, f"{module} (imported by {sorted(files)}) belongs to no installed distribution"
        if not dists & (declared | s3):
            undeclared[module] = (sorted(dists), sorted(files)[:3])
    assert not undeclared, f"imported at runtime but not in [project.dependencies]: {undeclared}"


def _dev_only_modules() -> list[str]:
    project = _project()
    runtime = _closure(project["dependencies"]) | _closure(project["optional-dependencies"]["s3"])
    dev_only = _closure(project["optional-dependencies"]["dev"]) - runtime
    owners = md.packages_distributions()
    modules = sorted(
        m
        for m, dists in owners.items()
        if {canonicalize_name(d) for d in dists} <= dev_only and re.fullmatch(r"[A-Za-z_][\w]*", m)
    )
    return modules


def test_the_dev_extra_has_dev_only_packages_to_hide():
    hidden = _dev_only_modules()
    for oracle in ("pytest", "hypothesis", "moto", "bm3d", "astra", "mypy"):  # the test below would prove little
        assert oracle in hidden, oracle
    assert not {"skimage", "torch", "prefect", "zarr", "flwr"} & set(hidden)


_SITECUSTOMIZE = """
    import sys

    # Swap the real site-packages for a view of it without the dev-only packages: they are then absent as in a
    # production install (ModuleNotFoundError, find_spec None, no metadata), here and in every child process
    # (Ray's workers, Flower's apps) that inherits PYTHONPATH.
    sys.path[:] = [{filtered!r} if p == {real!r} else p for p in sys.path]
"""


def _site_packages_without_dev(target: Path) -> Path:
    """A folder of symlinks to every entry of site-packages except the dev-only distributions' modules and
    metadata."""
    import sysconfig

    real = Path(sysconfig.get_paths()["purelib"])
    hidden = set(_dev_only_modules())
    project = _project()
    runtime = _closure(project["dependencies"]) | _closure(project["optional-dependencies"]["s3"])
    dev_only = _closure(project["optional-dependencies"]["dev"]) - runtime
    target.mkdir()
    for entry in real.iterdir():
        name = entry.name
        if name.endswith((".dist-info", ".egg-info")):
            dist = canonicalize_name(re.sub(r"-[^-]+$", "", name.rsplit(".", 1)[0]))
            if dist in dev_only:
                continue
        elif name.split(".")[0] in hidden:
            continue
        (target / name).symlink_to(entry)
    return real


_PROBE = """
import importlib.util
hidden = all(importlib.util.find_spec(m) is None for m in ("pytest", "hypothesis", "moto", "bm3d", "mypy"))
present = all(importlib.util.find_spec(m) is not None for m in ("torch", "skimage", "prefect", "flwr", "zarr"))
print("hidden" if hidden else "visible", "present" if present else "missing")
"""


@pytest.mark.slow
def test_the_demo_runs_without_the_dev_extra(tmp_path):
    filtered = tmp_path / "site-packages"
    real = _site_packages_without_dev(filtered)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(_SITECUSTOMIZE.format(filtered=str(filtered), real=str(real)))
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "FEDSCAN_DEVICE": "cpu",
    }
    env.pop("PREFECT_API_URL", None)  # the embedded default: a temporary server, as a first-time user gets
    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.split() == ["hidden", "present"], probe.stderr  # hiding works
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--out", str(out), "--sites", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo complete" in done.stdout
    (report,) = (out / "reports").glob("report-*.html")
    html = report.read_text()
    assert "4 scans processed, 0 skipped (0 up to date, 0 known failures), 0 failed; federated: finished" in html
