"""The live progress view: plain lines without a terminal, an in-place view on one."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import minigun as mg
from minigun import progress


class TimedStream(io.StringIO):
    """A text stream that remembers when each write happened."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.writes.append((time.perf_counter(), text))
        return super().write(text)


class Slow(mg.Task):
    def __init__(self, n: int = 60, pause: float = 0.02) -> None:
        self.n, self.pause = n, pause

    @mg.producer(total=60)
    def numbers(self):
        for k in range(self.n):
            time.sleep(self.pause)
            yield k

    @mg.processor(threads=2)
    def double(self, n):
        return n * 2

    @mg.consumer
    def sink(self, n):
        pass


def test_plain_view_first_block_within_a_second_then_a_last_one():
    stream = TimedStream()
    started = time.perf_counter()
    result = Slow().run(progress=stream)
    assert result.ok
    blocks = [text for _, text in stream.writes]
    assert len(blocks) >= 2, blocks  # the first (after ~0.5 s) and the last
    assert stream.writes[0][0] - started < 1.0
    last = blocks[-1]
    assert "100% done" in last
    for stage in ("numbers", "double", "sink"):
        assert stage in last
    assert "\x1b[" not in stream.getvalue()  # plain text, no terminal codes
    # The producer's line: no input, its 60 items out.
    numbers = next(line for line in last.splitlines() if line.strip().startswith("numbers"))
    assert numbers.split()[1:3] == ["-", "60"], numbers


def test_plain_view_repeats(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_FIRST", 0.05)
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.2)
    stream = TimedStream()
    Slow(n=50).run(progress=stream)
    assert len(stream.writes) >= 4, stream.getvalue()
    heads = [text.splitlines()[0] for _, text in stream.writes]
    assert any("% done" in h and "left" in h for h in heads[:-1]), heads


def test_no_bar_without_a_known_total_and_len_counts_as_total():
    stream = TimedStream()
    p = mg.Pipeline("p")
    p.producer(lambda: (n for n in range(10)), name="gen")
    p.consumer(lambda n: None, name="sink")
    p.run(progress=stream)
    assert "% done" not in stream.getvalue()

    stream = TimedStream()
    p = mg.Pipeline("p")
    p.producer(lambda: list(range(10)), name="listed")
    p.consumer(lambda n: None, name="sink")
    p.run(progress=stream)
    assert "100% done" in stream.getvalue()


def test_start_with_progress_and_a_failed_run_end_the_view():
    stream = TimedStream()
    p = mg.Pipeline("p")
    p.producer(lambda: range(5), name="numbers")

    @p.processor
    def boom(n):
        raise ValueError(n)

    run = p.start(progress=stream)
    with pytest.raises(mg.PipelineError):
        run.wait(10)
    assert "boom" in stream.getvalue()
    assert not any(t.name == "minigun-progress" for t in threading.enumerate())


def test_progress_to_stderr_when_it_is_not_a_terminal():
    script = textwrap.dedent("""
        import minigun as mg
        p = mg.Pipeline("p")
        p.producer(lambda: range(1000), name="numbers")
        p.consumer(lambda n: None, name="sink")
        p.run(progress=True)
        print("done")
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "done\n"
    assert "minigun:" in done.stderr and "sink" in done.stderr
    assert "\x1b[" not in done.stderr


def _under_pty(script: str) -> str:
    pty = pytest.importorskip("pty")
    pid, fd = pty.fork()
    if pid == 0:  # the child: run the script with the pty as its terminal
        os.execv(sys.executable, [sys.executable, "-c", script])
    out = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out.decode(errors="replace")


def test_redraws_in_place_on_a_terminal():
    pytest.importorskip("rich")
    out = _under_pty(
        textwrap.dedent("""
        import time
        import minigun as mg
        p = mg.Pipeline("p")
        @p.producer(total=40)
        def numbers():
            for k in range(40):
                time.sleep(0.02)
                yield k
        p.consumer(lambda n: None, name="sink")
        p.run(progress=True)
        print("done")
    """)
    )
    assert "\x1b[1A" in out or "\x1b[2K" in out, out  # the cursor goes back up to redraw
    assert "sink" in out and "100% done" in out and "done" in out


def test_plain_on_a_terminal_without_rich():
    out = _under_pty(
        textwrap.dedent("""
        import sys
        sys.modules["rich"] = None  # as if the [hud] extra were not installed
        sys.modules["rich.live"] = None
        import minigun as mg
        p = mg.Pipeline("p")
        p.producer(lambda: range(100), name="numbers")
        p.consumer(lambda n: None, name="sink")
        p.run(progress=True)
    """)
    )
    assert "minigun:" in out and "sink" in out
    assert "\x1b[1A" not in out
