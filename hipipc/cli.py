"""The ``hipipc`` command: ``hipipc info | ls | gc | bench``.

Exit codes: 0 success; 1 a failure (one line on stderr: what went wrong and what to do);
2 a usage error (argparse); 3 ``bench --check`` found a target not met; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import HipError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_MISSED = 0, 1, 2, 3
# The "schema_version" of every --json output: bumped when a key changes meaning or goes away
# (adding keys does not), so scripts can check what they parse.
JSON_SCHEMA_VERSION = 1


def _print_json(command: str, body: dict[str, Any]) -> None:
    print(json.dumps({"schema_version": JSON_SCHEMA_VERSION, "command": command, **body}, indent=2))


def _human_age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d"


def _usable_store() -> Any:
    """This user's store; HipError (exit 1) saying what is wrong with its path and the fix."""
    from .errors import hipError_t
    from .store import HandleStore

    store = HandleStore()
    problem = store.diagnose()
    if problem is not None:
        raise HipError(hipError_t.hipErrorOperatingSystem, problem)
    return store


def _warn(command: str, skipped: list[tuple[str, str]]) -> None:
    """One line on stderr per segment whose header cannot be trusted (skipped, kept)."""
    for name, why in skipped:
        print(
            f"hipipc {command}: warning: skipped segment {name[:12]}: {why} (header "
            "written by someone else?)",
            file=sys.stderr,
        )


def _segments(store: Any = None) -> tuple[str, list[dict[str, Any]], list[tuple[str, str]]]:
    from .store import exporter_gone, untrusted_reason

    store = store or _usable_store()
    now = time.time()
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    mapped: list[set[tuple[int, int]]] = []
    for name, info, st in store.entries():
        if info is None:
            rows.append(
                {
                    "name": name,
                    "kind": None,
                    "size": st.st_size,
                    "pid": None,
                    "alive": None,
                    "age_s": now - st.st_mtime,
                    "foreign": True,
                }
            )
            continue
        problem = untrusted_reason(info, st)
        if problem is not None:
            skipped.append((name, problem))
            continue
        rows.append(
            {
                "name": name,
                "kind": info.kind.name.lower(),
                "size": info.size,
                "pid": info.pid,
                "alive": not exporter_gone(info, st, mapped),
                "age_s": round(now - info.created, 3),
                "foreign": False,
            }
        )
    return store.own_path(), rows, skipped


def _transport_info() -> tuple[str, bool]:
    """The transport new allocations take ($HIPIPC_TRANSPORT), and whether fd would work."""
    from .errors import HipError
    from .fdtransport import default_transport, fd_route_supported

    try:
        chosen = default_transport()
    except HipError as exc:
        chosen = f"invalid: {exc.detail}"
    return chosen, fd_route_supported()


def _cmd_info(args: argparse.Namespace) -> int:
    from .registry import get_registry
    from .store import SHARE_ENV, share_mode

    reg = get_registry()
    store = reg.backend.store
    problem = store.diagnose()
    if problem is None:
        path, rows, _ = _segments(store)
    else:
        path, rows = store.own_path(), []
    share = os.environ.get(SHARE_ENV, "user")
    mode = share_mode()
    transport, fd_ok = _transport_info()
    alive = sum(1 for r in rows if r["alive"])
    dead = sum(1 for r in rows if r["alive"] is False)
    info = {
        "version": __version__,
        "backend": reg.backend.name,
        "devices": reg.backend.device_count(),
        "store": path,
        "store_template": store.template,
        "store_exists": os.path.isdir(path),
        "transport": transport,
        "fd_transport_supported": fd_ok,
        "sharing": share,
        "segment_mode": f"{mode:04o}",
        "store_problem": problem,
        "exports_alive": alive,
        "exports_dead": dead,
    }
    status = EXIT_OK
    if problem is not None:
        print(f"hipipc info: error: {problem}", file=sys.stderr)
        status = EXIT_FAIL
    if args.json:
        _print_json("info", info)
        return status
    print(f"hipipc   {__version__}")
    print(f"backend  {info['backend']}")
    print(f"devices  {info['devices']}")
    state = (
        " (UNUSABLE, see the error)"
        if problem
        else ""
        if info["store_exists"]
        else " (not created yet)"
    )
    print(f"store    {path}{state}  (template {store.template})")
    fd_note = "fd available" if fd_ok else "fd not supported by this kernel"
    print(f"transport {transport}  ($HIPIPC_TRANSPORT: store, fd or auto; {fd_note})")
    print(f"sharing  {share} (exported segments get mode {mode:04o})")
    dead_note = (
        f", {info['exports_dead']} of exited exporters (run 'hipipc gc')"
        if info["exports_dead"]
        else ""
    )
    print(f"exports  {alive} live{dead_note}")
    return status


def _cmd_ls(args: argparse.Namespace) -> int:
    from .bench import human_size

    path, rows, skipped = _segments()
    _warn("ls", skipped)
    if args.json:
        _print_json("ls", {"store": path, "segments": rows})
        return EXIT_OK
    if rows:
        print(f"{'name':12}  {'kind':12}  {'size':>10}  {'exporter pid':>12}  {'state':6}  age")
    for r in sorted(rows, key=lambda r: -r["age_s"]):
        if r["foreign"]:
            print(
                f"{r['name'][:12]:12}  {'(not hipipc)':12}  {human_size(r['size']):>10}  "
                f"{'-':>12}  {'-':6}  {_human_age(r['age_s'])}"
            )
            continue
        state = "alive" if r["alive"] else "dead"
        print(
            f"{r['name'][:12]:12}  {r['kind']:12}  {human_size(r['size']):>10}  "
            f"{r['pid']:>12}  {state:6}  {_human_age(r['age_s'])}"
        )
    dead = sum(1 for r in rows if r["alive"] is False)
    hint = f"; {dead} dead (run 'hipipc gc')" if dead else ""
    print(f"{len(rows)} segment(s) in {path}{hint}")
    return EXIT_OK


def _cmd_gc(args: argparse.Namespace) -> int:
    store = _usable_store()
    path = store.own_path()
    skipped: list[tuple[str, str]] = []
    # Nothing to collect without a store; collect() would create an empty one.
    names = store.collect(skipped, dry_run=args.dry_run) if os.path.isdir(path) else []
    _warn("gc", skipped)
    if args.json:
        _print_json("gc", {"store": path, "dry_run": args.dry_run, "removed": names})
        return EXIT_OK
    verb = "would remove" if args.dry_run else "removed"
    for name in names:
        print(f"{verb} {name[:12]}")
    print(f"{verb} {len(names)} segment(s) of exited exporters from {path}")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    directories = [Path(args.dir)] if args.dir else bench.default_dirs()
    try:
        paths = bench.discover(directories, args.only or ())
    except bench.BenchError as exc:
        print(f"hipipc bench: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if args.list:
        for p in paths:
            print(p.stem.removeprefix("bench_"))
        return EXIT_OK
    out = Path(args.out)
    report = bench.run_all(paths, quick=args.quick)
    print(bench.format_table(report, summary=False))
    report_path = bench.write_report(report, out)
    print(f"report: {report_path}")
    if not args.no_plots:
        plots = bench.write_plots(report, out)
        if plots is None:
            print(f"note: no PNG written; {bench.PLOT_HINT}")
        else:
            for p in plots:
                print(f"plot:   {p}")
    # Last, where it is seen: which targets this run missed, and how many it met.
    print(bench.format_summary(report))
    failed = [b["module"] for b in report["benchmarks"] if b.get("error")]
    if failed:
        print(
            f"hipipc bench: error: {len(failed)} benchmark(s) failed: {', '.join(failed)}",
            file=sys.stderr,
        )
        return EXIT_FAIL
    missed = [
        row["case"] for b in report["benchmarks"] for row in b["rows"] if row.get("met") is False
    ]
    if args.check and missed:
        print(
            f"hipipc bench: {len(missed)} target(s) not met: {', '.join(missed)}", file=sys.stderr
        )
        return EXIT_MISSED
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hipipc",
        description="HIP-style IPC memory handles: inspect the handle store "
        "and run the benchmarks.",
        epilog=__doc__.split("\n", 2)[2].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hipipc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "info",
        help="version, backend, devices, store, sharing policy, exports",
        description="Show the hipipc version, the active backend "
        "($HIPIPC_BACKEND) and its devices, this user's store directory "
        "($HIPIPC_STORE), the sharing policy ($HIPIPC_SHARE) and how many "
        "exports are live.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "ls",
        help="list this user's exported segments",
        description="List the segments in this user's store: kind, size, "
        "exporting pid, whether that process still runs, and age.  Names are "
        "shown shortened; they are digests, never handle bytes.",
    )
    p.add_argument("--json", action="store_true", help="print JSON (full names) instead")
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser(
        "gc",
        help="remove segments whose exporting process has exited",
        description="Remove this user's segments whose exporter has exited "
        "(checked by pid and process start time, so a reused pid is not "
        "mistaken for the exporter).  Live exports are never touched.",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be removed, remove nothing"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON (full names of the removed segments) instead",
    )
    p.set_defaults(func=_cmd_gc)

    p = sub.add_parser(
        "bench",
        help="run the benchmarks, write report.json and plots",
        description="Run every benchmark (the bench_*.py modules of "
        "hipipc.benchmarks, plus those of a source checkout's benchmarks/ "
        "directory; each defines run(quick, progress) -> dict), print a table, "
        "and write report.json and one PNG per series (needs matplotlib: pip "
        "install hipipc[plot]) to --out.  Ctrl-C stops the run.",
    )
    p.add_argument(
        "--dir",
        metavar="DIR",
        help="run the bench_*.py files of DIR instead "
        "(default: the package's benchmarks and the source checkout's)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default="bench-report",
        help="report directory (default: ./bench-report)",
    )
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    p.add_argument(
        "--only",
        metavar="NAME",
        action="append",
        help="run only this benchmark (e.g. ipc for bench_ipc.py); repeatable",
    )
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--no-plots", action="store_true", help="write report.json only")
    p.add_argument(
        "--check", action="store_true", help=f"exit {EXIT_MISSED} if any target is not met"
    )
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except HipError as exc:
        print(f"hipipc {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:
        print(f"hipipc {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print(f"hipipc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
