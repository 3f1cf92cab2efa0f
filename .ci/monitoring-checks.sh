#!/usr/bin/env bash
# Checks of deployments/monitoring/ against a real server, offline:
#   1. alerts.yaml and the dashboard parse (PyYAML, json), with exactly the
#      alerts the runbook documents;
#   2. promtool: `check rules` on alerts.yaml, `test rules` on alerts_test.yaml
#      (every alert quiet before its condition lasted, then firing), and
#      `check metrics` (the Prometheus linter) on a running server's /metrics;
#   3. every chatbox_* series the dashboard and the alerts name exists in that
#      server's /metrics (bus series, present in cluster mode only, are taken
#      from the list below; tests/metrics.rs renders them from the code).
# promtool is not on PyPI: it comes from Debian's `prometheus` package, installed
# here when missing (CI runs as root).
#
# Usage: .ci/monitoring-checks.sh PATH/TO/chatbox   (the release binary)
set -euo pipefail
BIN=${1:?usage: $0 PATH/TO/chatbox}
[ -x "$BIN" ] || { echo "not an executable: $BIN"; exit 2; }
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
cd "$(dirname "$0")/.."
MON=deployments/monitoring
VENV=/var/tmp/chatbox-monitoring-venv
WORK=$(mktemp -d /tmp/chatbox-monitoring.XXXXXX)
PID=
cleanup() {
  if [ -n "$PID" ]; then kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
# GET a URL to stdout; fails on a non-2xx status (no curl needed).
fetch() { python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"; }
step() { printf '\n=== monitoring: %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "tools"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import yaml' 2>/dev/null; then
  timeout 120 python3 -m venv "$VENV"
  timeout 300 "$VENV/bin/pip" install --quiet --disable-pip-version-check 'PyYAML==6.0.3'
fi
if ! command -v promtool >/dev/null; then
  timeout 300 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package may start a Prometheus of its own where an init system runs; not wanted here.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    timeout 30 systemctl stop prometheus || true
  fi
fi
timeout 10 promtool --version | head -n1

step "rules and dashboard parse"
timeout 60 "$VENV/bin/python" - "$MON" <<'PY'
import json, sys, yaml
mon = sys.argv[1]
want = ["ChatboxDown", "ChatboxNotReady", "ChatboxHighAckLatency", "ChatboxLlmErrors",
        "ChatboxStorageErrors", "ChatboxStorageQueueHigh", "ChatboxMeshDrops", "ChatboxBusDown",
        "ChatboxSlowConsumers", "ChatboxDeadNotifications", "ChatboxPanics"]
rules = yaml.safe_load(open(f"{mon}/alerts.yaml"))
alerts = [r for g in rules["groups"] for r in g["rules"]]
names = [r["alert"] for r in alerts]
assert names == want, f"alerts: {names}"
for r in alerts:
    assert r["expr"].strip() and r["labels"]["severity"] in ("critical", "warning"), r["alert"]
    assert r["annotations"]["summary"] and r["annotations"]["runbook"], r["alert"]
dash = json.load(open(f"{mon}/chatbox-dashboard.json"))
assert any(v["type"] == "datasource" for v in dash["templating"]["list"]), "datasource variable"
print(f"{len(alerts)} alerts, {len(dash['panels'])} panels")
PY

step "promtool check rules, test rules"
timeout 60 promtool check rules "$MON/alerts.yaml"
(cd "$MON" && timeout 120 promtool test rules alerts_test.yaml)

step "a running server's /metrics"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CHATBOX_LISTEN="127.0.0.1:$PORT" CHATBOX_DATA_DIR="$WORK/data" CHATBOX_CORES=2 RUST_LOG=warn \
  "$BIN" --dev >"$WORK/server.out" 2>"$WORK/server.err" &
PID=$!
for _ in $(seq 1 200); do
  fetch "http://127.0.0.1:$PORT/chatbox/readyz" >/dev/null 2>&1 && break
  kill -0 "$PID" 2>/dev/null || { cat "$WORK/server.err"; echo "server died"; exit 1; }
  sleep 0.05
done
fetch "http://127.0.0.1:$PORT/chatbox/metrics" >"$WORK/metrics.txt"
timeout 30 promtool check metrics <"$WORK/metrics.txt"
echo "promtool check metrics: clean"

step "every metric the dashboard and the alerts use exists"
timeout 60 "$VENV/bin/python" - "$MON" "$WORK/metrics.txt" <<'PY'
import json, re, sys, yaml
mon, metrics = sys.argv[1], sys.argv[2]
families = {}
for line in open(metrics):
    if line.startswith("# TYPE "):
        _, _, name, kind = line.split()
        families[name] = kind
# Cluster mode only (chatbox::runtime::bus::render_metrics).
for name, kind in [("chatbox_bus_up", "gauge"), ("chatbox_cluster_members", "gauge"),
                   ("chatbox_bus_messages_total", "counter"), ("chatbox_bus_bytes_total", "counter"),
                   ("chatbox_bus_errors_total", "counter"), ("chatbox_bus_request_seconds", "histogram")]:
    families.setdefault(name, kind)
exprs = []
def walk(v):
    if isinstance(v, dict):
        for k, x in v.items():
            if k in ("expr", "definition", "query") and isinstance(x, str):
                exprs.append(("dashboard", x))
            else:
                walk(x)
    elif isinstance(v, list):
        for x in v:
            walk(x)
walk(json.load(open(f"{mon}/chatbox-dashboard.json")))
for g in yaml.safe_load(open(f"{mon}/alerts.yaml"))["groups"]:
    for r in g["rules"]:
        exprs.append((r["alert"], r["expr"]))
missing, used = [], set()
for where, e in exprs:
    for name in re.findall(r"\bchatbox_[A-Za-z0-9_:]*", e):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        fam = base if families.get(base) == "histogram" else name
        used.add(fam)
        if fam not in families:
            missing.append(f"{name} ({where})")
assert not missing, f"not in /metrics: {missing}"
print(f"{len(used)} series used, all exposed")
PY
echo "monitoring checks passed"
