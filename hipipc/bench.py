"""The runner behind ``hipipc bench``: find benchmark scripts, run them, write a report.

A benchmark is a file ``bench_<name>.py`` in the benchmarks directory with a module-level
``run(quick: bool = False, progress=None) -> dict``.  ``progress``, when given, is a callable
taking one string, called between cases.  The result::

    {"name": str,
     "rows": [{"case": str, "median_us": float, "baseline": str | None,
               "baseline_us": float | None, "ratio": float | None,
               "target": str | None, "met": bool | None}, ...],
     "series": {SERIES: {"x_label": str, "y_label": str, "x": [numbers],
                         "lines": {label: [numbers]}}}}

The report directory gets ``report.json`` (every result, the machine, the date) and one PNG
per series (log-x, one labelled line each) when matplotlib is installed
(``pip install hipipc[plot]``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["BenchError", "default_dir", "discover", "run_all", "write_report", "write_plots",
           "format_table", "format_rows", "script_main", "stop_child", "ProgressBar",
           "human_size"]

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


def default_dir() -> Path:
    """``benchmarks/`` of the source checkout holding this package, else ``./benchmarks``."""
    beside = Path(__file__).resolve().parent.parent / "benchmarks"
    return beside if beside.is_dir() else Path.cwd() / "benchmarks"


def discover(directory: Path, only: Sequence[str] = ()) -> list[Path]:
    """The ``bench_*.py`` files of ``directory``, limited to ``only`` (names or file stems)."""
    if not directory.is_dir():
        raise BenchError(f"no benchmarks directory at {directory} (pass --dir)")
    found = sorted(directory.glob("bench_*.py"))
    if not found:
        raise BenchError(f"no bench_*.py files in {directory} (pass --dir)")
    if not only:
        return found
    by_name = {p.stem.removeprefix("bench_"): p for p in found}
    chosen = []
    for name in only:
        path = by_name.get(name.removeprefix("bench_").removesuffix(".py"))
        if path is None:
            raise BenchError(f"no benchmark named {name!r} in {directory} "
                             f"(available: {', '.join(sorted(by_name))})")
        if path not in chosen:
            chosen.append(path)
    return chosen


class ProgressBar:
    """A one-line text bar on a stream: completed benchmarks, the current one and its case.

    On a terminal the line is redrawn in place; elsewhere (logs, CI) each update is a line.
    """

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 20) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0
        self.done = 0
        self.label = ""

    def show(self, case: str = "") -> None:
        filled = round(self.width * self.done / self.total) if self.total else self.width
        text = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{self.label}{': ' + case if case else ''}")
        if self.tty:
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError, AttributeError):
                columns = 100
            text = text[:max(20, columns - 1)]
            self.stream.write("\r" + text.ljust(self._last))
            self._last = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self.label = "done"
        self.show()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _load(path: Path) -> Any:
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


def _check_result(result: Any, path: Path) -> dict:
    if not isinstance(result, dict) or not isinstance(result.get("rows", []), list) or \
            not isinstance(result.get("series", {}), dict):
        raise TypeError(f"{path.name}: run() must return a dict with a 'rows' list and a "
                        f"'series' dict, got {type(result).__name__}")
    return result


def machine_info() -> dict:
    """What the numbers depend on: CPU, memory, OS, Python, numpy, the hipipc backend."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f
                                      if line.startswith("model name")), None)
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


def run_all(paths: Sequence[Path], quick: bool = False, stream: TextIO | None = None
            ) -> dict:
    """Run each benchmark and return the report; a failing one is recorded, not raised."""
    from . import __version__

    bar = ProgressBar(len(paths), stream)
    entries = []
    started = _dt.datetime.now(_dt.timezone.utc)
    for path in paths:
        bar.label = path.stem.removeprefix("bench_")
        bar.show()
        t0 = time.perf_counter()
        progress: Callable[[str], None] = bar.show
        try:
            module = _load(path)
            result = _check_result(module.run(quick=quick, progress=progress), path)
            entry = {**result, "error": None}
        except (Exception, SystemExit) as exc:
            # One broken benchmark must not lose the others' numbers; a stray sys.exit()
            # in a script counts as broken too.
            entry = {"name": bar.label, "rows": [], "series": {},
                     "error": f"{type(exc).__name__}: {exc}"}
        entry.setdefault("name", bar.label)
        entry["module"] = path.stem
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        entries.append(entry)
        bar.done += 1
    bar.finish()
    return {
        "tool": "hipipc bench",
        "hipipc_version": __version__,
        "date": started.isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine_info(),
        "benchmarks": entries,
    }


def _json_default(obj: Any) -> Any:
    # ``tolist`` first: numpy arrays have ``item`` too, but it only works for one element;
    # on numpy scalars ``tolist`` gives the Python number.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def write_report(report: dict, out: Path) -> Path:
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


def _provenance(report: dict) -> str:
    """A plot's footnote: how, when and where its numbers were measured."""
    machine = report.get("machine") or {}
    cpus = machine.get("cpus_usable") or machine.get("cpus")
    parts = ["hipipc bench" + (" --quick" if report.get("quick") else ""),
             str(report.get("date", ""))[:10],
             f"{cpus} CPU(s)" + (f" ({machine['cpu_model']})" if machine.get("cpu_model")
                                  else "") if cpus else "",
             f"Python {machine['python']}" if machine.get("python") else "",
             f"backend {machine['backend']}" if machine.get("backend") else ""]
    return ", ".join(p for p in parts if p)


def write_plots(report: dict, out: Path) -> list[Path] | None:
    """One PNG per series (log-x); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullLocator
    except ImportError:
        return None
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used: set[str] = set()
    for bench in report["benchmarks"]:
        for sname, series in (bench.get("series") or {}).items():
            stem = sname if sname not in used else f"{bench['name']}-{sname}"
            used.add(stem)
            x = _numbers(series.get("x", []))
            fig, ax = plt.subplots(figsize=(7.5, 4.5))
            ys_all = []
            for label, ys in (series.get("lines") or {}).items():
                ys = _numbers(ys)[:len(x)]
                ys_all += [y for y in ys if y > 0 and math.isfinite(y)]
                ax.plot(x[:len(ys)], ys, marker="o", label=str(label))
            if x and min(x) > 0:
                ax.set_xscale("log", base=2)
            if ys_all and max(ys_all) / min(ys_all) > 100:
                ax.set_yscale("log")
            elif ys_all:
                ax.set_ylim(bottom=0)  # heights in proportion: ratios read true
            xl = str(series.get("x_label", "x"))
            if "byte" in xl.lower() or "size" in xl.lower():
                if ax.get_xscale() == "log" and len(x) <= 12:
                    ax.set_xticks(x)  # label the measured sizes themselves
                    ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: human_size(v)))
            ax.set_xlabel(xl)
            ax.set_ylabel(str(series.get("y_label", "")))
            ax.set_title(f"{bench['name']}: {sname}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
            fig.text(0.995, 0.005, _provenance(report), ha="right", va="bottom", fontsize=7,
                     color="0.4")
            fig.tight_layout(rect=(0, 0.03, 1, 1))
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
            path = out / f"{safe}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def format_rows(rows: Sequence[dict], indent: str = "") -> str:
    """One benchmark's rows as a plain-text table, columns as wide as their cells."""
    head = ("case", "median us", "baseline", "base us", "ratio", "target", "met")
    numeric = (False, True, False, True, True, False, False)
    cells = [head]
    for row in rows:
        cells.append((str(row.get("case", "?")), _fmt(row.get("median_us"), ".2f"),
                      str(row.get("baseline") or "-"), _fmt(row.get("baseline_us"), ".2f"),
                      _fmt(row.get("ratio"), ".2f"), str(row.get("target") or "-"),
                      {True: "yes", False: "NO", None: "-"}.get(row.get("met"), "?")))
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join(indent + "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num
                                        in zip(c, widths, numeric, strict=True)).rstrip()
                     for c in cells)


def format_table(report: dict) -> str:
    """The rows of every benchmark in ``report`` (see :func:`run_all`) as plain-text tables."""
    lines = []
    for bench in report["benchmarks"]:
        lines.append(f"== {bench['name']} ({bench['module']}, {bench['seconds']:.1f} s)")
        if bench.get("error"):
            lines.append(f"   FAILED: {bench['error']}")
            continue
        lines.append(format_rows(bench["rows"], indent="   "))
    return "\n".join(lines)


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


def script_main(run: Callable[..., dict], description: str,
                argv: Sequence[str] | None = None) -> int:
    """The command line of one ``benchmarks/bench_*.py``: ``[--quick] [--json PATH]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)
    result = run(args.quick, progress=lambda m: print(f"... {m}", file=sys.stderr))
    print(format_rows(result["rows"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=_json_default)
    return 0
