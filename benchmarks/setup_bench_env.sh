#!/usr/bin/env bash
# Create the benchmark-only venv (.venv-bench) holding TRL. Idempotent: does nothing when
# .venv-bench already imports trl. See benchmarks/requirements-bench.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-bench
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import trl" >/dev/null 2>&1; then
    echo "$VENV ready: trl $("$VENV/bin/python" -c 'import trl; print(trl.__version__)')"
    exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# torch first, pinned: the CPU wheel on local disk (an unpinned torch pulls a CUDA build)
"$VENV/bin/pip" install torch==2.13.0
"$VENV/bin/pip" install trl
"$VENV/bin/python" -c "import trl; print('$VENV ready: trl', trl.__version__)"
