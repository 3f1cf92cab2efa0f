#!/usr/bin/env bash
# Runs the browser tests against a built chatbox: `tests/browser/run.sh BINARY`.
# Needs what `.ci/browser-setup.sh` installs (its exports in the environment).
set -euo pipefail
cd "$(dirname "$0")"
export CHATBOX_BIN="${1:?usage: tests/browser/run.sh path/to/chatbox}"
exec timeout 900 "${CHATBOX_BROWSER_PYTHON:?run .ci/browser-setup.sh first}" -m pytest -q -p no:cacheprovider .
