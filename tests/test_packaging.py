"""The distributions: what the wheel and the sdist contain, and that each works unpacked.

The wheel and the sdist are built once (``python -m build --no-isolation``: no network; the
test extra brings ``build`` and a setuptools new enough for SPDX license metadata).  The wheel
is installed with ``pip --target`` into a directory used as the only hipipc on the path, and
its ``hipipc`` command runs from a directory outside the checkout; the sdist is unpacked and a
bounded part of its own suite runs against its own copy of the package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import hipipc

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 300
pytest.importorskip("build", reason="the test extra installs build: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not a source tree")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [wheel] = out.glob("hipipc-*.whl")
    [sdist] = out.glob("hipipc-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def _scrubbed_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def test_the_wheel_holds_the_package_license_types_and_benchmarks(dists):
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    version = hipipc.__version__
    assert f"hipipc-{version}.dist-info/licenses/LICENSE" in names
    assert "hipipc/py.typed" in names and "hipipc/_version.py" in names
    assert {
        "hipipc/benchmarks/__init__.py",
        "hipipc/benchmarks/bench_ipc.py",
        "hipipc/benchmarks/bench_events.py",
    } <= names
    source = {f"hipipc/{p.relative_to(ROOT / 'hipipc')}" for p in (ROOT / "hipipc").rglob("*.py")}
    assert source <= names, f"missing from the wheel: {sorted(source - names)}"
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
    meta = zipfile.ZipFile(dists["wheel"]).read(f"hipipc-{version}.dist-info/METADATA").decode()
    assert f"\nVersion: {version}\n" in meta
    assert "\nLicense-Expression: MIT\n" in meta
    assert "Classifier: Operating System :: POSIX :: Linux" in meta
    assert "Classifier: Typing :: Typed" in meta
    assert "Requires-Dist: numpy>=1.23" in meta
    assert 'extra == "gpu"' in meta and "cupy" in meta


def test_the_sdist_holds_the_tests_their_helpers_examples_and_benchmarks(dists):
    with tarfile.open(dists["sdist"]) as tar:
        top = f"hipipc-{hipipc.__version__}/"
        names = {n.removeprefix(top) for n in tar.getnames()}
    expected = {
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "pyproject.toml",
        "hipipc/py.typed",
        "tests/conftest.py",
        "tests/_proc.py",
    }
    for folder in ("tests", "examples", "benchmarks", "hipipc"):
        expected |= {
            str(p.relative_to(ROOT))
            for p in (ROOT / folder).rglob("*.py")
            if "__pycache__" not in p.parts
        }
    assert expected <= names, f"missing from the sdist: {sorted(expected - names)}"
    assert not any("__pycache__" in n or n.startswith("docs/api") for n in names)


def test_the_installed_wheel_runs_its_command_from_any_directory(dists, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            "--target",
            str(target),
            str(dists["wheel"]),
        ],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    env = _scrubbed_env(PYTHONPATH=str(target))
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import hipipc, importlib.metadata as m; "
            "print(hipipc.__file__); print(hipipc.__version__); "
            "print(m.version('hipipc'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=work,
    )
    path, version, metadata = where.stdout.split()
    assert path.startswith(str(target)), "the test must use the installed wheel"
    assert version == metadata == hipipc.__version__  # one source of the version
    command = [str(target / "bin" / "hipipc")]
    listed = subprocess.run(
        command + ["bench", "--list"], capture_output=True, text=True, timeout=60, env=env, cwd=work
    )
    assert listed.returncode == 0 and {"events", "ipc"} <= set(listed.stdout.split()), listed.stderr
    # The shortest real benchmark, to keep the suite quick; the README's full
    # `hipipc bench --quick` runs the same way.
    run = subprocess.run(
        command + ["bench", "--quick", "--only", "events", "--no-plots"],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        env=env,
        cwd=work,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (work / "bench-report" / "report.json").exists()
    assert "wake-up: hipEventSynchronize" in run.stdout


# A part of the suite that touches every kind of helper the sdist must carry: conftest.py's
# fixtures, _proc.py's child processes, an example, a benchmark script.
SDIST_SUBSET = [
    "tests/test_handle.py",
    "tests/test_host_protocols.py",
    "tests/test_examples.py::test_quickstart",
    "tests/test_cli.py::test_bench_finds_the_package_benchmarks_and_the_checkout"
    "_scripts_from_anywhere",
]


def test_the_unpacked_sdist_passes_its_own_tests(dists, tmp_path):
    # The "data" filter (refuse links out of the tree, device files) where tarfile has it.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(dists["sdist"]) as tar:
        tar.extractall(tmp_path, **safe)
    src = tmp_path / f"hipipc-{hipipc.__version__}"
    env = _scrubbed_env(PYTHONPATH=str(src))
    probe = subprocess.run(
        [sys.executable, "-c", "import hipipc; print(hipipc.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=src,
    )
    assert probe.stdout.startswith(str(src)), "the test must use the sdist's package"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SDIST_SUBSET],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        env=env,
        cwd=src,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "error" not in proc.stdout.splitlines()[-1]
