"""`sandbox.commands`: foreground and background runs, stdin, connect, kill and list."""

import time

import pytest
from e2b import CommandExitException, TimeoutException


def test_run_captures_stdout_stderr_and_exit_code(sandbox):
    result = sandbox.commands.run("echo out; echo err >&2")
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.exit_code == 0
    assert result.error is None


def test_non_zero_exit_raises_command_exit_exception(sandbox):
    with pytest.raises(CommandExitException) as caught:
        sandbox.commands.run("echo before; echo oops >&2; exit 3")
    assert caught.value.exit_code == 3
    assert caught.value.stdout == "before\n"
    assert caught.value.stderr == "oops\n"


def test_runs_as_the_default_user_in_its_home(sandbox, home):
    result = sandbox.commands.run('id -u; pwd; echo "$HOME"')
    assert result.stdout.split("\n")[:3] == ["1000", str(home), str(home)]


def test_user_root_runs_as_root(sandbox):
    assert sandbox.commands.run("id -u", user="root").stdout == "0\n"


def test_envs_and_cwd(sandbox):
    result = sandbox.commands.run('echo "$GREETING"; pwd', envs={"GREETING": "hello there"}, cwd="/tmp")
    assert result.stdout == "hello there\n/tmp\n"
    # The SDK's own marker that the process runs in a sandbox.
    assert sandbox.commands.run('echo "$E2B_SANDBOX"').stdout == "true\n"


def test_on_stdout_callback_sees_every_line(sandbox):
    seen = []
    sandbox.commands.run("for i in 1 2 3; do echo line$i; done", on_stdout=seen.append)
    assert "".join(seen) == "line1\nline2\nline3\n"


def test_large_output_arrives_whole_to_a_slow_reader(sandbox):
    """The process writes far faster than this client reads (its callback stalls at first):
    the launching stream must still get every byte, in order."""
    size = 32 << 20
    calls = []

    def slow(chunk):
        calls.append(len(chunk))
        if len(calls) <= 100:
            time.sleep(0.005)

    result = sandbox.commands.run(
        f"head -c {size} /dev/zero | tr '\\0' x; echo -n end >&2", on_stdout=slow
    )
    assert sum(calls) == size
    assert len(result.stdout) == size
    assert result.stdout.count("x") == size
    assert result.stderr == "end"


def test_background_then_connect_receives_later_output(sandbox):
    handle = sandbox.commands.run("sleep 1; echo late; echo late-err >&2", background=True)
    assert handle.pid > 0
    connected = sandbox.commands.connect(handle.pid)
    assert connected.pid == handle.pid
    result = connected.wait()
    assert "late\n" in result.stdout
    assert "late-err\n" in result.stderr
    assert result.exit_code == 0
    # The original handle also sees the end.
    assert handle.wait().stdout == "late\n"


def test_send_stdin_reaches_the_process(sandbox):
    handle = sandbox.commands.run("read first; read second; echo got:$first:$second", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "one\n")
    handle.send_stdin("two\n")
    result = handle.wait()
    assert result.stdout == "got:one:two\n"


def test_kill_is_true_then_false_for_the_dead_pid(sandbox):
    handle = sandbox.commands.run("sleep 60", background=True)
    started = time.monotonic()
    assert sandbox.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as caught:
        handle.wait()
    assert caught.value.exit_code != 0
    assert time.monotonic() - started < 30
    assert sandbox.commands.kill(handle.pid) is False


def test_list_shows_running_commands(sandbox):
    handle = sandbox.commands.run("sleep 60 # wrenn-list-marker", background=True)
    try:
        listed = {p.pid: p for p in sandbox.commands.list()}
        assert handle.pid in listed
        info = listed[handle.pid]
        assert info.cmd == "/bin/bash"
        assert info.args == ["-l", "-c", "sleep 60 # wrenn-list-marker"]
    finally:
        assert handle.kill() is True
    with pytest.raises(CommandExitException):
        handle.wait()
    deadline = time.monotonic() + 5
    while handle.pid in {p.pid for p in sandbox.commands.list()}:
        assert time.monotonic() < deadline, "a killed command stays listed"
        time.sleep(0.05)


def test_timeout_kills_the_command(sandbox):
    started = time.monotonic()
    with pytest.raises((TimeoutException, CommandExitException)):
        sandbox.commands.run("sleep 30", timeout=1)
    assert time.monotonic() - started < 15


def test_short_command_round_trip_is_not_delayed(sandbox):
    """A command that exits at once must not wait on TCP's delayed-ACK/Nagle interplay
    (~40 ms per stream when envd's sockets lack TCP_NODELAY)."""
    sandbox.commands.run("true")
    samples = []
    for _ in range(15):
        started = time.monotonic()
        sandbox.commands.run("true")
        samples.append(time.monotonic() - started)
    samples.sort()
    median = samples[len(samples) // 2]
    assert median < 0.030, f"median round trip {median * 1000:.1f} ms: {[round(s * 1000, 1) for s in samples]}"
