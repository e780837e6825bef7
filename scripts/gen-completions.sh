#!/usr/bin/env bash
# Regenerate completions/ from the CLI. tests/cli/test_completion.py fails until the files
# match what `qctl completion SHELL` prints, e.g. after a click upgrade changed its scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
"$python" -m qctl completion bash > completions/qctl.bash
"$python" -m qctl completion zsh > completions/_qctl
"$python" -m qctl completion fish > completions/qctl.fish
