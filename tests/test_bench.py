"""The benchmark machinery in tiny configurations: real processes and real handles, never
asserted for speed (the figures come from ``hipipc bench`` on an idle machine)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from hipipc import bench
from hipipc.benchmarks import bench_scale, ipc_more

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"case", "median_us", "baseline", "baseline_us", "ratio", "target", "met", "note"}


def _positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_scale_benchmark_in_a_tiny_configuration_gives_well_formed_rows_and_series():
    result = bench_scale.run_config([1, 3], [1, 2], window_s=0.05, rounds=1)
    assert result["name"] == "scale"
    rows = result["rows"]
    assert [set(r) for r in rows] == [KEYS] * 4
    flat, raw, per_core, cpu = rows
    assert "3 live exports, 1 process" in flat["case"] and flat["target"] == "<= 1.2x"
    assert isinstance(flat["met"], bool) and flat["met"] == (flat["ratio"] <= 1.2)
    for r in rows:
        assert _positive(r["median_us"]) and _positive(r["baseline_us"]) and _positive(r["ratio"])
    # Two processes: judged only where there are two usable cores, and the note says so.
    cores = bench_scale.usable_cores()
    assert raw["met"] is (None if cores < 2 else raw["ratio"] <= 2)
    assert f"2 processes on {cores} usable core(s)" in raw["note"]
    assert per_core["met"] == (per_core["ratio"] <= 2) and "min(N, cores)" in per_core["note"]
    assert cpu["target"] is None and cpu["met"] is None
    s = result["series"]["scale"]
    assert s["figure"] == "scale" and s["x"] == [1, 2] and s["m"] == [1, 3]
    assert s["cores"] == cores and len(s["cores_allow"]) == 2
    assert set(s["lines"]) == {"M = 1 live export", "M = 3 live exports"}
    assert all(len(v) == 2 and all(_positive(y) for y in v) for v in s["lines"].values())
    assert set(s["cost_us"]) == {"N = 1", "N = 2"}
    json.dumps(result)  # plain numbers only


def test_scale_rows_judge_the_per_process_target_only_with_enough_cores():
    res = {
        (m, n): {"per_process": 1000.0 / n, "aggregate": 1000.0 * min(n, 2), "cpu_us": 50.0}
        for m in (1, 100)
        for n in (1, 16)
    }
    rows, _ = bench_scale.rows_and_series(res, [1, 100], [1, 16], cores=2)
    raw, per_core = rows[1], rows[2]
    assert raw["ratio"] == pytest.approx(16) and raw["met"] is None
    assert "allow at best 8.0x" in raw["note"]
    assert per_core["ratio"] == pytest.approx(1) and per_core["met"] is True
    rows, _ = bench_scale.rows_and_series(res, [1, 100], [1, 16], cores=16)
    assert rows[1]["met"] is False and rows[2]["met"] is False  # 16 cores should scale


def test_scale_plot_is_one_figure():
    pytest.importorskip("matplotlib")
    res = {
        (m, n): {"per_process": 1000.0 / n, "aggregate": 1000.0, "cpu_us": 50.0}
        for m in (1, 100)
        for n in (1, 2, 4)
    }
    _, series = bench_scale.rows_and_series(res, [1, 100], [1, 2, 4], cores=2)
    report = {"benchmarks": [{"name": "scale", "series": series}], "machine": {}}
    with tempfile.TemporaryDirectory() as out:
        [png] = bench.write_plots(report, Path(out))
        assert png.name == "scale.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fd_rows_skip_cleanly_while_the_fd_transport_is_unavailable():
    tmpdir = tempfile.mkdtemp(prefix="bench-test-", dir="/dev/shm")
    try:
        rows = ipc_more.fd_rows(20, tmpdir)
    finally:
        os.rmdir(tmpdir)  # the rows removed their floor file
    assert all(set(r) == KEYS for r in rows)
    fd_rows = [r for r in rows if r["case"].startswith("fd transport")]
    if fd_rows[0]["median_us"] is None:
        [skipped] = fd_rows
        assert skipped["note"].startswith("skipped: fd transport unavailable")
        assert skipped["met"] is None and skipped["target"] is None
        assert "skip" in bench.format_rows([skipped])
    else:  # the fd transport exists: both comparisons are judged, the fallback reported
        judged = [r for r in fd_rows if r["target"] is not None]
        assert [r["target"] for r in judged] == ["<= 1x", "<= 1.5x"]
        assert all(isinstance(r["met"], bool) and _positive(r["median_us"]) for r in judged)
        [scm] = [r for r in fd_rows if "SCM_RIGHTS" in r["case"]]
        assert scm["met"] is None and _positive(scm["median_us"]) and _positive(scm["ratio"])
    [dupfd] = [r for r in rows if "DupFd" in r["case"]]
    assert _positive(dupfd["median_us"]) and _positive(dupfd["baseline_us"])
    assert dupfd["met"] is None and "15-22x" in dupfd["note"]


def test_handoff_to_a_fresh_worker_gives_a_judged_row_and_the_workers_steps():
    row = ipc_more.handoff_fresh_row(1 << 20, rounds=1)
    assert set(row) == KEYS and row["target"] == ">= 5000x faster"
    assert _positive(row["median_us"]) and _positive(row["baseline_us"])
    assert row["ratio"] == pytest.approx(row["baseline_us"] / row["median_us"])
    assert row["met"] == (row["ratio"] >= 5000)
    for step in ("recv", "open", "asarray", "check", "reply"):
        assert f"{step} " in row["note"]


def test_summary_counts_judged_targets_and_names_the_missed_and_the_failed():
    report = {
        "benchmarks": [
            {
                "name": "a",
                "module": "bench_a",
                "seconds": 1.0,
                "error": None,
                "rows": [
                    bench.row("x", 1.0, "base", 2.0, "<= 1x", True),
                    bench.row("y", 3.0, "base", 2.0, "<= 1x", False),
                    bench.row("z", 3.0, "base", 2.0, "<= 2x", None, note="cores"),
                    bench.row("skipped", None, note="skipped: unavailable"),
                    bench.row("plain", 3.0),
                ],
            },
            {"name": "b", "module": "bench_b", "seconds": 0.1, "error": "boom", "rows": []},
        ]
    }
    summary = bench.summarize(report)
    assert summary == {
        "targets": 2,
        "met": 1,
        "missed": ["a: y vs base"],
        "unjudged": 1,
        "failed_benchmarks": ["bench_b"],
    }
    text = bench.format_table(report)
    lines = text.splitlines()
    assert lines[-1] == (
        "targets met: 1 of 2 (1 not judged on this machine; not counted: failed bench_b)"
    )
    assert "MISSED: a: y vs base" in lines
    table = bench.format_rows(report["benchmarks"][0]["rows"])
    marks = [line.split()[-1] for line in table.splitlines()[1:6]]
    assert marks == ["met", "MISSED", "-", "-", "-"]
    assert "1.50x" in table and "note (z): cores" in table
    assert bench.row("n", 1.0, met=__import__("numpy").bool_(True))["met"] is True


def test_hipipc_bench_ends_with_the_summary_line(tmp_path):
    d = tmp_path / "benchmarks"
    d.mkdir()
    (d / "bench_two.py").write_text(
        textwrap.dedent("""
        from hipipc.bench import row
        def run(quick=False, progress=None):
            return {"name": "two", "series": {}, "rows": [
                row("fast", 1.0, "slow", 2.0, "<= 1x", True),
                row("slow", 4.0, "fast", 2.0, "<= 1x", False, note="a reason")]}
        """)
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hipipc",
            "bench",
            "--dir",
            str(d),
            "--out",
            str(tmp_path / "o"),
            "--no-plots",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[-2:] == ["MISSED: two: slow vs fast", "targets met: 1 of 2"]
    assert any(line.strip().endswith("MISSED") and "slow" in line for line in out)
    assert "note (slow): a reason" in proc.stdout
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["schema_version"] == bench.REPORT_SCHEMA_VERSION
    assert report["summary"]["targets"] == 2 and report["summary"]["met"] == 1
