#!/usr/bin/env bash
# The paper's experiments: scripts/reproduce_paper.py (python -m scripts.reproduce_paper), started from the
# repository root, so that this wrapper runs from any folder, with $PYTHON (default: the `python` first on PATH):
# PYTHON=/path/to/venv/bin/python runs a virtual environment's interpreter without activating it.
# Its options, the experiments, the scales and the folders they fill: bash scripts/reproduce_paper.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m scripts.reproduce_paper "$@"
