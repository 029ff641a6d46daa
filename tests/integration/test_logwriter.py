"""The batched log writer (cli/logwriter.py) when processes share one log output.

`workers = N` gives N processes the same stderr. Each writes its batches with its own thread;
a pipe keeps only writes of up to PIPE_BUF bytes whole when several processes write, and a
reader that is slow (or, as here, not reading at all for a while) makes every writer block
mid-batch. Lines must come out whole and every one of them must come out.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portfwd.cli.logwriter import pieces

pytestmark = pytest.mark.integration

LINES = 6000  # ~130 bytes each: some 780 KB a process, twelve times what a pipe holds

#: One writer process: queues LINES lines through the batched handler, says so on stdout, and
#: exits (its exit flushes what waits). The parent reads their shared stderr only after both
#: have queued everything, so both writers are blocked on the full pipe when it starts.
WRITER = """
import logging, sys
from portfwd.cli import logwriter
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("%(message)s"))
front = logwriter.install(handler)
tag = sys.argv[1]
for index in range(int(sys.argv[2])):
    front.put(f"{tag} {index:06d} " + "x" * 110 + " end")
print("queued", flush=True)
"""


@pytest.mark.parametrize("output", ["pipe", "file"])
def test_two_processes_on_one_output_keep_every_line_whole(tmp_path: Path, output: str) -> None:
    """A pipe nobody reads until both writers queued everything (each writes in PIPE_BUF
    pieces), or a file both append to (each batch in one write)."""
    if output == "pipe":
        read_end, write_end = os.pipe()
    else:
        log_file = tmp_path / "log"
        write_end = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        read_end = os.open(log_file, os.O_RDONLY)
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, tag, str(LINES)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=write_end,
            env=env,
        )
        for tag in ("a", "b")
    ]
    os.close(write_end)
    try:
        for writer in writers:
            assert writer.stdout is not None
            assert writer.stdout.readline() == b"queued\n"  # its lines are all in its queue
        if output == "file":
            for writer in writers:
                assert writer.wait(30) == 0
        with os.fdopen(read_end, "rb") as reader:
            read_end = -1
            log = reader.read()  # to EOF: both processes have exited
        for writer in writers:
            assert writer.wait(30) == 0
    finally:
        if read_end >= 0:
            os.close(read_end)
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait(10)
            if writer.stdout is not None:
                writer.stdout.close()
    lines = log.decode().split("\n")
    assert lines.pop() == ""  # the output ends with a whole line
    whole = re.compile(r"[ab] \d{6} x{110} end")
    broken = [line for line in lines if not whole.fullmatch(line)]
    assert not broken, f"{len(broken)} broken line(s), e.g. {broken[0][:80]!r}"
    for tag in ("a", "b"):  # every line, each process's in its order
        mine = [line for line in lines if line.startswith(tag)]
        assert [int(line[2:8]) for line in mine] == list(range(LINES))


@given(st.lists(st.binary(max_size=6000).map(lambda b: b.replace(b"\n", b"")), max_size=40), st.booleans())
def test_pieces_are_whole_lines_of_at_most_pipe_buf(lines: list[bytes], torn_end: bool) -> None:
    data = b"".join(line + b"\n" for line in lines) + (b"no newline" if torn_end else b"")
    spans = list(pieces(data))
    assert [start for start, _ in spans] == [0, *(stop for _, stop in spans)][: len(spans)]  # contiguous
    assert (spans[-1][1] if spans else 0) == len(data)  # all of it
    for start, stop in spans:
        piece = data[start:stop]
        whole = piece.endswith(b"\n") or stop == len(data)
        assert whole, "a cut inside a line"
        if len(piece) > select.PIPE_BUF:  # only a single line longer than a pipe's atomic write
            assert piece.count(b"\n") <= 1
            assert b"\n" not in piece[:-1]
