"""Create, run, files, connect by id, set_timeout and kill with e2b 2.45.1."""

import datetime
import importlib.metadata

import pytest
from e2b import CommandExitException, Sandbox, SandboxException


def test_this_is_the_older_sdk():
    assert importlib.metadata.version("e2b") == "2.45.1"


def test_create_and_run(sandbox):
    assert sandbox.sandbox_id
    result = sandbox.commands.run('echo hi; echo "$WRENN_OLD_SDK"')
    assert result.stdout == "hi\n2.45\n"
    assert result.exit_code == 0
    with pytest.raises(CommandExitException) as caught:
        sandbox.commands.run("echo nope >&2; exit 4")
    assert caught.value.exit_code == 4
    assert caught.value.stderr == "nope\n"


def test_files_write_and_read(sandbox):
    sandbox.files.write("/root/old-sdk.txt", "written by 2.45")
    assert sandbox.files.read("/root/old-sdk.txt") == "written by 2.45"
    data = bytes(range(256)) * 64
    sandbox.files.write("/root/old-sdk.bin", data)
    assert bytes(sandbox.files.read("/root/old-sdk.bin", format="bytes")) == data
    assert sandbox.files.exists("/root/old-sdk.txt") is True


def test_connect_by_id_sees_the_same_sandbox(sandbox):
    sandbox.files.write("/root/connect-marker.txt", "same sandbox")
    other = Sandbox.connect(sandbox.sandbox_id)
    assert other.sandbox_id == sandbox.sandbox_id
    assert other.files.read("/root/connect-marker.txt") == "same sandbox"
    assert other.commands.run("cat /root/connect-marker.txt").stdout == "same sandbox"
    info = other.get_info()
    assert info.metadata == {"suite": "python-2.45"}
    assert info.state == "running"


def test_set_timeout_moves_the_end(sandbox):
    before = sandbox.get_info().end_at
    sandbox.set_timeout(900)
    after = sandbox.get_info().end_at
    assert after > before
    remaining = (after - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 860 <= remaining <= 940, remaining


def test_kill():
    sbx = Sandbox.create(timeout=120)
    try:
        assert sbx.commands.run("echo up").stdout == "up\n"
        assert sbx.is_running() is True
    finally:
        assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id) is False
    assert sbx.is_running() is False
    with pytest.raises(SandboxException):
        Sandbox.connect(sbx.sandbox_id)
