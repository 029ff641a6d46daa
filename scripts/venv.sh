# Sourced by ./run and ./test: make .venv with the project and its dev tools, once.
# The stamp holds a hash of pyproject.toml, so a changed dependency list reinstalls.
PYTHON="${PYTHON:-python3}"
stamp=".venv/.portfwd-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up .venv (first run)..." >&2
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip >&2
    .venv/bin/python -m pip install -q -e '.[dev]' >&2
    echo "$want" > "$stamp"
fi
