"""Log events (logevents.py) through both formatters (cli/console.py): every line one JSON object
with its event and fields, or one escaped text line; whatever a peer sent cannot forge a line."""

from __future__ import annotations

import json
import logging

from hypothesis import given
from hypothesis import strategies as st

from portfwd.cli.console import JsonFormatter, TextFormatter
from portfwd.logevents import RESERVED, event

values = st.one_of(st.text(), st.integers(), st.floats(allow_nan=False), st.booleans(), st.none())


def _record(msg: str, args: tuple[object, ...], extra: dict[str, object] | None) -> logging.LogRecord:
    logger = logging.getLogger("portfwd.test")
    return logger.makeRecord(logger.name, logging.INFO, __file__, 1, msg, args, None, extra=extra)


def test_an_event_and_its_fields_become_keys_beside_the_sentence() -> None:
    record = _record(
        "%s: %s -> %s closed (%s)",
        ("web", "1.2.3.4:5", "10.0.0.1:80", "idle"),
        event("session.closed", rule="web", client="1.2.3.4:5", bytes_up=3, duration_s=0.25, reason="idle"),
    )
    line = JsonFormatter().format(record)
    parsed = json.loads(line)
    assert parsed["event"] == "session.closed"
    assert (parsed["rule"], parsed["client"], parsed["bytes_up"], parsed["duration_s"]) == (
        "web",
        "1.2.3.4:5",
        3,
        0.25,
    )
    assert parsed["msg"] == "web: 1.2.3.4:5 -> 10.0.0.1:80 closed (idle)"
    assert parsed["level"] == "info"
    assert parsed["logger"] == "portfwd.test"
    assert list(parsed)[:4] == ["ts", "level", "logger", "event"]


def test_a_line_without_an_event_is_named_log() -> None:
    parsed = json.loads(JsonFormatter().format(_record("stopping", (), None)))
    assert parsed["event"] == "log"
    assert parsed["msg"] == "stopping"


def test_a_field_cannot_overwrite_the_formatters_own_keys() -> None:
    parsed = json.loads(JsonFormatter().format(_record("x", (), event("e", msg="forged", level="error"))))
    assert (parsed["msg"], parsed["level"]) == ("x", "info")
    assert (parsed["field_msg"], parsed["field_level"]) == ("forged", "error")


@given(
    name=st.text(min_size=1),
    fields=st.dictionaries(st.text(min_size=1).filter(lambda key: key not in RESERVED), values, max_size=6),
    text=st.text(),
)
def test_any_peer_text_stays_one_line_in_both_formats(
    name: str, fields: dict[str, object], text: str
) -> None:
    record = _record("client said %s", (text,), event(name, **fields))  # type: ignore[arg-type]
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "\r" not in line
    parsed = json.loads(line)
    assert parsed["event"] == name
    assert parsed["msg"] == f"client said {text}"
    assert {key: parsed[key] for key in fields} == fields
    shown = TextFormatter("%(levelname)s %(message)s").format(record)
    assert shown.isprintable(), "control characters from a peer are escaped in the text line"


def test_every_event_the_code_logs_is_in_the_readme_table_with_its_fields() -> None:
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    logged: dict[str, set[str]] = {}
    for path in (root / "src/portfwd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "event"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                fields = {keyword.arg for keyword in node.keywords if keyword.arg is not None}
                logged.setdefault(str(node.args[0].value), set()).update(fields)
    from portfwd.relay.sessionlog import CLOSED_FIELDS, OPEN_FIELDS  # their calls spread these (**)

    assert {"session.open", "session.closed"} <= set(logged)
    logged["session.open"].update(OPEN_FIELDS)
    logged["session.closed"].update(CLOSED_FIELDS)
    readme = (root / "README.md").read_text()
    table = readme[readme.index("### Logs") : readme.index("## SSH tunnels")]
    documented: dict[str, set[str]] = {}
    for row in table.splitlines():
        cells = row.split("|")
        if len(cells) == 4 and "`" in cells[1]:
            for name in re.findall(r"`([^`]+)`", cells[1]):
                documented[name] = set(re.findall(r"`([^`]+)`", cells[2]))
    assert set(logged) - set(documented) == set(), "events missing from README's Logs table"
    assert set(documented) - set(logged) == set(), "README's Logs table names events the code never logs"
    missing = {
        name: fields - documented[name] for name, fields in logged.items() if fields - documented[name]
    }
    assert missing == {}, "fields missing from README's Logs table"


def test_session_lines_made_without_a_record_read_as_the_formatters_write_them() -> None:
    """The direct path for session lines (cli/console.py `_Direct`) writes what the text and
    JSON formatters write for the records the same calls make through logging; only the clock
    reading differs. A peer's control character is escaped on both paths."""
    import json as jsonlib

    from portfwd.cli.console import _Direct
    from portfwd.relay import sessionlog
    from portfwd.state import State

    class Sink(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []
            self.records: list[logging.LogRecord] = []

        def put(self, text: str) -> None:
            self.lines.append(text)

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    state = State()
    session = state.open_session(state.rule("web"), "1.2.3.4:5", "10.0.0.5:80", "splice")
    session.bytes_up, session.bytes_down = 1, 22
    logger = logging.getLogger("portfwd.test.sessionlines")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for json_format, formatter in (
        (False, TextFormatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")),
        (True, JsonFormatter()),
    ):
        sink = Sink()
        logger.handlers[:] = [sink]
        saved = sessionlog.direct
        try:
            sessionlog.direct = None  # through logging: records
            sessionlog.log_opened("web", session, logger)
            sessionlog.log_closed("web", session, "x\x1b", logger)
            direct = _Direct(sink, json_format)  # type: ignore[arg-type]
            direct._root = logger  # type: ignore[assignment]  # its only handler is the sink
            sessionlog.direct = direct
            sessionlog.log_opened("web", session, logger)
            sessionlog.log_closed("web", session, "x\x1b", logger)
        finally:
            sessionlog.direct = saved
            logger.handlers.clear()
        assert len(sink.records) == 2
        assert len(sink.lines) == 2
        for made, record in zip(sink.lines, sink.records, strict=True):
            expected = formatter.format(record)
            if json_format:
                ours, theirs = jsonlib.loads(made), jsonlib.loads(expected)
                ours.pop("ts"), theirs.pop("ts")
                ours.pop("duration_s", None), theirs.pop("duration_s", None)
                ours["msg"] = ours["msg"].rsplit(",", 1)[0]  # the duration, read twice
                theirs["msg"] = theirs["msg"].rsplit(",", 1)[0]
                assert list(ours.items()) == list(theirs.items())
            else:
                ours_text, theirs_text = made.split(" ", 2)[2], expected.split(" ", 2)[2]
                assert ours_text.rsplit(",", 1)[0] == theirs_text.rsplit(",", 1)[0]
        assert "\\x1b" in sink.lines[1] or "\\u001b" in sink.lines[1]
