"""Fuzz every public function with hostile arguments: only HipError, TypeError or ValueError
may escape (TimeoutError/EOFError where documented), and nothing may crash or hang.

The calls run in a child interpreter (``tests/fuzz_api_child.py``) so that a crash is seen
as a crash (an exit by signal, with the call that caused it from the child's log) instead of
taking the suite down.  The seed is random per run and printed on failure; set
``HIPIPC_FUZZ_SEED`` to replay one (``HIPIPC_FUZZ_SECONDS`` to run longer).  New functions
added to ``hipipc.__all__`` are fuzzed without any change here.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from _proc import child_env

CHILD = Path(__file__).with_name("fuzz_api_child.py")


def test_fuzz_public_api(tmp_path):
    seed = int(os.environ.get("HIPIPC_FUZZ_SEED", random.randrange(2**32)))
    seconds = os.environ.get("HIPIPC_FUZZ_SECONDS", "20")
    log = tmp_path / "calls.log"
    replay = f"HIPIPC_FUZZ_SEED={seed} python -m pytest tests/test_fuzz_api.py"
    try:
        proc = subprocess.run(
            [sys.executable, str(CHILD), str(seed), seconds, "30000", str(log)],
            capture_output=True,
            env=child_env(),
            timeout=float(seconds) + 60,
        )
    except subprocess.TimeoutExpired:
        last = log.read_text(errors="replace").splitlines()[-3:] if log.exists() else []
        raise AssertionError(
            f"fuzz seed {seed} hung; last calls: {last}; replay: {replay}"
        ) from None
    if proc.returncode != 0:
        last = log.read_text(errors="replace").splitlines()[-3:] if log.exists() else []
        raise AssertionError(
            f"fuzz seed {seed}: the child exited {proc.returncode}; last "
            f"calls: {last}\n{proc.stderr.decode()[-3000:]}\nreplay: {replay}"
        )
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    escapes = result["escapes"]
    assert not escapes, (
        f"fuzz seed {seed}: {len(escapes)} escape(s), first: "
        f"{escapes[0]['call']}\n{escapes[0]['tb']}\nreplay: {replay}"
    )
    assert result["calls"] > 500, result  # the run really ran
    assert not result["missed"], f"never called: {result['missed']} (seed {seed})"
