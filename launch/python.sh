# Sourced by the launch scripts: PYTHON is the interpreter that runs everything.
# `make ... PYTHON=/path/to/venv/bin/python` passes the Makefile's; otherwise the active
# environment's `python` (a venv or conda env on PATH), else python3.
if [ -z "${PYTHON:-}" ]; then
  PYTHON="$(command -v python || command -v python3 || true)"
fi
if [ -z "$PYTHON" ] || ! "$PYTHON" -c 'import sys' 2>/dev/null; then
  echo "launch: no usable Python (set PYTHON=/path/to/python)" >&2
  exit 2
fi
export PYTHON
