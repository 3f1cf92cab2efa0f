#!/usr/bin/env bash
# Prints the chatbox-secrets Secret (the one deployment.yaml reads), with fresh keys
# made by `openssl rand -hex 32` where none is given. Nothing is written to disk:
#
#   CHATBOX_MONGO_URI='mongodb://chatbox:PASSWORD@mongodb-0.mongodb.mongodb.svc:27017/?replicaSet=rs0&authSource=admin' \
#   CHATBOX_LLM_API_KEY=sk-... \
#     deployments/kubernetes/make-secret.sh | kubectl apply -f -
#
# Each CHATBOX_* variable that is set in the environment is used as it is, so that
# re-running the script keeps the keys you pass (the encryption key above all: a
# new one cannot read what the old one sealed). Unset, CHATBOX_JWT_SECRET,
# CHATBOX_ENCRYPTION_KEY and CHATBOX_METRICS_TOKEN are generated.
#
# Rotating the encryption key without downtime takes two rollouts, because during a
# rolling update old pods must already read what new pods seal
# (docs/OPERATIONS.md, "Rotating the encryption key"):
#   --stage-encryption-key    phase 1: a new key (NEW_ENCRYPTION_KEY, or made here)
#                             joins CHATBOX_ENCRYPTION_PREVIOUS_KEYS; the current
#                             key (required) stays the one that seals.
#   --rotate-encryption-key   phase 2: NEW_ENCRYPTION_KEY (or, alone on one node, a
#                             fresh key) seals from now on; the current key moves to
#                             CHATBOX_ENCRYPTION_PREVIOUS_KEYS, where it must stay
#                             as long as anything it sealed is stored.
#   -n NAMESPACE              default chatbox.
set -euo pipefail

namespace=chatbox
rotate=""
while [ $# -gt 0 ]; do
  case "$1" in
    -n) namespace="${2:?-n needs a namespace}"; shift 2 ;;
    --stage-encryption-key) rotate=stage; shift ;;
    --rotate-encryption-key) rotate=rotate; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "make-secret.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

command -v openssl >/dev/null || { echo "make-secret.sh: openssl is needed" >&2; exit 1; }
new_key() { openssl rand -hex 32; }
hex64() { [[ "$1" =~ ^[0-9a-fA-F]{64}$ ]]; }

: "${CHATBOX_MONGO_URI:?set CHATBOX_MONGO_URI (mongodb://user:password@host:27017,.../?replicaSet=NAME): cluster mode needs MongoDB}"
jwt="${CHATBOX_JWT_SECRET:-$(new_key)}"
key="${CHATBOX_ENCRYPTION_KEY:-}"
previous="${CHATBOX_ENCRYPTION_PREVIOUS_KEYS:-}"
metrics="${CHATBOX_METRICS_TOKEN:-$(new_key)}"

# Comma list without one entry.
without() { local out="" k; local IFS=,; for k in $1; do [ -n "$k" ] && [ "$k" != "$2" ] && out="${out:+$out,}$k"; done; printf '%s' "$out"; }
if [ -n "$rotate" ]; then
  hex64 "$key" || { echo "make-secret.sh: --$rotate-encryption-key needs the current CHATBOX_ENCRYPTION_KEY (64 hex characters)" >&2; exit 2; }
  next="${NEW_ENCRYPTION_KEY:-}"
  if [ "$rotate" = stage ]; then
    next="${next:-$(new_key)}"
    hex64 "$next" || { echo "make-secret.sh: NEW_ENCRYPTION_KEY must be 64 hex characters" >&2; exit 2; }
    previous="$next$(p=$(without "$previous" "$next"); printf '%s' "${p:+,$p}")"
    echo "make-secret.sh: staged NEW_ENCRYPTION_KEY=$next (readable by every node after this rollout; pass it to --rotate-encryption-key next)" >&2
  else
    if [ -z "$next" ]; then
      next="$(new_key)"
      echo "make-secret.sh: generated the new CHATBOX_ENCRYPTION_KEY=$next; keep a copy outside the cluster (without it what is stored from now on cannot be read)" >&2
    fi
    hex64 "$next" || { echo "make-secret.sh: NEW_ENCRYPTION_KEY must be 64 hex characters" >&2; exit 2; }
    rest=$(without "$previous" "$next")
    previous="$key${rest:+,$rest}"
    key="$next"
  fi
elif [ -z "$key" ]; then
  key="$(new_key)"
  echo "make-secret.sh: generated a new CHATBOX_ENCRYPTION_KEY; keep a copy outside the cluster (without it stored messages cannot be read)" >&2
fi
hex64 "$key" || { echo "make-secret.sh: CHATBOX_ENCRYPTION_KEY must be 64 hex characters (openssl rand -hex 32)" >&2; exit 2; }
[ "${#jwt}" -ge 32 ] || { echo "make-secret.sh: CHATBOX_JWT_SECRET must be at least 32 bytes" >&2; exit 2; }

# YAML single-quoted scalar: the only escape is '' for '.
q() { printf "'%s'" "${1//\'/\'\'}"; }

cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: chatbox-secrets
  namespace: $namespace
  labels:
    app.kubernetes.io/name: chatbox
type: Opaque
stringData:
  CHATBOX_JWT_SECRET: $(q "$jwt")
  CHATBOX_ENCRYPTION_KEY: $(q "$key")
  CHATBOX_ENCRYPTION_PREVIOUS_KEYS: $(q "$previous")
  CHATBOX_MONGO_URI: $(q "$CHATBOX_MONGO_URI")
  CHATBOX_LLM_API_KEY: $(q "${CHATBOX_LLM_API_KEY:-}")
  CHATBOX_METRICS_TOKEN: $(q "$metrics")
YAML
