"""`sandbox.commands` on a real sandbox: foreground runs, errors, options, streaming,
background commands seen from a second connection, stdin."""

import time

import pytest
from e2b import CommandExitException, Sandbox

from conftest import wait_for


def test_echo(sandbox):
    result = sandbox.commands.run("echo hi")
    assert result.stdout == "hi\n"
    assert result.stderr == ""
    assert result.exit_code == 0
    assert result.error is None


def test_non_zero_exit_raises_with_code_and_stderr(sandbox):
    with pytest.raises(CommandExitException) as caught:
        sandbox.commands.run("echo partial; echo broken >&2; exit 3")
    assert caught.value.exit_code == 3
    assert caught.value.stdout == "partial\n"
    assert caught.value.stderr == "broken\n"


def test_cwd_envs_and_user(sandbox):
    result = sandbox.commands.run(
        'pwd; echo "$WRENN_VAR"; id -un',
        cwd="/tmp",
        envs={"WRENN_VAR": "value with spaces"},
        user="root",
    )
    assert result.stdout == "/tmp\nvalue with spaces\nroot\n"
    # The sandbox's own markers, as E2B sets them.
    marker = sandbox.commands.run('echo "$E2B_SANDBOX"').stdout
    assert marker == "true\n"


def test_on_stdout_streams_while_the_command_runs(sandbox):
    arrivals = []
    started = time.monotonic()
    result = sandbox.commands.run(
        "for i in 1 2 3; do echo line$i; sleep 1; done",
        on_stdout=lambda chunk: arrivals.append((time.monotonic() - started, chunk)),
        on_stderr=lambda chunk: arrivals.append((time.monotonic() - started, "ERR" + chunk)),
    )
    ended = time.monotonic() - started
    assert "".join(chunk for _, chunk in arrivals) == "line1\nline2\nline3\n"
    assert result.stdout == "line1\nline2\nline3\n"
    # The first line came long before the end: output is streamed, not batched.
    assert arrivals[0][0] < ended - 1.5, (arrivals, ended)


def test_background_command_listed_connected_from_a_second_object_and_killed(sandbox):
    handle = sandbox.commands.run("sleep 30; echo done", background=True)
    assert handle.pid > 0
    listed = {p.pid: p for p in sandbox.commands.list()}
    assert handle.pid in listed
    assert listed[handle.pid].args == ["-l", "-c", "sleep 30; echo done"]

    other = Sandbox.connect(sandbox.sandbox_id)
    assert other.sandbox_id == sandbox.sandbox_id
    connected = other.commands.connect(handle.pid)
    assert connected.pid == handle.pid
    assert connected.kill() is True
    with pytest.raises(CommandExitException):
        connected.wait()
    wait_for(
        lambda: handle.pid not in {p.pid for p in sandbox.commands.list()},
        10,
        "the killed command leaving the list",
    )
    assert sandbox.commands.kill(handle.pid) is False


def test_output_that_arrives_after_connect(sandbox):
    handle = sandbox.commands.run("sleep 2; echo late; echo late-err >&2", background=True)
    other = Sandbox.connect(sandbox.sandbox_id)
    result = other.commands.connect(handle.pid).wait()
    assert result.stdout == "late\n"
    assert result.stderr == "late-err\n"
    assert result.exit_code == 0
    assert handle.wait().stdout == "late\n"


def test_stdin_send_and_close(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "first line\n")
    handle.send_stdin(b"second \x00 line\n")
    sandbox.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert result.stdout == "first line\nsecond \x00 line\n"
    assert result.exit_code == 0
