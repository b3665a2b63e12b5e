"""`sandbox.pty`: an interactive bash on a terminal: input, output, resize and kill."""

import threading
import time

import pytest
from e2b import CommandExitException, PtySize


class Terminal:
    """Collects a PTY's output on a thread while the test types into it."""

    def __init__(self, sandbox, size):
        self.sandbox = sandbox
        self.handle = sandbox.pty.create(size)
        self.output = bytearray()
        self.lock = threading.Lock()
        self.ended = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        def on_pty(chunk):
            with self.lock:
                self.output.extend(chunk)

        try:
            self.handle.wait(on_pty=on_pty)
            self.ended = "exit 0"
        except Exception as e:  # a killed shell ends with a non-zero exit
            self.ended = e

    def type(self, text):
        self.sandbox.pty.send_stdin(self.handle.pid, text.encode())

    def wait_for(self, needle, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if needle.encode() in self.output:
                    return
                text = bytes(self.output).decode(errors="replace")
            assert time.monotonic() < deadline, f"no {needle!r} in the terminal output:\n{text}"
            time.sleep(0.05)


def test_pty_input_output_resize_and_kill(sandbox):
    term = Terminal(sandbox, PtySize(rows=24, cols=80))
    assert term.handle.pid > 0

    # The typed text is echoed; only the shell's output contains the computed value.
    term.type("echo marker-$((6*7))\n")
    term.wait_for("marker-42")
    term.type('echo "tty-$(tty | cut -c1-8)"\n')
    term.wait_for("tty-/dev/pts")
    term.type("echo size-$(stty size | tr ' ' x)\n")
    term.wait_for("size-24x80")

    sandbox.pty.resize(term.handle.pid, PtySize(rows=40, cols=100))
    term.type("echo size-$(stty size | tr ' ' x)\n")
    term.wait_for("size-40x100")

    # Control characters pass through: Ctrl-C interrupts a foreground sleep.
    term.type("sleep 30\n")
    time.sleep(0.3)
    term.type("\x03")
    term.type("echo after-$((1+1))-interrupt\n")
    term.wait_for("after-2-interrupt", timeout=10)

    assert sandbox.pty.kill(term.handle.pid) is True
    term.thread.join(timeout=15)
    assert not term.thread.is_alive(), "the PTY stream did not end after kill"
    assert isinstance(term.ended, CommandExitException), term.ended
    assert sandbox.pty.kill(term.handle.pid) is False


def test_pty_exit_ends_the_stream_with_the_exit_code(sandbox):
    term = Terminal(sandbox, PtySize(rows=10, cols=40))
    term.type("exit 5\n")
    term.thread.join(timeout=15)
    assert not term.thread.is_alive()
    assert isinstance(term.ended, CommandExitException), term.ended
    assert term.ended.exit_code == 5


def test_pty_honours_envs_and_cwd(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80), cwd="/tmp", envs={"WRENN_PTY": "yes"})
    output = bytearray()
    done = threading.Event()

    def read():
        try:
            handle.wait(on_pty=output.extend)
        except CommandExitException:
            pass
        done.set()

    threading.Thread(target=read, daemon=True).start()
    sandbox.pty.send_stdin(handle.pid, b'echo "env-$WRENN_PTY-$TERM"; echo "cwd-$(pwd)-end"; exit\n')
    assert done.wait(15), bytes(output)
    text = bytes(output).decode(errors="replace")
    assert "env-yes-xterm-256color" in text, text
    assert "cwd-/tmp-end" in text, text
