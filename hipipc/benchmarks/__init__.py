"""The benchmarks ``hipipc bench`` runs, shipped in the package so the command works anywhere.

Each ``bench_<name>.py`` module defines ``run(quick=False, progress=None) -> dict`` (the result
format is described in :mod:`hipipc.bench`) and ``main(argv=None) -> int``, its own command
line: ``python -m hipipc.benchmarks.bench_ipc [--quick] [--json PATH]``.  A source checkout
keeps thin ``benchmarks/bench_*.py`` scripts that run these modules.
"""
