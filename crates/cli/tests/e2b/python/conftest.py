"""Shared helpers for the E2B Python SDK (2.63) against `wrenn up`.

`crates/cli/tests/e2b_sdk.rs` starts `wrenn up` and runs pytest here with only E2B_API_URL,
E2B_SANDBOX_URL and E2B_API_KEY set, exactly as a user would point the SDK at Wrenn. Every
sandbox a test makes has a short timeout and is killed when the test (or module) ends, so a
failing test leaves nothing running.
"""

import contextlib
import os
import time
import uuid

import pytest
from e2b import Sandbox

# Seconds a test sandbox lives unless killed first.
TIMEOUT = 300


def pytest_configure(config):
    missing = [v for v in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY") if not os.environ.get(v)]
    if missing:
        pytest.exit(f"{', '.join(missing)} not set: run these tests through `cargo test --test e2b_sdk`")


def unique(prefix: str) -> str:
    """A value no other test (or earlier run) uses, for metadata filters."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def new_sandbox(*args, **kwargs):
    """`Sandbox.create(...)` with a short timeout, killed on the way out."""
    kwargs.setdefault("timeout", TIMEOUT)
    sbx = Sandbox.create(*args, **kwargs)
    try:
        yield sbx
    finally:
        try:
            Sandbox.kill(sbx.sandbox_id)
        except Exception as e:  # the test's own failure matters more
            print(f"killing {sbx.sandbox_id}: {e}")


@pytest.fixture(scope="module")
def sandbox():
    """One sandbox shared by a module's tests (each create takes seconds)."""
    with new_sandbox(metadata={"suite": "python-2.63"}) as sbx:
        yield sbx


def wait_for(check, timeout: float, what: str, interval: float = 0.5):
    """Polls `check()` until it returns something truthy; fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(interval)
