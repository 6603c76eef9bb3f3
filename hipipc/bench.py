"""The runner behind ``hipipc bench``: find benchmark scripts, run them, write a report.

A benchmark is a module ``bench_<name>.py`` with a module-level
``run(quick: bool = False, progress=None) -> dict``.  They ship in the package
(:mod:`hipipc.benchmarks`); a source checkout's ``benchmarks/`` directory may add more, and
``--dir DIR`` runs those of another directory instead.  ``progress``, when given, is a callable
taking one string, called between cases.  The result::

    {"name": str,
     "rows": [{"case": str, "median_us": float | None, "baseline": str | None,
               "baseline_us": float | None, "ratio": float | None,
               "target": str | None, "met": bool | None, "note": str | None}, ...],
     "series": {SERIES: {"x_label": str, "y_label": str, "x": [numbers],
                         "lines": {label: [numbers]}}}}

A row with a target says whether it was met (``met`` True or False; None when the run
cannot judge it, the note then says why); ``median_us`` is None for a case that was skipped
(its note says why); ``note`` (optional) is printed under the table.  ``ratio`` reads in the
target's direction (time over the baseline's, or a speed-up where the target says "faster").

The report directory gets ``report.json`` (every result, the machine, the date, a
``schema_version``, a ``summary`` of the targets: see :func:`summarize`) and one PNG per
series (one labelled line each, axes chosen as :func:`write_plots` says; a series with
``"figure": "scale"`` gets the scale benchmark's two-panel figure) when matplotlib is
installed (``pip install hipipc[plot]``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import importlib.util
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

# A benchmark result or a report: JSON-like, as described in the module docstring.
Report = dict[str, Any]

__all__ = [
    "BenchError",
    "row",
    "default_dirs",
    "discover",
    "run_all",
    "write_report",
    "write_plots",
    "format_table",
    "format_rows",
    "summarize",
    "summary_line",
    "format_summary",
    "script_main",
    "start_child",
    "stop_child",
    "ProgressBar",
    "human_size",
    "REPORT_SCHEMA_VERSION",
]

# Bumped when a key of report.json changes meaning or goes away (adding keys does not).
REPORT_SCHEMA_VERSION = 1
# The benchmarks shipped in the package, imported by module name (so that the processes they
# spawn can import them too).
PACKAGE_DIR = Path(__file__).resolve().parent / "benchmarks"
_PACKAGE = "hipipc.benchmarks"

PLOT_HINT = "plots need matplotlib: pip install hipipc[plot]"


class BenchError(Exception):
    """A problem with the benchmark set-up (no directory, unknown name), not a benchmark."""


def human_size(n: float) -> str:
    """``4096`` -> ``4 KiB``; exact binary units where they divide."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def default_dirs() -> list[Path]:
    """Where ``hipipc bench`` looks without ``--dir``: the package's benchmarks, then the
    ``benchmarks/`` directory of the source checkout holding this package, if there is one."""
    beside = Path(__file__).resolve().parent.parent / "benchmarks"
    return [PACKAGE_DIR] + ([beside] if beside.is_dir() else [])


def discover(directory: Path | Sequence[Path], only: Sequence[str] = ()) -> list[Path]:
    """The ``bench_*.py`` files of ``directory`` (or of several, the first holding a name
    wins: a checkout's script that runs a package module is not run twice), limited to
    ``only`` (names or file stems)."""
    directories = [directory] if isinstance(directory, Path) else list(directory)
    by_name: dict[str, Path] = {}
    for d in directories:
        if not d.is_dir():
            if len(directories) == 1:
                raise BenchError(f"no benchmarks directory at {d} (pass --dir)")
            continue
        for p in sorted(d.glob("bench_*.py")):
            by_name.setdefault(p.stem.removeprefix("bench_"), p)
    where = ", ".join(str(d) for d in directories)
    if not by_name:
        raise BenchError(f"no bench_*.py files in {where} (pass --dir)")
    found = [by_name[name] for name in sorted(by_name)]
    if not only:
        return found
    chosen = []
    for name in only:
        path = by_name.get(name.removeprefix("bench_").removesuffix(".py"))
        if path is None:
            raise BenchError(
                f"no benchmark named {name!r} in {where} (available: {', '.join(sorted(by_name))})"
            )
        if path not in chosen:
            chosen.append(path)
    return chosen


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def start_child(proc: Any) -> None:
    """Start a benchmark's helper process immune to Ctrl-C.

    A terminal's Ctrl-C goes to the whole process group; the helper would die with a
    traceback of its own.  It is started with SIGINT ignored (kept across exec, and Python
    leaves an inherited SIG_IGN alone), so only the benchmark's process sees the interrupt and
    stops the helper through :func:`stop_child`.
    """
    with _sigint_ignored():
        proc.start()


def _clock(seconds: float) -> str:
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class ProgressBar:
    """A one-line text bar on a stream: completed benchmarks, elapsed time, an estimate of the
    time left, the current benchmark and its case.

    The estimate is the mean time of the benchmarks completed so far times those left, less
    the time the current one has run (``ETA ?`` until one completes).  On a terminal the line
    is redrawn in place; elsewhere (logs, CI) each update is a line.
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        width: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0
        self._clock = clock
        self.started = clock()
        self._current_started = self.started
        self._done_seconds = 0.0
        self.done = 0
        self.label = ""

    def begin(self, label: str) -> None:
        """The next benchmark starts."""
        self.label = label
        self._current_started = self._clock()
        self.show()

    def advance(self) -> None:
        """The current benchmark completed."""
        self._done_seconds += self._clock() - self._current_started
        self.done += 1

    def eta(self) -> float | None:
        """Seconds left by the estimate above; None before any benchmark completed."""
        if self.done >= self.total:
            return 0.0
        if not self.done:
            return None
        mean = self._done_seconds / self.done
        current = self._clock() - self._current_started
        return max(0.0, mean * (self.total - self.done) - current)

    def show(self, case: str = "") -> None:
        filled = round(self.width * self.done / self.total) if self.total else self.width
        eta = self.eta()
        times = (
            f"{_clock(self._clock() - self.started)} elapsed, ETA "
            f"{'?' if eta is None else _clock(eta)}"
        )
        text = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
            f"{times} {self.label}{': ' + case if case else ''}"
        )
        if self.tty:
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError, AttributeError):
                columns = 100
            text = text[: max(20, columns - 1)]
            self.stream.write("\r" + text.ljust(self._last))
            self._last = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self.label = "done"
        self.show()
        self.end_line()

    def end_line(self) -> None:
        """End the bar's line on a terminal, so that what follows starts on its own line."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _load(path: Path) -> Any:
    if path.parent == PACKAGE_DIR:
        return importlib.import_module(f"{_PACKAGE}.{path.stem}")
    # Imported under its own stem with its directory on sys.path, so that spawned children
    # of a benchmark (multiprocessing pickles functions by module name) can import it too.
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _check_result(result: Any, path: Path) -> Report:
    if (
        not isinstance(result, dict)
        or not isinstance(result.get("rows", []), list)
        or not isinstance(result.get("series", {}), dict)
    ):
        raise TypeError(
            f"{path.name}: run() must return a dict with a 'rows' list and a "
            f"'series' dict, got {type(result).__name__}"
        )
    return result


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, memory, OS, Python, numpy, the hipipc backend."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None
            )
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        import numpy

        info["numpy"] = numpy.__version__
        from .registry import get_registry

        backend = get_registry().backend
        info["backend"] = backend.name
        info["devices"] = backend.device_count()
    except Exception as exc:  # the report is still useful without them
        info["backend_error"] = str(exc)
    return info


def run_all(paths: Sequence[Path], quick: bool = False, stream: TextIO | None = None) -> Report:
    """Run each benchmark and return the report; a failing one is recorded, not raised."""
    from . import __version__

    bar = ProgressBar(len(paths), stream)
    entries = []
    started = _dt.datetime.now(_dt.timezone.utc)
    for path in paths:
        bar.begin(path.stem.removeprefix("bench_"))
        t0 = time.perf_counter()
        progress: Callable[[str], None] = bar.show
        try:
            module = _load(path)
            result = _check_result(module.run(quick=quick, progress=progress), path)
            entry = {**result, "error": None}
        except KeyboardInterrupt:
            bar.end_line()  # the caller's one-line message starts on a line of its own
            raise
        except (Exception, SystemExit) as exc:
            # One broken benchmark must not lose the others' numbers; a stray sys.exit()
            # in a script counts as broken too.
            entry = {
                "name": bar.label,
                "rows": [],
                "series": {},
                "error": f"{type(exc).__name__}: {exc}",
            }
        entry.setdefault("name", bar.label)
        entry["module"] = path.stem
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        entries.append(entry)
        bar.advance()
    bar.finish()
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool": "hipipc bench",
        "hipipc_version": __version__,
        "date": started.isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine_info(),
        "benchmarks": entries,
    }
    report["summary"] = summarize(report)
    return report


def _json_default(obj: Any) -> Any:
    # ``tolist`` first: numpy arrays have ``item`` too, but it only works for one element;
    # on numpy scalars ``tolist`` gives the Python number.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def write_report(report: Report, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _numbers(values: Sequence[Any]) -> list[float]:
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def _provenance(report: Report) -> str:
    """A plot's footnote: how, when and where its numbers were measured."""
    machine = report.get("machine") or {}
    cpus = machine.get("cpus_usable") or machine.get("cpus")
    parts = [
        "hipipc bench" + (" --quick" if report.get("quick") else ""),
        str(report.get("date", ""))[:10],
        f"{cpus} CPU(s)" + (f" ({machine['cpu_model']})" if machine.get("cpu_model") else "")
        if cpus
        else "",
        f"Python {machine['python']}" if machine.get("python") else "",
        f"backend {machine['backend']}" if machine.get("backend") else "",
    ]
    return ", ".join(p for p in parts if p)


def _plain_number(v: float) -> str:
    return f"{v:g}" if v < 1e5 else f"{v:.3g}"


def write_plots(report: Report, out: Path) -> list[Path] | None:
    """One PNG per series; None when matplotlib is not installed.

    Axes are chosen to be read, not just drawn: a size axis (its label says bytes or size) is
    log2 with the measured sizes as ticks in binary units; any other axis with few points
    (percentiles, say) puts them evenly spaced, labelled by value; the y axis starts at zero,
    so heights compare, unless the values span more than 10x, when it is logarithmic with
    plain-number ticks.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
    except ImportError:
        return None
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used: set[str] = set()
    for bench in report["benchmarks"]:
        for sname, series in (bench.get("series") or {}).items():
            stem = sname if sname not in used else f"{bench['name']}-{sname}"
            used.add(stem)
            if series.get("figure") == "scale":
                written.append(_plot_scale(plt, report, bench, sname, series, out, stem))
                continue
            x = _numbers(series.get("x", []))
            xl = str(series.get("x_label", "x"))
            sizes = "byte" in xl.lower() or "size" in xl.lower()
            positive = bool(x) and min(x) > 0
            categorical = not sizes and 0 < len(x) <= 12
            positions = list(range(len(x))) if categorical else x
            fig, ax = plt.subplots(figsize=(7.5, 4.5))
            ys_all = []
            for label, ys in (series.get("lines") or {}).items():
                ys = _numbers(ys)[: len(x)]
                ys_all += [y for y in ys if y > 0 and math.isfinite(y)]
                ax.plot(positions[: len(ys)], ys, marker="o", label=str(label))
            if sizes and positive:
                ax.set_xscale("log", base=2)
                if len(x) <= 12:
                    ax.set_xticks(x)  # label the measured sizes themselves
                    ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: human_size(v)))
            elif categorical:
                prefix = "p" if "percentile" in xl.lower() else ""
                ax.set_xticks(positions)
                ax.set_xticklabels([prefix + _plain_number(v) for v in x])
                ax.set_xlim(-0.5, len(x) - 0.5)
            if ys_all and max(ys_all) / min(ys_all) > 10:
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _p: ""))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: _plain_number(v)))
            elif ys_all:
                ax.set_ylim(bottom=0)  # heights in proportion: ratios read true
            ax.set_xlabel(xl)
            ax.set_ylabel(str(series.get("y_label", "")))
            ax.set_title(f"{bench['name']}: {sname.replace('_', ' ')}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
            fig.text(
                0.995, 0.005, _provenance(report), ha="right", va="bottom", fontsize=7, color="0.4"
            )
            fig.tight_layout(rect=(0, 0.03, 1, 1))
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
            path = out / f"{safe}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def _plot_scale(
    plt: Any,
    report: Report,
    bench: Report,
    sname: str,
    series: dict[str, Any],
    out: Path,
    stem: str,
) -> Path:
    """The scale benchmark's figure: per-process throughput against the number of processes
    (one line per M, and what the machine's cores allow), beside the cost of one operation
    against M (one line per N).  Both y axes start at zero unless values span over 10x."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ns = _numbers(series.get("x", []))
    ms = _numbers(series.get("m", []))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    positions = list(range(len(ns)))
    values: list[float] = []
    for label, ys in (series.get("lines") or {}).items():
        ys = _numbers(ys)[: len(ns)]
        values += ys
        left.plot(positions[: len(ys)], ys, marker="o", label=str(label))
    allow = _numbers(series.get("cores_allow") or [])[: len(ns)]
    if allow:
        cores = series.get("cores", "?")
        left.plot(
            positions[: len(allow)],
            allow,
            linestyle="--",
            color="0.45",
            label=f"what {cores} core(s) allow (N=1 x min(N, cores) / N)",
        )
    left.set_xticks(positions)
    left.set_xticklabels([_plain_number(n) for n in ns])
    left.set_xlabel(str(series.get("x_label", "processes")))
    left.set_ylabel(str(series.get("y_label", "")))
    left.set_title("throughput per process")
    cost = series.get("cost_us") or {}
    for label, ys in cost.items():
        right.plot(ms[: len(ys)], _numbers(ys)[: len(ms)], marker="o", label=str(label))
    if ms and min(ms) > 0:
        right.set_xscale("log")
        right.set_xticks(ms)
        right.xaxis.set_minor_locator(NullLocator())
        right.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: _plain_number(v)))
    right.set_xlabel("live exports (M)")
    right.set_ylabel("us per open+close, per process")
    right.set_title("cost of one open+close against M (flat is the target)")
    for ax, ys in ((left, values), (right, [y for v in cost.values() for y in _numbers(v)])):
        good = [y for y in ys if y > 0 and math.isfinite(y)]
        if good and max(good) / min(good) > 10:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _p: ""))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: _plain_number(v)))
        elif good:
            ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
    # Throughput falls with N: its lower left stays empty.  The cost lines run across the
    # whole panel: their legend goes beside it.
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8, loc="lower left", framealpha=0.85)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(
        f"{bench['name']}: N processes opening and closing handles of M live exports"
        f" ({sname.replace('_', ' ')})"
    )
    fig.text(0.995, 0.005, _provenance(report), ha="right", va="bottom", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    path = out / f"{safe}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


_MARKS = {True: "met", False: "MISSED", None: "-"}


def _mark(met: Any) -> str:
    return _MARKS[None if met is None else bool(met)]


def format_rows(rows: Sequence[dict[str, Any]], indent: str = "") -> str:
    """One benchmark's rows as a plain-text table, columns as wide as their cells, then the
    rows' notes.  The last column is the target's mark: ``met``, ``MISSED``, or ``-`` (no
    target, or one this run cannot judge)."""
    head = ("case", "median us", "baseline", "base us", "ratio", "target", "met?")
    numeric = (False, True, False, True, True, False, False)
    cells = [head]
    notes = []
    for row in rows:
        ratio = row.get("ratio")
        cells.append(
            (
                str(row.get("case", "?")),
                _fmt(row.get("median_us"), ".2f") if row.get("median_us") is not None else "skip",
                str(row.get("baseline") or "-"),
                _fmt(row.get("baseline_us"), ".2f"),
                "-" if ratio is None else _fmt(ratio, ".2f") + "x",
                str(row.get("target") or "-"),
                _mark(row.get("met")),
            )
        )
        if row.get("note"):
            notes.append(f"{indent}note ({row.get('case', '?')}): {row['note']}")
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = [
        indent
        + "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(c, widths, numeric, strict=True)
        ).rstrip()
        for c in cells
    ]
    return "\n".join(lines + notes)


def summarize(report: Report) -> dict[str, Any]:
    """The targets of ``report``'s rows: ``{"targets": n, "met": k, "missed": [case, ...],
    "unjudged": j, "failed_benchmarks": [module, ...]}``.  A row counts as a target when it has
    one and its ``met`` is True or False; ``unjudged`` counts those with a target the run could
    not judge (met None); a failed benchmark's targets are not counted, and it is named."""
    n = k = unjudged = 0
    missed: list[str] = []
    failed: list[str] = []
    for bench in report.get("benchmarks", []):
        if bench.get("error"):
            failed.append(str(bench.get("module", bench.get("name", "?"))))
            continue
        for row in bench.get("rows", []):
            met = row.get("met")
            if met is None:
                unjudged += 1 if row.get("target") else 0
                continue
            n += 1
            if bool(met):
                k += 1
            else:
                base = f" vs {row['baseline']}" if row.get("baseline") else ""
                missed.append(f"{bench.get('name', '?')}: {row.get('case', '?')}{base}")
    return {
        "targets": n,
        "met": k,
        "missed": missed,
        "unjudged": unjudged,
        "failed_benchmarks": failed,
    }


def summary_line(summary: dict[str, Any]) -> str:
    """``targets met: k of n`` and what it leaves out."""
    extra = []
    if summary["unjudged"]:
        extra.append(f"{summary['unjudged']} not judged on this machine")
    if summary["failed_benchmarks"]:
        extra.append(f"not counted: failed {', '.join(summary['failed_benchmarks'])}")
    tail = f" ({'; '.join(extra)})" if extra else ""
    return f"targets met: {summary['met']} of {summary['targets']}{tail}"


def format_summary(report: Report) -> str:
    """The missed targets of ``report``, one line each, then ``targets met: k of n``."""
    summary = summarize(report)
    return "\n".join([f"MISSED: {case}" for case in summary["missed"]] + [summary_line(summary)])


def format_table(report: Report, summary: bool = True) -> str:
    """The rows of every benchmark in ``report`` (see :func:`run_all`) as plain-text tables,
    then (``summary``) :func:`format_summary`'s lines."""
    lines = []
    for bench in report["benchmarks"]:
        lines.append(f"== {bench['name']} ({bench['module']}, {bench['seconds']:.1f} s)")
        if bench.get("error"):
            lines.append(f"   FAILED: {bench['error']}")
            continue
        lines.append(format_rows(bench["rows"], indent="   "))
    if summary:
        lines.append(format_summary(report))
    return "\n".join(lines)


def next_request(conn: Any) -> Any:
    """The next ``(op, args)`` a benchmark's helper process is asked, or None when it should
    quit: the parent sent None, closed its end, or stayed silent for an hour (stuck: a helper
    must not linger)."""
    try:
        if not conn.poll(3600):
            return None
        return conn.recv()
    except (EOFError, OSError):
        return None


def child_reply(conn: Any, timeout: float, who: str) -> Any:
    """The answer a helper process sends on ``conn`` within ``timeout`` seconds; an exception
    it sent back is raised here, silence is ``TimeoutError`` naming ``who``."""
    if not conn.poll(timeout):
        raise TimeoutError(f"{who} gave no answer within {timeout:.0f} s")
    out = conn.recv()
    if isinstance(out, Exception):
        raise out
    return out


def stop_child(conn: Any, proc: Any) -> None:
    """Stop a benchmark's helper process: ask it to quit (None), then kill it if it lingers."""
    try:
        conn.send(None)
    except OSError:
        pass
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def row(
    case: str,
    median_us: float | None,
    baseline: str | None = None,
    baseline_us: float | None = None,
    target: str | None = None,
    met: bool | None = None,
    *,
    ratio: float | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """One row of a benchmark's result (module docstring); ``ratio`` defaults to
    ``median_us / baseline_us``; ``median_us`` None marks a skipped case (say why in
    ``note``)."""
    if ratio is None and baseline_us and median_us is not None:
        ratio = median_us / baseline_us
    return {
        "case": case,
        "median_us": median_us,
        "baseline": baseline,
        "baseline_us": baseline_us,
        "ratio": ratio,
        "target": target,
        "met": None if met is None else bool(met),
        "note": note,
    }


def script_main(
    run: Callable[..., Report], description: str, argv: Sequence[str] | None = None
) -> int:
    """The command line of one ``benchmarks/bench_*.py``: ``[--quick] [--json PATH]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)
    result = run(args.quick, progress=lambda m: print(f"... {m}", file=sys.stderr))
    print(format_rows(result["rows"]))
    print(format_summary({"benchmarks": [{**result, "error": None}]}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=_json_default)
    return 0
