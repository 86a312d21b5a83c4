"""The wheel and the sdist: built with ``python -m build`` into a temporary directory (the sdist from the tree,
the wheel from the sdist, so the sdist is shown to be enough to build it), checked with
``twine check --strict`` and opened to see what they hold.

The build runs in build's isolated environment, which installs pyproject.toml's build requirements
(setuptools>=68, wheel) from the package index pip is configured with: it needs that index (PyPI or a local
mirror). When the isolated build fails and the running interpreter already has setuptools>=68 and wheel, it is
retried with ``--no-isolation``; otherwise the test fails with build's output. It never skips. Cost: about
10 s.

The sdist also carries what the distribution builds install besides the Python package (MANIFEST.in): the
licence, the systemd units, sysusers and tmpfiles files, and the configuration templates.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import fleetprov

ROOT = Path(__file__).resolve().parents[2]
VERSION = fleetprov.__version__


@dataclass(frozen=True)
class Dists:
    wheel: Path
    sdist: Path
    isolated: bool


def _has_build_requirements() -> bool:
    try:
        setuptools_version = importlib.metadata.version("setuptools")
        importlib.metadata.version("wheel")
    except importlib.metadata.PackageNotFoundError:
        return False
    return int(setuptools_version.split(".")[0]) >= 68


def _build(outdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(outdir), *extra, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dists]:
    outdir = tmp_path_factory.mktemp("dist")
    result = _build(outdir)
    isolated = True
    if result.returncode != 0 and _has_build_requirements():
        result = _build(outdir, "--no-isolation")
        isolated = False
    assert result.returncode == 0, f"python -m build failed:\n{result.stdout}\n{result.stderr}"
    wheels = sorted(outdir.glob("*.whl"))
    sdists = sorted(outdir.glob("*.tar.gz"))
    assert [path.name for path in wheels] == [f"fleetprov-{VERSION}-py3-none-any.whl"]
    assert [path.name for path in sdists] == [f"fleetprov-{VERSION}.tar.gz"]
    yield Dists(wheels[0], sdists[0], isolated)


def test_twine_check_strict(dists: Dists) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(dists.wheel), str(dists.sdist)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_wheel_contents(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as wheel:
        names = wheel.namelist()
        metadata = email.parser.Parser().parsestr(wheel.read(f"fleetprov-{VERSION}.dist-info/METADATA").decode())
        entry_points = wheel.read(f"fleetprov-{VERSION}.dist-info/entry_points.txt").decode()
    top = {name.split("/")[0] for name in names}
    assert top == {"fleetprov", f"fleetprov-{VERSION}.dist-info"}, top
    assert "fleetprov/py.typed" in names
    data = {name for name in names if name.startswith("fleetprov/emulator/data/")}
    expected = {
        f"fleetprov/emulator/data/{path.name}"
        for path in (ROOT / "fleetprov" / "emulator" / "data").iterdir()
        if path.is_file()
    }
    assert data == expected and data
    # Every module of the package, and nothing else: no tests, no byte-code, no stray files.
    sources = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "fleetprov").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    modules = {name for name in names if name.endswith(".py")}
    assert modules == sources
    assert not [name for name in names if "tests/" in name or name.endswith(".pyc")]
    assert metadata["Name"] == "fleetprov"
    assert metadata["Version"] == VERSION
    assert "fleetprov = fleetprov.cli:main" in entry_points


def test_sdist_contents(dists: Dists) -> None:
    prefix = f"fleetprov-{VERSION}"
    with tarfile.open(dists.sdist) as sdist:
        names = set(sdist.getnames())
        pkg_info = sdist.extractfile(f"{prefix}/PKG-INFO")
        assert pkg_info is not None
        metadata = email.parser.Parser().parsestr(pkg_info.read().decode())
    assert metadata["Version"] == VERSION
    # What building the wheel from the sdist needs: the build configuration, the readme (the long
    # description), every module and the package data.
    needed = {"pyproject.toml", "README.md", "fleetprov/py.typed"}
    needed |= {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "fleetprov").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    missing = sorted(path for path in needed if f"{prefix}/{path}" not in names)
    assert not missing, missing
    assert not [name for name in names if name.startswith(f"{prefix}/tests/") or name.endswith(".pyc")]


def test_sdist_has_the_system_files(dists: Dists) -> None:
    prefix = f"fleetprov-{VERSION}"
    with tarfile.open(dists.sdist) as sdist:
        names = set(sdist.getnames())
    wanted = [
        "systemd/fleetprov.service",
        "systemd/fleetprov-firstboot.service",
        "systemd/fleetprov.sysusers",
        "systemd/fleetprov.tmpfiles",
        "packaging/debian/config-template.yaml",
        "LICENSE",
    ]
    assert all(f"{prefix}/{path}" in names for path in wanted)


def test_sizes(dists: Dists, capsys: pytest.CaptureFixture[str]) -> None:
    """Both stay small; the sizes are printed for the record (pytest -s, or -rA)."""
    wheel, sdist = dists.wheel.stat().st_size, dists.sdist.stat().st_size
    with capsys.disabled():
        print(f"\nwheel {wheel} bytes, sdist {sdist} bytes, isolated build: {dists.isolated}")
    assert 0 < wheel < 1_000_000
    assert 0 < sdist < 1_000_000
