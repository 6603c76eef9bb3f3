"""Shared fixtures: every test runs against a private store, and must leave it empty."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest


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
