#!/usr/bin/env bash
# Browser tests (tests/browser/): Debian's chromium, driven by the PyPI package
# playwright (no browser download: it is launched with chromium's executable
# path), pytest, and axe-core from npm for the accessibility scan. Idempotent,
# every step bounded in time. Prints what the caller should export:
#   eval "$(.ci/browser-setup.sh)"
# Diagnostics go to stderr, exports alone to stdout.
set -euo pipefail

VENV=/var/tmp/chatbox-browser-venv
NODE=/var/tmp/chatbox-browser-node

if ! command -v chromium >/dev/null 2>&1; then
  echo "browser-setup: installing chromium" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  if ! timeout 600 $sudo apt-get install -y --no-install-recommends chromium >&2; then
    timeout 300 $sudo apt-get update >&2
    timeout 900 $sudo apt-get install -y --no-install-recommends chromium >&2
  fi
fi

if [ ! -x "$VENV/bin/pytest" ] || ! "$VENV/bin/python" -c 'import playwright' 2>/dev/null; then
  echo "browser-setup: python tools in $VENV" >&2
  timeout 120 python3 -m venv "$VENV" >&2
  timeout 600 "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    'playwright==1.49.1' 'pytest==8.3.4' 'websockets==15.0.1' >&2
fi

if [ ! -f "$NODE/node_modules/axe-core/axe.min.js" ]; then
  echo "browser-setup: axe-core in $NODE" >&2
  mkdir -p "$NODE"
  timeout 300 npm install --silent --no-audit --no-fund --prefix "$NODE" 'axe-core@4.10.2' >&2
fi

echo "export CHATBOX_BROWSER_PYTHON=$VENV/bin/python"
echo "export CHATBOX_CHROMIUM=$(command -v chromium)"
echo "export CHATBOX_AXE_JS=$NODE/node_modules/axe-core/axe.min.js"
