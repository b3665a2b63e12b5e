"""The older E2B Python SDK generation (2.45.1: `POST /sandboxes`, `POST /sandboxes/{id}/connect`,
client-side `e2b_<hex>` key check) against `wrenn up`, run by `crates/cli/tests/e2b_sdk.rs`
with only E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set."""

import os

import pytest
from e2b import Sandbox


def pytest_configure(config):
    missing = [v for v in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY") if not os.environ.get(v)]
    if missing:
        pytest.exit(f"{', '.join(missing)} not set: run these tests through `cargo test --test e2b_sdk`")


@pytest.fixture(scope="module")
def sandbox():
    """One sandbox for the module, created the 2.45 way, killed at the end."""
    sbx = Sandbox.create(timeout=300, metadata={"suite": "python-2.45"}, envs={"WRENN_OLD_SDK": "2.45"})
    try:
        yield sbx
    finally:
        try:
            Sandbox.kill(sbx.sandbox_id)
        except Exception as e:
            print(f"killing {sbx.sandbox_id}: {e}")
