"""Text from the network made safe to print: control and invisible characters escaped.

Host names, bind addresses, SOCKS names, user names and error reasons arrive from peers. Written
raw to a log, a newline forges a second log line and an escape sequence reaches the terminal
of whoever reads it. `printable` escapes every character `str.isprintable` rejects (C0/C1
controls, DEL, line and paragraph separators, bidi overrides and other format characters) the
way Python writes them in a string literal (`\\n`, `\\x1b`, `\\u202e`), and leaves everything
else, including non-ASCII letters, as it is. The text log formatter applies it to every log
line, so no call site has to remember to.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: str) -> str:
    if char.isprintable():
        return char
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` with every non-printable character escaped (see the module docstring)."""
    if text.isprintable():
        return text
    return "".join(map(_escaped, text))


def printable_values(value: object) -> object:
    """`value` (JSON-shaped: dicts, lists, strings, numbers) with every string made printable."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {key: printable_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [printable_values(item) for item in value]
    return value
