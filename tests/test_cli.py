"""The ``hipipc`` command, run as ``python -m hipipc`` in real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def hipipc(
    *args: str, env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hipipc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
    )


def with_path(env_extra: dict | None = None, prepend: Path | None = None) -> dict:
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(prepend)] if prepend else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    return env


@pytest.mark.parametrize("command", ["info", "ls", "gc", "bench"])
def test_every_subcommand_has_help(command):
    proc = hipipc(command, "--help", env=with_path())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: hipipc {command}")


def test_top_level_help_version_and_usage_errors():
    proc = hipipc("--help", env=with_path())
    assert proc.returncode == 0 and "Exit codes" in proc.stdout
    assert all(c in proc.stdout for c in ("info", "ls", "gc", "bench"))
    assert hipipc("--version", env=with_path()).stdout.startswith("hipipc ")
    assert hipipc(env=with_path()).returncode == 2
    assert hipipc("frobnicate", env=with_path()).returncode == 2


def test_info_reports_the_configuration():
    proc = hipipc("info", "--json", env=with_path({"HIPIPC_SHARE": "group"}))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    store = os.environ["HIPIPC_STORE"].replace("{uid}", str(os.geteuid()))
    assert info["backend"] == "host" and info["devices"] == 1
    assert info["store"] == store and info["sharing"] == "group"
    assert info["segment_mode"] == "0660"
    text = hipipc("info", env=with_path()).stdout
    assert "backend  host" in text and store in text


def test_errors_are_one_line_with_exit_code_1():
    for args, env in (
        (("info",), {"HIPIPC_SHARE": "everyone"}),
        (("info",), {"HIPIPC_HOST_DEVICES": "zero"}),
    ):
        proc = hipipc(*args, env=with_path(env))
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hipipc info: error: "), proc.stderr
        assert "Traceback" not in proc.stderr


EXPORTER = textwrap.dedent("""
    import sys, time
    import hipipc as hip
    buf = hip.DeviceBuffer.allocate(3 << 20)
    print(buf.handle.segment_name, flush=True)
    time.sleep(120)
""")


def test_ls_and_gc_after_a_sigkilled_exporter():
    env = with_path()
    child = subprocess.Popen(
        [sys.executable, "-c", EXPORTER], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        name = child.stdout.readline().strip()
        assert len(name) == 40, name
        listing = json.loads(hipipc("ls", "--json", env=env).stdout)
        mine = [s for s in listing["segments"] if s["name"] == name]
        assert len(mine) == 1 and mine[0]["alive"] and mine[0]["pid"] == child.pid
        assert mine[0]["size"] == 3 << 20
        text = hipipc("ls", env=env).stdout
        assert name[:12] in text and "3 MiB" in text and "alive" in text
        assert "removed 0" in hipipc("gc", env=env).stdout  # a live export is never collected
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
    text = hipipc("ls", env=env).stdout
    assert "dead" in text and "hipipc gc" in text
    proc = hipipc("gc", env=env)
    assert proc.returncode == 0
    assert f"removed {name[:12]}" in proc.stdout
    listing = json.loads(hipipc("ls", "--json", env=env).stdout)
    assert name not in {s["name"] for s in listing["segments"]}


FAKE_BENCH = textwrap.dedent("""
    def run(quick=False, progress=None):
        sizes = [4096, 65536] if quick else [4096, 65536, 1 << 20]
        rows = []
        for size in sizes:
            if progress:
                progress(f"open {size}")
            rows.append({"case": f"open {size}", "median_us": 2.0, "baseline": "mmap",
                         "baseline_us": 4.0, "ratio": 0.5, "target": "<= 1", "met": True})
        rows[-1]["met"] = not quick  # quick mode "misses" one target, for --check
        return {"name": "fake", "rows": rows, "series": {
            "open_latency": {"x_label": "size (bytes)", "y_label": "us", "x": sizes,
                             "lines": {"hipipc": [2.0] * len(sizes),
                                       "SharedMemory": [4.0] * len(sizes)}}}}
""")


@pytest.fixture
def bench_dir(tmp_path):
    d = tmp_path / "benchmarks"
    d.mkdir()
    (d / "bench_fake.py").write_text(FAKE_BENCH)
    (d / "helper.py").write_text("raise SystemExit('not a benchmark: must not be run')\n")
    return d


def test_bench_writes_a_report_and_plots(bench_dir, tmp_path):
    out = tmp_path / "report"
    proc = hipipc("bench", "--dir", str(bench_dir), "--out", str(out), "--quick", env=with_path())
    assert proc.returncode == 0, proc.stderr
    assert "fake: open 4096" in proc.stderr and "1/1" in proc.stderr  # the progress bar
    report = json.loads((out / "report.json").read_text())
    assert report["quick"] is True and report["machine"]["backend"] == "host"
    assert "date" in report and report["hipipc_version"]
    [fake] = report["benchmarks"]
    assert fake["name"] == "fake" and fake["error"] is None and len(fake["rows"]) == 2
    assert fake["series"]["open_latency"]["x"] == [4096, 65536]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install hipipc[plot]" in proc.stdout
    else:
        png = out / "open_latency.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --check turns a missed target into exit code 3.
    proc = hipipc(
        "bench",
        "--dir",
        str(bench_dir),
        "--out",
        str(out),
        "--quick",
        "--check",
        "--no-plots",
        env=with_path(),
    )
    assert proc.returncode == 3 and "target(s) not met" in proc.stderr


def test_bench_without_matplotlib_says_how_to_get_plots(bench_dir, tmp_path):
    shadow = tmp_path / "shadow"
    (shadow / "matplotlib").mkdir(parents=True)
    (shadow / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by test')\n")
    out = tmp_path / "report"
    proc = hipipc(
        "bench", "--dir", str(bench_dir), "--out", str(out), env=with_path(prepend=shadow)
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install hipipc[plot]" in proc.stdout
    assert (out / "report.json").exists() and not list(out.glob("*.png"))


def test_bench_failures_and_selection(bench_dir, tmp_path):
    (bench_dir / "bench_broken.py").write_text(
        "def run(quick=False, progress=None):\n    raise RuntimeError('boom')\n"
    )
    out = tmp_path / "report"
    listed = hipipc("bench", "--dir", str(bench_dir), "--list", env=with_path())
    assert listed.returncode == 0 and listed.stdout.split() == ["broken", "fake"]
    proc = hipipc(
        "bench", "--dir", str(bench_dir), "--out", str(out), "--no-plots", env=with_path()
    )
    assert proc.returncode == 1 and "bench_broken" in proc.stderr
    report = json.loads((out / "report.json").read_text())  # the others' numbers are kept
    assert [b["error"] for b in report["benchmarks"]] == ["RuntimeError: boom", None]
    proc = hipipc(
        "bench",
        "--dir",
        str(bench_dir),
        "--out",
        str(out),
        "--only",
        "fake",
        "--no-plots",
        env=with_path(),
    )
    assert proc.returncode == 0
    assert [b["name"] for b in json.loads((out / "report.json").read_text())["benchmarks"]] == [
        "fake"
    ]
    proc = hipipc("bench", "--dir", str(bench_dir), "--only", "nope", env=with_path())
    assert proc.returncode == 1 and "available: broken, fake" in proc.stderr
    proc = hipipc("bench", "--dir", str(tmp_path / "missing"), env=with_path())
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"hipipc bench: error: no benchmarks directory at {tmp_path / 'missing'} (pass --dir)"
    )


NUMPY_BENCH = textwrap.dedent("""
    import sys
    import numpy as np

    def run(quick=False, progress=None):
        sizes = np.array([4096, 1 << 20, 1 << 30])
        return {"name": "arrays", "rows": [
            {"case": "a case name much longer than thirty-four characters", "median_us":
             np.float64(1.5), "baseline": "a baseline with a long name too", "baseline_us":
             np.float64(1234567.25), "ratio": np.float64(822711.5), "target": ">= 1000x faster",
             "met": np.bool_(True)}],
            "series": {"open_latency": {"x_label": "allocation size (bytes)", "y_label": "us",
                                        "x": sizes, "lines": {"hipipc": sizes / 1e6}}}}
""")


def test_bench_report_takes_numpy_values_and_the_table_keeps_whole_cells(bench_dir, tmp_path):
    (bench_dir / "bench_arrays.py").write_text(NUMPY_BENCH)
    (bench_dir / "bench_exits.py").write_text(
        "import sys\n\ndef run(quick=False, progress=None):\n    sys.exit(4)\n"
    )
    out = tmp_path / "report"
    proc = hipipc(
        "bench",
        "--dir",
        str(bench_dir),
        "--out",
        str(out),
        "--only",
        "arrays",
        "--only",
        "exits",
        env=with_path(),
    )
    assert proc.returncode == 1, proc.stderr  # bench_exits failed; the run went on
    report = json.loads((out / "report.json").read_text())
    arrays, exits = report["benchmarks"]
    assert arrays["series"]["open_latency"]["x"] == [4096, 1 << 20, 1 << 30]
    assert arrays["rows"][0]["met"] is True and arrays["rows"][0]["baseline_us"] == 1234567.25
    assert exits["error"] == "SystemExit: 4"
    row = next(line for line in proc.stdout.splitlines() if "a case name" in line)
    assert "a case name much longer than thirty-four characters" in row
    assert "a baseline with a long name too" in row and ">= 1000x faster" in row
    assert row.split()[-1] == "met"
    header = next(line for line in proc.stdout.splitlines() if "median us" in line)
    assert header.index("median us") + len("median us") == row.index("1.50") + len("1.50")


def test_every_json_output_has_a_schema_version_and_gc_has_a_dry_run():
    env = with_path()
    for command in ("info", "ls"):
        out = json.loads(hipipc(command, "--json", env=env).stdout)
        assert out["schema_version"] == 1 and out["command"] == command
    child = subprocess.Popen(
        [sys.executable, "-c", EXPORTER], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        name = child.stdout.readline().strip()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
    # A dry run names the dead exporter's segment and removes nothing.
    proc = hipipc("gc", "--dry-run", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    dry = json.loads(proc.stdout)
    assert dry["schema_version"] == 1 and dry["command"] == "gc" and dry["dry_run"] is True
    assert name in dry["removed"]
    text = hipipc("gc", "--dry-run", env=env).stdout
    assert f"would remove {name[:12]}" in text
    assert name in {
        s["name"] for s in json.loads(hipipc("ls", "--json", env=env).stdout)["segments"]
    }
    done = json.loads(hipipc("gc", "--json", env=env).stdout)
    assert done["dry_run"] is False and name in done["removed"]
    assert name not in json.loads(hipipc("gc", "--dry-run", "--json", env=env).stdout)["removed"]


def test_bench_report_has_a_schema_version_and_the_bar_elapsed_time_and_eta(bench_dir, tmp_path):
    (bench_dir / "bench_second.py").write_text(FAKE_BENCH.replace('"fake"', '"second"'))
    out = tmp_path / "report"
    proc = hipipc(
        "bench",
        "--dir",
        str(bench_dir),
        "--out",
        str(out),
        "--quick",
        "--no-plots",
        env=with_path(),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "report.json").read_text())["schema_version"] == 1
    bar = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    # Before any benchmark completed the time left is unknown; after one, it is estimated.
    assert "0/2 0:00 elapsed, ETA ? fake" in bar[0]
    assert any("1/2" in line and "elapsed, ETA 0:0" in line and "second" in line for line in bar), (
        bar
    )
    assert "2/2" in bar[-1] and "ETA 0:00 done" in bar[-1]


def test_bench_finds_the_package_benchmarks_and_the_checkout_scripts_from_anywhere(tmp_path):
    listed = hipipc("bench", "--list", env=with_path(), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert {"events", "ipc"} <= set(listed.stdout.split())
    # The checkout's scripts run the package modules; both command lines work.
    for cmd in (
        [sys.executable, str(ROOT / "benchmarks" / "bench_ipc.py"), "--help"],
        [sys.executable, "-m", "hipipc.benchmarks.bench_events", "--help"],
    ):
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, env=with_path(), cwd=tmp_path
        )
        assert proc.returncode == 0 and "--quick" in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "name, started", [("ipc", "open latency"), ("events", "wake-up"), ("scale", "live export")]
)
def test_ctrl_c_during_bench_prints_one_line(tmp_path, name, started):
    """Ctrl-C at a terminal signals the whole process group, the benchmark's helper included:
    one line on stderr, exit code 130, no traceback from any process, and no segment left in
    the store (the session fixture checks)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hipipc",
            "bench",
            "--only",
            name,
            "--quick",
            "--no-plots",
            "--out",
            str(tmp_path / "out"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=with_path(),
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        seen = []
        while not any(started in line for line in seen):  # the helper process runs now
            line = proc.stderr.readline()
            assert line, f"the benchmark ended before {started!r}: {seen}"
            seen.append(line)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert stderr.splitlines() == ["hipipc bench: interrupted"], stderr
    assert "Traceback" not in stdout
