"""`sandbox.files`: write, read, list, exists, rename, remove, make_dir, get_info,
write_files and watch_dir, checked against what is on disk (envd shares our filesystem)."""

import asyncio
import os
import time

import pytest
from e2b import AsyncSandbox, FileType, FilesystemEventType, NotFoundException


def test_write_str_and_read_text(sandbox, home):
    info = sandbox.files.write("notes/hello.txt", "héllo\nworld\n")
    assert info.name == "hello.txt"
    assert info.path == str(home / "notes/hello.txt")
    assert info.type == FileType.FILE
    on_disk = home / "notes/hello.txt"
    assert on_disk.read_text() == "héllo\nworld\n"
    # Created as the default user, parents included.
    assert on_disk.stat().st_uid == 1000
    assert (home / "notes").stat().st_uid == 1000
    assert sandbox.files.read("notes/hello.txt") == "héllo\nworld\n"
    assert sandbox.files.read(str(on_disk), format="text") == "héllo\nworld\n"


def test_write_bytes_and_read_bytes(sandbox, home):
    data = bytes(range(256)) * 17
    path = str(home / "bin/data.bin")
    info = sandbox.files.write(path, data)
    assert info.path == path
    assert (home / "bin/data.bin").read_bytes() == data
    read = sandbox.files.read(path, format="bytes")
    assert bytes(read) == data
    # Overwriting replaces the whole file.
    sandbox.files.write(path, b"short")
    assert bytes(sandbox.files.read(path, format="bytes")) == b"short"


def test_list_exists_and_get_info(sandbox, home):
    base = home / "listing"
    sandbox.files.write(str(base / "a.txt"), "aaa")
    sandbox.files.write(str(base / "sub/b.txt"), "bb")
    entries = {e.name: e for e in sandbox.files.list(str(base))}
    assert set(entries) == {"a.txt", "sub"}
    assert entries["a.txt"].type == FileType.FILE
    assert entries["a.txt"].path == str(base / "a.txt")
    assert entries["a.txt"].size == 3
    assert entries["sub"].type == FileType.DIR
    deep = {e.path for e in sandbox.files.list(str(base), depth=2)}
    assert str(base / "sub/b.txt") in deep

    assert sandbox.files.exists(str(base / "a.txt")) is True
    assert sandbox.files.exists("listing/sub") is True
    assert sandbox.files.exists(str(base / "missing.txt")) is False

    info = sandbox.files.get_info(str(base / "a.txt"))
    assert info.name == "a.txt"
    assert info.path == str(base / "a.txt")
    assert info.type == FileType.FILE
    assert info.size == 3
    assert info.owner == "user"
    assert info.permissions.startswith("-rw")
    assert info.mode & 0o777 == (base / "a.txt").stat().st_mode & 0o777
    assert abs(info.modified_time.timestamp() - (base / "a.txt").stat().st_mtime) < 2
    dir_info = sandbox.files.get_info(str(base / "sub"))
    assert dir_info.type == FileType.DIR
    with pytest.raises(NotFoundException):
        sandbox.files.get_info(str(base / "missing.txt"))


def test_rename_and_remove(sandbox, home):
    sandbox.files.write("moving/old.txt", "content")
    info = sandbox.files.rename(str(home / "moving/old.txt"), str(home / "moving/new.txt"))
    assert info.name == "new.txt"
    assert info.path == str(home / "moving/new.txt")
    assert not (home / "moving/old.txt").exists()
    assert (home / "moving/new.txt").read_text() == "content"
    assert sandbox.files.exists("moving/old.txt") is False

    sandbox.files.remove(str(home / "moving/new.txt"))
    assert not (home / "moving/new.txt").exists()
    assert sandbox.files.exists("moving/new.txt") is False
    # Directories are removed with their contents.
    sandbox.files.write("moving/tree/x/y.txt", "y")
    sandbox.files.remove(str(home / "moving/tree"))
    assert not (home / "moving/tree").exists()


def test_make_dir_true_then_false(sandbox, home):
    path = str(home / "made/deep/dir")
    assert sandbox.files.make_dir(path) is True
    assert (home / "made/deep/dir").is_dir()
    assert (home / "made/deep/dir").stat().st_uid == 1000
    assert sandbox.files.make_dir(path) is False


def test_write_files_writes_every_file(sandbox, home):
    written = sandbox.files.write_files(
        [
            {"path": str(home / "multi/one.txt"), "data": "first"},
            {"path": str(home / "multi/two.bin"), "data": b"\x00\x01second"},
            {"path": "multi/nested/three.txt", "data": "third"},
        ]
    )
    assert sorted(w.path for w in written) == sorted(
        [str(home / "multi/one.txt"), str(home / "multi/two.bin"), str(home / "multi/nested/three.txt")]
    )
    assert (home / "multi/one.txt").read_text() == "first"
    assert (home / "multi/two.bin").read_bytes() == b"\x00\x01second"
    assert sandbox.files.read("multi/nested/three.txt") == "third"


def test_read_missing_file_is_not_found(sandbox, home):
    with pytest.raises(NotFoundException):
        sandbox.files.read(str(home / "no/such/file.txt"))


def test_watch_dir_reports_a_created_file(sandbox, home):
    watched = home / "watched"
    sandbox.files.make_dir(str(watched))
    handle = sandbox.files.watch_dir(str(watched))
    try:
        sandbox.files.write(str(watched / "created.txt"), "new")
        deadline = time.monotonic() + 10
        events = []
        while not any(e.name == "created.txt" and e.type == FilesystemEventType.CREATE for e in events):
            assert time.monotonic() < deadline, f"no create event for created.txt: {events}"
            time.sleep(0.1)
            events.extend(handle.get_new_events())
        # A write from a process inside the sandbox counts too.
        sandbox.commands.run(f"echo more >> {watched / 'created.txt'}")
        deadline = time.monotonic() + 10
        while not any(e.name == "created.txt" and e.type == FilesystemEventType.WRITE for e in events):
            assert time.monotonic() < deadline, f"no write event for created.txt: {events}"
            time.sleep(0.1)
            events.extend(handle.get_new_events())
    finally:
        handle.stop()


def test_watch_dir_stream_reports_a_created_file(home):
    """The async SDK watches through the WatchDir server stream (the sync one polls)."""
    watched = home / "watched-stream"
    watched.mkdir()
    os.chown(watched, 1000, 1000)

    async def run():
        sandbox = await AsyncSandbox.create()
        seen = []
        created = asyncio.Event()

        def on_event(event):
            seen.append(event)
            if event.name == "streamed.txt" and event.type == FilesystemEventType.CREATE:
                created.set()

        handle = await sandbox.files.watch_dir(str(watched), on_event=on_event)
        try:
            await sandbox.files.write(str(watched / "streamed.txt"), "hi")
            await asyncio.wait_for(created.wait(), 10)
        finally:
            await handle.stop()
        return seen

    seen = asyncio.run(run())
    assert any(e.name == "streamed.txt" for e in seen), seen
