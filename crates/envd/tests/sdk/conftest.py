"""Shared fixtures for the E2B SDK tests against a bare envd.

`tests/sdk_python.rs` starts envd in a network namespace of its own, listening on
localhost:49983 with users `root` and `user` (uid 1000, the default user), and runs pytest in
that namespace with E2B_DEBUG=true: the SDK then talks to envd directly, with no API calls.
It passes the test's directories in WRENN_* variables.
"""

import os
import time
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox


def _env_path(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.exit(f"{name} is not set: run these tests through `cargo test --test sdk_python`")
    return Path(value)


@pytest.fixture(scope="session")
def home() -> Path:
    """The default user's home directory (uid 1000)."""
    return _env_path("WRENN_TEST_HOME")


@pytest.fixture(scope="session")
def root_only() -> Path:
    """A directory only root may enter (mode 0700, owned by root)."""
    return _env_path("WRENN_TEST_ROOT_ONLY")


@pytest.fixture(scope="session")
def scratch() -> Path:
    """A directory on the host for the test's own files (not served by envd)."""
    return _env_path("WRENN_TEST_SCRATCH")


@pytest.fixture(scope="session")
def sandbox() -> Sandbox:
    """The SDK's sandbox object in debug mode, once envd answers /health."""
    assert os.environ.get("E2B_DEBUG") == "true"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get("http://localhost:49983/health", timeout=2).status_code == 204:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.exit("envd did not answer /health on localhost:49983")
        time.sleep(0.05)
    sbx = Sandbox.create()
    assert sbx.sandbox_id == "debug_sandbox_id"
    return sbx
