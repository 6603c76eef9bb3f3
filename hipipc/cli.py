"""The ``hipipc`` command: ``hipipc info | ls | gc``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from . import __version__
from .errors import HipError
from .registry import get_registry
from .store import HandleStore, share_mode


def _cmd_info(args: argparse.Namespace) -> int:
    reg = get_registry()
    store = reg.backend.store
    mode = share_mode()
    live = sum(1 for _ in store.entries())
    print(f"hipipc {__version__}")
    print(f"backend:  {reg.backend.name}")
    print(f"devices:  {reg.backend.device_count()}")
    print(f"store:    {store.own_path()}  (template {store.template})")
    print(f"sharing:  {os.environ.get('HIPIPC_SHARE', 'user')} (segments mode {mode:04o})")
    print(f"exports:  {live} live name(s) in this user's store")
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    store = HandleStore()
    now = time.time()
    rows = []
    for name, info, _st in store.entries():
        if info is None:
            rows.append((name[:12], "?", "?", "foreign file", "?"))
            continue
        state = "alive" if info.exporter_alive() else "dead"
        rows.append((name[:12], info.kind.name.lower(), str(info.size), f"{info.pid} ({state})",
                     f"{now - info.created:.0f}s"))
    print(f"{'name':12}  {'kind':12}  {'bytes':>12}  {'exporter pid':18}  age")
    for r in rows:
        print(f"{r[0]:12}  {r[1]:12}  {r[2]:>12}  {r[3]:18}  {r[4]}")
    print(f"{len(rows)} segment(s) in {store.own_path()}")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    store = HandleStore()
    removed = store.collect()
    print(f"removed {len(removed)} segment(s) of exited exporters from {store.own_path()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hipipc", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hipipc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, backend, devices, store and sharing policy"
                   ).set_defaults(func=_cmd_info)
    sub.add_parser("ls", help="list this user's exported segments"
                   ).set_defaults(func=_cmd_ls)
    sub.add_parser("gc", help="remove segments whose exporting process has exited"
                   ).set_defaults(func=_cmd_gc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HipError as exc:
        print(f"hipipc {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
