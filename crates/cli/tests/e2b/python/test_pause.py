"""Pause and resume through the SDK (files and running processes survive), and snapshots:
a new sandbox from a snapshot has the source's files."""

import time

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState

from conftest import new_sandbox, unique, wait_for

TICKER = "while true; do echo tick >> /root/ticks.txt; sleep 1; done"


def ticks(sbx) -> int:
    return len(sbx.files.read("/root/ticks.txt").splitlines())


def test_pause_then_connect_resumes_files_and_processes():
    tag = unique("pause")
    with new_sandbox(metadata={"wrenn-pause": tag}) as sbx:
        sbx.files.write("/root/kept.txt", "written before the pause")
        ticker = sbx.commands.run(TICKER, background=True, timeout=0)
        wait_for(lambda: sbx.files.exists("/root/ticks.txt") and ticks(sbx) >= 2, 15, "the ticker writing")
        # The ticker runs on in the sandbox without its output stream (a stream still open when
        # the sandbox pauses is cut; test_sandbox.py checks that).
        ticker.disconnect()

        assert sbx.pause() is True
        assert Sandbox.pause(sbx.sandbox_id) is False, "pausing a paused sandbox"
        paused = Sandbox.list(query=SandboxQuery(metadata={"wrenn-pause": tag}, state=[SandboxState.PAUSED])).next_items()
        assert [s.sandbox_id for s in paused] == [sbx.sandbox_id]
        assert paused[0].state == SandboxState.PAUSED
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        running = Sandbox.list(query=SandboxQuery(metadata={"wrenn-pause": tag}, state=[SandboxState.RUNNING])).next_items()
        assert running == []

        resumed = Sandbox.connect(sbx.sandbox_id)
        assert resumed.sandbox_id == sbx.sandbox_id
        assert resumed.get_info().state == SandboxState.RUNNING
        assert resumed.files.read("/root/kept.txt") == "written before the pause"
        assert ticker.pid in {p.pid for p in resumed.commands.list()}
        assert resumed.commands.run(f"kill -0 {ticker.pid} && echo alive", user="root").stdout == "alive\n"
        before = ticks(resumed)
        time.sleep(3)
        assert ticks(resumed) > before, "the ticker did not go on after the resume"
        assert resumed.commands.run("echo back").stdout == "back\n"
        assert resumed.commands.kill(ticker.pid) is True


def test_snapshot_starts_a_new_sandbox_with_the_files():
    with new_sandbox() as source:
        source.files.write("/root/from-snapshot.txt", "snapshot contents")
        source.commands.run("sync")
        snapshot = source.create_snapshot()
        assert snapshot.snapshot_id
        try:
            # The source goes on running after its snapshot.
            running = Sandbox.connect(source.sandbox_id)
            assert running.commands.run("cat /root/from-snapshot.txt").stdout == "snapshot contents"
            with new_sandbox(snapshot.snapshot_id, timeout=120) as copy:
                assert copy.sandbox_id != source.sandbox_id
                assert copy.files.read("/root/from-snapshot.txt") == "snapshot contents"
                copy.files.write("/root/from-snapshot.txt", "changed in the copy")
            assert source.files.read("/root/from-snapshot.txt") == "snapshot contents"
        finally:
            assert Sandbox.delete_snapshot(snapshot.snapshot_id) is True
        assert Sandbox.delete_snapshot(snapshot.snapshot_id) is False
        with pytest.raises(Exception):
            Sandbox.create(snapshot.snapshot_id, timeout=30).kill()


def test_a_timeout_that_pauses_and_traffic_that_resumes():
    lifecycle = {"on_timeout": "pause", "auto_resume": True}
    with new_sandbox(timeout=8, lifecycle=lifecycle) as sbx:
        info = sbx.get_info()
        assert info.lifecycle["on_timeout"] == "pause"
        assert info.lifecycle["auto_resume"] is True
        sbx.files.write("/root/kept.txt", "kept over the pause")
        sleeper = sbx.commands.run("sleep 600", background=True, timeout=0)
        sleeper.disconnect()
        wait_for(
            lambda: Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED,
            60,
            "the sandbox pausing at its 8 s timeout",
            1,
        )
        # The next request through the SDK resumes it: files and processes are there.
        assert sbx.commands.run("cat /root/kept.txt").stdout == "kept over the pause"
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
        assert sleeper.pid in {p.pid for p in sbx.commands.list()}
