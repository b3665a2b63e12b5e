"""`sandbox.files` on a real sandbox, a 50 MiB round trip checked by sha256 on both sides
and inside the sandbox, and signed URLs fetched without any header."""

import hashlib
import os

import httpx
import pytest
from e2b import FilesystemEventType, FileType, NotFoundException

from conftest import wait_for

DIR = "/root/wrenn-files"


def test_write_and_read_text_and_bytes(sandbox):
    info = sandbox.files.write(f"{DIR}/hello.txt", "héllo wrenn\n")
    assert info.path == f"{DIR}/hello.txt"
    assert info.name == "hello.txt"
    assert sandbox.files.read(f"{DIR}/hello.txt") == "héllo wrenn\n"
    every_byte = bytes(range(256)) * 4
    sandbox.files.write(f"{DIR}/bytes.bin", every_byte)
    assert bytes(sandbox.files.read(f"{DIR}/bytes.bin", format="bytes")) == every_byte
    # A command sees what the SDK wrote.
    assert sandbox.commands.run(f"cat {DIR}/hello.txt").stdout == "héllo wrenn\n"


def test_read_missing_file_is_not_found(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.files.read(f"{DIR}/no-such-file")


def test_dirs_list_exists_info_rename_remove(sandbox):
    base = f"{DIR}/tree"
    assert sandbox.files.make_dir(base) is True
    assert sandbox.files.make_dir(base) is False
    sandbox.files.write(f"{base}/a.txt", "aaa")
    sandbox.files.make_dir(f"{base}/sub")
    entries = {e.name: e for e in sandbox.files.list(base)}
    assert set(entries) == {"a.txt", "sub"}
    assert entries["a.txt"].type == FileType.FILE
    assert entries["sub"].type == FileType.DIR
    assert entries["a.txt"].path == f"{base}/a.txt"

    info = sandbox.files.get_info(f"{base}/a.txt")
    assert info.size == 3
    assert info.type == FileType.FILE
    assert sandbox.files.exists(f"{base}/a.txt") is True
    assert sandbox.files.exists(f"{base}/b.txt") is False

    moved = sandbox.files.rename(f"{base}/a.txt", f"{base}/b.txt")
    assert moved.path == f"{base}/b.txt"
    assert sandbox.files.exists(f"{base}/a.txt") is False
    assert sandbox.files.read(f"{base}/b.txt") == "aaa"

    sandbox.files.remove(f"{base}/b.txt")
    assert sandbox.files.exists(f"{base}/b.txt") is False
    sandbox.files.remove(base)
    assert sandbox.files.exists(base) is False


def test_write_files_writes_several(sandbox):
    written = sandbox.files.write_files(
        [
            {"path": f"{DIR}/many/one.txt", "data": "1"},
            {"path": f"{DIR}/many/two.txt", "data": b"22"},
            {"path": f"{DIR}/many/deep/three.txt", "data": "333"},
        ]
    )
    assert sorted(w.path for w in written) == sorted(
        [f"{DIR}/many/one.txt", f"{DIR}/many/two.txt", f"{DIR}/many/deep/three.txt"]
    )
    out = sandbox.commands.run(f"cd {DIR}/many && cat one.txt two.txt deep/three.txt").stdout
    assert out == "122333"


def test_watch_dir_sees_a_file_a_command_creates(sandbox):
    watched = f"{DIR}/watched"
    sandbox.files.make_dir(watched)
    handle = sandbox.files.watch_dir(watched)
    try:
        sandbox.commands.run(f"echo new > {watched}/made-by-command.txt")
        seen = []

        def created():
            seen.extend(handle.get_new_events())
            return [e for e in seen if e.name == "made-by-command.txt"]

        events = wait_for(created, 10, "a watch event for the new file")
        assert {e.type for e in events} & {FilesystemEventType.CREATE, FilesystemEventType.WRITE}, seen
    finally:
        handle.stop()


def test_50_mib_upload_and_download_keep_every_byte(sandbox):
    data = os.urandom(50 << 20)
    digest = hashlib.sha256(data).hexdigest()
    sandbox.files.write("/root/big.bin", data, request_timeout=240)
    inside = sandbox.commands.run("sha256sum /root/big.bin", timeout=120).stdout.split()[0]
    assert inside == digest
    back = bytes(sandbox.files.read("/root/big.bin", format="bytes", request_timeout=240))
    assert len(back) == len(data)
    assert hashlib.sha256(back).hexdigest() == digest
    sandbox.files.remove("/root/big.bin")


def test_signed_urls_work_without_headers(sandbox):
    path = "/root/signed.txt"
    upload = sandbox.upload_url(path)
    assert "signature=" in upload
    response = httpx.post(upload, files={"file": ("signed.txt", b"uploaded through a signed URL")}, timeout=30)
    assert response.status_code == 200, response.text
    assert sandbox.files.read(path) == "uploaded through a signed URL"

    download = sandbox.download_url(path)
    response = httpx.get(download, timeout=30)
    assert response.status_code == 200, response.text
    assert response.content == b"uploaded through a signed URL"

    # A URL whose signature was tampered with gets nothing.
    forged = download.replace("signature=v1_", "signature=v1_A")
    response = httpx.get(forged, timeout=30)
    assert response.status_code >= 400
    assert b"uploaded through" not in response.content
