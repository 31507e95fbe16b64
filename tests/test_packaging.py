"""pyproject.toml declares the supported minimums; requirements.txt (the tested pins) and
requirements-old.txt (the oldest tested versions, .ci/run-old-versions) must both satisfy them."""

from __future__ import annotations

import tomllib
from helpers import REPO
from packaging.requirements import Requirement


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return {Requirement(r).name.lower(): Requirement(r) for r in [*project["dependencies"], *extras]}


def _pins(name: str) -> dict[str, str | None]:
    pins = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            version = next((s.version for s in requirement.specifier if s.operator == "=="), None)
            pins[requirement.name.lower()] = version
    return pins


def test_every_pinned_requirement_satisfies_the_declared_range() -> None:
    declared = _declared()
    for name, version in _pins("requirements.txt").items():
        assert name in declared, f"{name} is pinned in requirements.txt but not declared in pyproject.toml"
        if version is not None:
            assert declared[name].specifier.contains(version), f"{name}=={version} is outside {declared[name]}"


def test_old_versions_are_the_declared_minimums() -> None:
    declared, old = _declared(), _pins("requirements-old.txt")
    for name in ("torch", "torchvision", "transformers", "huggingface_hub", "timm", "accelerate"):
        minimum = next(s.version for s in declared[name].specifier if s.operator == ">=")
        assert old[name].startswith(minimum), f"{name}: requirements-old.txt has {old[name]}, pyproject >= {minimum}"


def test_setuptools_reads_the_project_table_without_a_deprecation_warning(monkeypatch) -> None:
    # `pip install -e .` (scripts/setup.sh) printed "`project.license` as a TOML table is deprecated" four times
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(REPO)  # the readme path is relative to the project
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), "pyproject.toml")
    assert [str(w.message).splitlines()[0] for w in caught] == []
