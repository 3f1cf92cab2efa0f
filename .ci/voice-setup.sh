#!/usr/bin/env bash
# Speech tools for tests/voice.rs: espeak-ng (synthesises speech) and sox
# (converts it to 16 kHz mono WAV), both Debian packages. Idempotent: installs
# only what is missing, every step bounded in time. Prints what the caller
# should export; `.ci/run` evaluates it:
#   eval "$(.ci/voice-setup.sh)"
# after which CHATBOX_TEST_ESPEAK=1 makes tests/voice.rs fail (not skip) when
# the tools are missing. Diagnostics go to stderr, exports alone to stdout.
set -euo pipefail

missing=()
for pair in espeak-ng:espeak-ng sox:sox; do
  tool=${pair%%:*}
  package=${pair##*:}
  if ! command -v "$tool" >/dev/null 2>&1; then
    missing+=("$package")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "voice-setup: installing ${missing[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo -n"
  fi
  export DEBIAN_FRONTEND=noninteractive
  # A stale package index is the usual reason for a failed install: refresh once.
  if ! timeout 300 $sudo apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
    timeout 300 $sudo apt-get update >&2
    timeout 600 $sudo apt-get install -y --no-install-recommends "${missing[@]}" >&2
  fi
fi

# Both must run, not just exist.
timeout 30 espeak-ng --version >&2
timeout 30 sox --version >&2
echo "voice-setup: espeak-ng and sox are ready" >&2
echo "export CHATBOX_TEST_ESPEAK=1"
