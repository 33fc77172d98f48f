#!/usr/bin/env bash
# The pipeline of one setting: scripts/pipeline.py (python -m scripts.pipeline), started from the repository root,
# so that this wrapper runs from any folder, with $PYTHON (default: the `python` first on PATH):
# PYTHON=/path/to/venv/bin/python runs a virtual environment's interpreter without activating it.
# Its options, their defaults and the folders a run makes: bash scripts/run_pipeline.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m scripts.pipeline "$@"
