"""A 200 MiB upload streamed from a file object and a download read as a stream, checked
by sha256 on both sides."""

import hashlib
import os

SIZE = 200 << 20


def _make_source(path):
    """A 200 MiB file of varied bytes (so that a dropped or repeated chunk changes the hash)."""
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(SIZE >> 20):
            chunk = i.to_bytes(8, "little") + block[8:]
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_200mib_upload_and_download_by_sha256(sandbox, home, scratch):
    source = scratch / "source.bin"
    expected = _make_source(source)

    with open(source, "rb") as f:
        info = sandbox.files.write("big/upload.bin", f)
    assert info.path == str(home / "big/upload.bin")
    on_disk = home / "big/upload.bin"
    assert on_disk.stat().st_size == SIZE
    assert on_disk.stat().st_uid == 1000
    assert _sha256_file(on_disk) == expected

    digest = hashlib.sha256()
    size = 0
    chunks = 0
    with sandbox.files.read(str(on_disk), format="stream") as stream:
        for chunk in stream:
            digest.update(chunk)
            size += len(chunk)
            chunks += 1
    assert size == SIZE
    assert chunks > 1, "the download arrived in one piece, not streamed"
    assert digest.hexdigest() == expected
