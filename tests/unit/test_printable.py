"""Text from the network made printable, and Unix-socket permits that never leave their directory."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portfwd.cli.console import TextFormatter
from portfwd.printable import printable, printable_values
from portfwd.ssh.policy import path_permitted as _path_permitted
from portfwd.ssh.policy import plain_path


@given(st.text())
def test_the_result_is_always_one_printable_line(text: str) -> None:
    out = printable(text)
    assert out.isprintable()
    assert "\n" not in out


@given(st.text().filter(str.isprintable))
def test_printable_text_is_left_alone(text: str) -> None:
    assert printable(text) == text


def test_escapes_look_like_python_literals() -> None:
    assert (
        printable("a\nb\r\t\x1b[31m\x7f\u202e\U000e0001é") == "a\\nb\\r\\t\\x1b[31m\\x7f\\u202e\\U000e0001é"
    )
    assert printable_values({"a": ["x\n", 1, None], "b": ("\x00",)}) == {
        "a": ["x\\n", 1, None],
        "b": ["\\x00"],
    }


def test_the_text_log_formatter_escapes_arguments_and_exceptions() -> None:
    formatter = TextFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord(
        "portfwd", logging.WARNING, "x.py", 1, "host %s denied", ("a\nERROR forged",), None
    )
    assert formatter.format(record) == "WARNING host a\\nERROR forged denied"
    try:
        raise ValueError("bad\x1b[2J")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    text = formatter.format(record)
    assert "\x1b" not in text
    assert text.splitlines()[-1] == "ValueError: bad\\x1b[2J"


@pytest.mark.parametrize(
    ("path", "plain"),
    [
        ("/srv/pub/a.sock", True),
        ("/srv/pub/../secret/a.sock", False),
        ("/srv/pub/./a.sock", False),
        ("/srv//pub/a.sock", False),
        ("/srv/pub/", False),
        ("srv/pub/a.sock", False),
        ("/srv/pub/a\0.sock", False),
        ("/srv/pub/..a.sock", True),
    ],
)
def test_plain_paths(path: str, plain: bool) -> None:
    assert plain_path(path) is plain


def test_a_wildcard_stays_in_its_component() -> None:
    rules = ("unix:/srv/pub/*.sock", "127.0.0.1:*")
    assert _path_permitted(rules, "/srv/pub/a.sock")
    assert not _path_permitted(rules, "/srv/pub/sub/a.sock")
    assert not _path_permitted(rules, "/srv/pub/../secret/a.sock")
    assert not _path_permitted(("unix:/srv/*",), "/srv/pub/a.sock")
    assert _path_permitted(("unix:/srv/*/a.sock",), "/srv/pub/a.sock")


@given(st.lists(st.sampled_from(["srv", "pub", "..", ".", "", "a.sock", "x"]), min_size=1, max_size=6))
def test_no_permitted_path_resolves_outside_the_directory(parts: list[str]) -> None:
    import posixpath

    path = "/" + "/".join(parts)
    if _path_permitted(("unix:/srv/pub/*",), path):
        assert posixpath.normpath(path).startswith("/srv/pub/")
        assert posixpath.normpath(path) == path


def test_a_flood_of_identical_warnings_is_summarised() -> None:
    import threading

    from portfwd.cli.console import Flood

    lines: list[str] = []
    summarised = threading.Event()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
            if getattr(record, "summary", False):
                summarised.set()

    handler = Collect()
    flood = Flood(burst=3, window=0.3)
    flood.handler = handler
    handler.addFilter(flood)
    logger = logging.getLogger("portfwd.test.flood")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for port in range(10):
            logger.warning("connect to %s denied", port)
        logger.warning("another template %s", "passes")
        for _ in range(5):
            logger.info("sessions are never held back")
        assert summarised.wait(5)
    finally:
        logger.removeHandler(handler)
    assert lines == [
        "connect to 0 denied",
        "connect to 1 denied",
        "connect to 2 denied",
        "another template passes",
        *["sessions are never held back"] * 5,
        "connect to 9 denied (and 7 more like it in the last 0.3 s, not logged)",
    ]
