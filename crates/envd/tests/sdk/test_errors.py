"""Bad input: an unknown user, paths the user may not touch, missing processes. Each must
raise the SDK's error for it, and envd must keep serving afterwards."""

import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
    NotFoundException,
    SandboxException,
)


REFUSED = (SandboxException, AuthenticationException)


def _still_serving(sandbox):
    assert sandbox.commands.run("echo alive").stdout == "alive\n"
    assert sandbox.files.exists("/") is True
    assert sandbox.is_running() is True


def test_unknown_user_is_an_authentication_error(sandbox):
    with pytest.raises(AuthenticationException) as caught:
        sandbox.commands.run("true", user="nobody-here")
    assert "nobody-here" in str(caught.value)
    with pytest.raises(AuthenticationException):
        sandbox.files.list("/", user="nobody-here")
    with pytest.raises(AuthenticationException):
        sandbox.files.read("/etc/hostname", user="nobody-here")
    with pytest.raises(AuthenticationException):
        sandbox.files.write("/tmp/never.txt", "x", user="nobody-here")
    _still_serving(sandbox)


def test_root_only_paths_are_refused_to_the_user(sandbox, root_only, home):
    secret = root_only / "secret.txt"
    # Root may, through envd.
    sandbox.files.write(str(secret), "for root", user="root")
    assert secret.read_text() == "for root"
    assert sandbox.files.read(str(secret), user="root") == "for root"

    # The default user may not: read, write, list, make_dir, rename, remove. (`/files` may
    # answer 403 or 401; the SDK maps 401 to AuthenticationException.)
    with pytest.raises(REFUSED):
        sandbox.files.read(str(secret))
    with pytest.raises(REFUSED):
        sandbox.files.write(str(root_only / "planted.txt"), "mine")
    assert not (root_only / "planted.txt").exists()
    with pytest.raises(SandboxException):
        sandbox.files.list(str(root_only))
    with pytest.raises(SandboxException):
        sandbox.files.make_dir(str(root_only / "newdir"))
    assert not (root_only / "newdir").exists()
    with pytest.raises(SandboxException):
        sandbox.files.rename(str(secret), str(home / "stolen.txt"))
    assert not (home / "stolen.txt").exists()
    with pytest.raises(SandboxException):
        sandbox.files.remove(str(secret))
    assert secret.read_text() == "for root"
    # And a command run as the user cannot either.
    with pytest.raises(CommandExitException) as caught:
        sandbox.commands.run(f"cat {secret}")
    assert "Permission denied" in caught.value.stderr
    _still_serving(sandbox)


def test_missing_things_are_not_found(sandbox, home):
    with pytest.raises(NotFoundException):
        sandbox.files.list(str(home / "does/not/exist"))
    with pytest.raises(NotFoundException):
        sandbox.files.rename(str(home / "nope.txt"), str(home / "nope2.txt"))
    with pytest.raises(NotFoundException):
        sandbox.files.remove(str(home / "nope.txt"))
    assert sandbox.commands.kill(999_999) is False
    with pytest.raises(SandboxException):
        sandbox.commands.connect(999_999).wait()
    with pytest.raises(SandboxException):
        sandbox.commands.send_stdin(999_999, "x")
    _still_serving(sandbox)


def test_bad_cwd_and_missing_program(sandbox):
    with pytest.raises(SandboxException):
        sandbox.commands.run("true", cwd="/no/such/dir")
    with pytest.raises(CommandExitException) as caught:
        sandbox.commands.run("/no/such/program")
    assert caught.value.exit_code == 127
    _still_serving(sandbox)
