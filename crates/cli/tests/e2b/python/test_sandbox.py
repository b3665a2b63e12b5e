"""The sandbox lifecycle through the SDK's public API: create, info, timeouts, list, kill,
metrics and the errors a user meets."""

import datetime
import threading
import time

import pytest
from e2b import (
    AuthenticationException,
    NotFoundException,
    Sandbox,
    SandboxException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
)

from conftest import new_sandbox, unique, wait_for


def now():
    return datetime.datetime.now(datetime.timezone.utc)


def test_create_with_defaults_then_kill():
    sbx = Sandbox.create()
    try:
        assert sbx.sandbox_id
        assert sbx.is_running() is True
        assert sbx.commands.run("echo hi").stdout == "hi\n"
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert "base" in (info.template_id, info.name), info
        assert info.state == SandboxState.RUNNING
        assert info.metadata == {}
        assert info.cpu_count >= 1
        assert info.memory_mb > 0
        assert info.started_at <= now() + datetime.timedelta(seconds=5)
        # No timeout given: the server's default, 300 s.
        lifetime = (info.end_at - info.started_at).total_seconds()
        assert 240 <= lifetime <= 330, lifetime
    finally:
        assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id) is False
    assert sbx.is_running() is False
    with pytest.raises(SandboxException):
        Sandbox.connect(sbx.sandbox_id)


def test_create_with_template_timeout_metadata_and_envs():
    tag = unique("args")
    with new_sandbox(
        "base",
        timeout=120,
        metadata={"suite": "python-2.63", "case": tag},
        envs={"WRENN_GREETING": "hello from e2b"},
    ) as sbx:
        assert sbx.commands.run('echo "$WRENN_GREETING"').stdout == "hello from e2b\n"
        info = sbx.get_info()
        assert info.metadata == {"suite": "python-2.63", "case": tag}
        assert info.state == SandboxState.RUNNING
        lifetime = (info.end_at - info.started_at).total_seconds()
        assert 100 <= lifetime <= 140, lifetime
        # The class-level call sees the same sandbox.
        assert Sandbox.get_info(sbx.sandbox_id).metadata["case"] == tag

        # set_timeout moves the end forward from now.
        sbx.set_timeout(600)
        later = sbx.get_info().end_at
        assert later > info.end_at
        remaining = (later - now()).total_seconds()
        assert 560 <= remaining <= 640, remaining


def test_metrics_report_cpus_and_memory(sandbox):
    def sampled():
        return sandbox.get_metrics()

    metrics = wait_for(sampled, 30, "a metrics sample")
    last = metrics[-1]
    assert last.cpu_count >= 1
    assert last.mem_total > 0
    assert 0 <= last.mem_used <= last.mem_total
    assert last.cpu_used_pct >= 0


def test_list_filters_by_metadata_and_state_and_pages():
    tag = unique("list")
    with new_sandbox(metadata={"wrenn-list": tag}) as a, new_sandbox(metadata={"wrenn-list": tag}) as b:
        ours = {a.sandbox_id, b.sandbox_id}
        page = Sandbox.list(query=SandboxQuery(metadata={"wrenn-list": tag})).next_items()
        assert {s.sandbox_id for s in page} == ours
        assert all(s.metadata == {"wrenn-list": tag} for s in page)
        assert all(s.state == SandboxState.RUNNING for s in page)

        running = Sandbox.list(
            query=SandboxQuery(metadata={"wrenn-list": tag}, state=[SandboxState.RUNNING])
        ).next_items()
        assert {s.sandbox_id for s in running} == ours
        paused = Sandbox.list(
            query=SandboxQuery(metadata={"wrenn-list": tag}, state=[SandboxState.PAUSED])
        ).next_items()
        assert paused == []

        # The whole list (no filter) holds both too.
        everything = set()
        paginator = Sandbox.list()
        while paginator.has_next:
            everything |= {s.sandbox_id for s in paginator.next_items()}
        assert ours <= everything

        # One per page: two pages, then no more.
        paginator = Sandbox.list(query=SandboxQuery(metadata={"wrenn-list": tag}), limit=1)
        first = paginator.next_items()
        assert len(first) == 1
        assert paginator.has_next is True
        second = paginator.next_items()
        assert len(second) == 1
        assert {first[0].sandbox_id, second[0].sandbox_id} == ours
        if paginator.has_next:
            assert paginator.next_items() == []
        assert paginator.has_next is False


def test_a_stream_open_while_the_sandbox_is_killed_ends():
    with new_sandbox(timeout=120) as sbx:
        handle = sbx.commands.run("sleep 100", background=True, timeout=0)
        killer = threading.Timer(2, lambda: Sandbox.kill(sbx.sandbox_id))
        killer.start()
        started = time.monotonic()
        with pytest.raises(SandboxException) as raised:
            handle.wait()
        killer.join()
        assert time.monotonic() - started < 30, "the stream outlived its sandbox"
        assert isinstance(raised.value, SandboxNotRunningException), repr(raised.value)


def test_timeout_reaps_the_sandbox():
    with new_sandbox(timeout=120) as sbx:
        assert sbx.commands.run("echo alive").stdout == "alive\n"
        sbx.set_timeout(10)
        started = time.monotonic()
        wait_for(lambda: not sbx.is_running(), 40, "the sandbox stopping after its 10 s timeout", 2)
        assert time.monotonic() - started >= 5

        def forgotten():
            try:
                Sandbox.get_info(sbx.sandbox_id)
                return False
            except NotFoundException:
                return True

        # The control plane keeps the time too: the API forgets the sandbox within seconds.
        wait_for(forgotten, 20, "the API forgetting the reaped sandbox", 1)
        with pytest.raises(SandboxException):
            Sandbox.connect(sbx.sandbox_id)
        assert sbx.sandbox_id not in {
            s.sandbox_id for s in Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING])).next_items()
        }


def test_connect_to_an_unknown_sandbox_is_not_found():
    with pytest.raises(NotFoundException):
        Sandbox.connect("wrennnosuchsandbox00")
    with pytest.raises(NotFoundException):
        Sandbox.get_info("wrennnosuchsandbox00")
    assert Sandbox.kill("wrennnosuchsandbox00") is False


def test_a_wrong_api_key_is_an_authentication_error():
    wrong = "e2b_" + "0123456789abcdef" * 2 + "01234567"
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key=wrong, timeout=30)
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key=wrong).next_items()
