"""Shared fixtures: every test runs against a private store, and must leave it empty."""

from __future__ import annotations

import os
import shutil
import threading
import uuid

import pytest

import hipipc as hip


@pytest.fixture(autouse=True, scope="session")
def _private_store():
    """Point the whole run (and its child processes) at a fresh store; check it ends empty."""
    path = f"/dev/shm/hipipc-test-{uuid.uuid4().hex[:8]}-{{uid}}"
    os.environ["HIPIPC_STORE"] = path
    yield path
    store = path.replace("{uid}", str(os.geteuid()))
    left = os.listdir(store) if os.path.isdir(store) else []
    shutil.rmtree(store, ignore_errors=True)
    assert not left, f"the suite left {len(left)} segment(s) in {store}"


@pytest.fixture(params=["store", "fd"])
def transport(request, monkeypatch):
    """Run a test on both transports: ``$HIPIPC_TRANSPORT`` set for this process and the
    processes it starts, and this process's choice (read once) reset around the test.  For the
    rules both transports share; the differences are tested in test_fd_transport.py."""
    from hipipc.fdtransport import fd_route_supported, reset_default_transport

    if request.param == "fd" and not fd_route_supported():
        pytest.skip("this kernel gives no fd transport")
    from hipipc.fdtransport import default_transport

    monkeypatch.setenv("HIPIPC_TRANSPORT", request.param)
    reset_default_transport()
    assert default_transport() == request.param  # new allocations take it
    yield request.param
    reset_default_transport()


@pytest.fixture
def gate():
    """A factory of gates; every gate is opened at teardown so no stream worker stays blocked."""
    made: list[threading.Event] = []

    def new() -> threading.Event:
        made.append(threading.Event())
        return made[-1]

    yield new
    for g in made:
        g.set()


@pytest.fixture
def stream():
    """``stream() -> a new stream``; destroyed and drained at teardown."""
    made: list[hip.Stream] = []

    def new() -> hip.Stream:
        made.append(hip.hipStreamCreate())
        return made[-1]

    yield new
    for s in made:
        if not s.destroyed:
            hip.hipStreamDestroy(s)
    try:
        hip.hipDeviceSynchronize(timeout=5)
    except hip.HipError:
        pass  # a test's deliberate failures are reported here; the test checked them already
