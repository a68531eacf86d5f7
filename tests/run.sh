#!/usr/bin/env bash
# The test command (README): the main suite, then the Triton kernels in their own process,
# since TRITON_INTERPRET=1 must be set before triton is first imported.
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
# `python -m` would put the repository root first on sys.path, where the top-level kernels/ folder
# (installed as modman.kernels) shadows Hugging Face's `kernels` package that transformers imports.
export PYTHONSAFEPATH=1
python -m pytest tests --ignore=tests/kernels -q "$@"
if python -c "import triton" 2>/dev/null; then
  TRITON_INTERPRET=1 python -m pytest tests/kernels -q "$@"
else
  echo "triton not installed: kernel tests not run"
fi
