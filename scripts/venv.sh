# Sourced by ./run and ./test: make .venv hold exactly the versions in uv.lock (the project,
# its dependencies and the dev tools), once; again whenever uv.lock or pyproject.toml changes.
#
# uv itself comes from PyPI at the version and hashes in scripts/uv-requirements.txt, into
# .uv/ (kept apart from .venv, which `uv sync` owns and keeps exact). No Python is downloaded:
# the venv uses $PYTHON (default python3), which must be 3.11 or newer.
PYTHON="${PYTHON:-python3}"
uv_stamp=".uv/.portfwd-installed"
uv_want="$(sha256sum scripts/uv-requirements.txt | cut -d' ' -f1)"
if [ ! -x .uv/bin/uv ] || [ "$(cat "$uv_stamp" 2>/dev/null)" != "$uv_want" ]; then
    echo "installing uv (locked) into .uv/ ..." >&2
    rm -rf .uv
    "$PYTHON" -m venv .uv
    .uv/bin/python -m pip --isolated install -q --disable-pip-version-check --require-hashes --no-deps \
        -r scripts/uv-requirements.txt >&2
    echo "$uv_want" > "$uv_stamp"
fi
stamp=".venv/.portfwd-installed"
want="$(cat uv.lock pyproject.toml setup.py src/portfwd/relay/_native.c | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up .venv from uv.lock ..." >&2
    UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=.venv \
        .uv/bin/uv sync --locked --quiet --python "$PYTHON" >&2
    echo "$want" > "$stamp"
fi
