#!/usr/bin/env bash
# Is this chefia-rt node serving? Every check runs (one failing does not hide the others):
#   health      GET /health answers 200 with status ok, storage ok and (with Redis) the bus ok;
#   stats       GET /api/v1/websocket/stats answers (with a monitor token when JWT_SECRET_KEY is
#               set; served there whatever WS_PATH is);
#   monitor     GET /monitor serves the Terminal Monitor page;
#   websocket   a real round trip on WS_PATH: connect as a monitor terminal of a probe store,
#               receive connection_established, send an application ping, receive its pong;
#   prometheus  (when PROMETHEUS_URL is set) Prometheus is ready; says how many targets are up;
#   grafana     (when GRAFANA_URL is set) Grafana's /api/health answers with its database ok.
# One line per check: `ok <check>: <what>` on stdout, `FAIL <check>: <why>` on stderr; then a
# summary line. Exit 0 when every check passed, 1 when any failed, 2 on a usage error.
#
#   health-check.sh [--url http://127.0.0.1:8001] [--env-file /etc/chefia-rt/env]
#                   [--python /opt/chefia-rt/current/venv/bin/python] [--timeout 10]
#                   [--prometheus-url URL] [--grafana-url URL]
#
# The URL defaults to 127.0.0.1 and WS_PORT of the env file (8001); WS_PATH, JWT_SECRET_KEY,
# PROMETHEUS_URL and GRAFANA_URL come from the env file too (the options win). The WebSocket
# client and the token come from the release's Python (websockets and chefia_rt are there).
set -euo pipefail

URL=""
ENV_FILE="${CHEFIA_ENV_FILE:-/etc/chefia-rt/env}"
PYTHON="${CHEFIA_PYTHON:-/opt/chefia-rt/current/venv/bin/python}"
TIMEOUT=10
PROMETHEUS_URL=""
GRAFANA_URL=""
FAILED=0
CHECKS=0

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
ok() { CHECKS=$((CHECKS + 1)); printf 'ok %s\n' "$*"; }
fail() { CHECKS=$((CHECKS + 1)); FAILED=$((FAILED + 1)); printf 'FAIL %s\n' "$*" >&2; }
# A problem that makes every check meaningless (no Python, no curl, bad option).
fatal() { printf 'FAIL %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --url) URL="${2:?--url needs a URL}"; shift 2 ;;
    --env-file) ENV_FILE="${2:?--env-file needs a file}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs a path}"; shift 2 ;;
    --timeout) TIMEOUT="${2:?--timeout needs seconds}"; shift 2 ;;
    --prometheus-url) PROMETHEUS_URL="${2:?--prometheus-url needs a URL}"; shift 2 ;;
    --grafana-url) GRAFANA_URL="${2:?--grafana-url needs a URL}"; shift 2 ;;
    -h | --help) usage ;;
    *) printf 'health-check.sh: unknown option %s\n' "$1" >&2; usage ;;
  esac
done
case "$TIMEOUT" in '' | *[!0-9]*) fatal "usage: --timeout takes whole seconds (got $TIMEOUT)" ;; esac
[ -x "$PYTHON" ] || fatal "setup: no Python at $PYTHON (give --python)"
command -v curl >/dev/null || fatal "setup: curl is not installed"

# One value of the env file (systemd EnvironmentFile syntax: KEY=VALUE, optional quotes).
env_value() {
  [ -r "$ENV_FILE" ] || return 0
  sed -n "s/^[[:space:]]*$1=//p" "$ENV_FILE" | tail -n 1 | sed 's/^"\(.*\)"$/\1/; s/^'"'"'\(.*\)'"'"'$/\1/'
}

port="$(env_value WS_PORT)"
ws_path="$(env_value WS_PATH)"
URL="${URL:-http://127.0.0.1:${port:-8001}}"
URL="${URL%/}"
ws_path="${ws_path:-/ws}"
PROMETHEUS_URL="${PROMETHEUS_URL:-$(env_value PROMETHEUS_URL)}"
GRAFANA_URL="${GRAFANA_URL:-$(env_value GRAFANA_URL)}"

# A terminal id of its own per run: two probes at once must not take over each other (4004).
CHEFIA_PROBE_TERMINAL="health-probe-$$"
export CHEFIA_PROBE_TERMINAL
# The token is passed to Python and curl through the environment, never on a command line.
CHEFIA_PROBE_SECRET="$(env_value JWT_SECRET_KEY)"
export CHEFIA_PROBE_SECRET
CHEFIA_PROBE_TOKEN=""
if [ -n "$CHEFIA_PROBE_SECRET" ]; then
  CHEFIA_PROBE_TOKEN="$("$PYTHON" -c '
import os
from chefia_rt.auth import issue_token, parse_keys
keys = parse_keys(os.environ["CHEFIA_PROBE_SECRET"])
terminal = os.environ["CHEFIA_PROBE_TERMINAL"]
print(issue_token(keys, terminal, "health-probe", "monitor", 120, None))
')" || fatal "token: could not sign a monitor token with JWT_SECRET_KEY"
fi
export CHEFIA_PROBE_TOKEN

# GET a full URL into BODY and CODE (with the token when TOKEN=1); 1 when curl itself failed,
# its reason in BODY.
http_get() {  # url [token]
  local out err
  err="$(mktemp)"
  local -a auth=()
  [ "${2:-}" = token ] && [ -n "$CHEFIA_PROBE_TOKEN" ] && auth=(-H @-)
  if out="$(printf 'Authorization: Bearer %s\n' "$CHEFIA_PROBE_TOKEN" |
    curl -sS --max-time "$TIMEOUT" "${auth[@]}" -o - -w '\n%{http_code}' "$1" 2>"$err")"; then
    rm -f "$err"
    CODE="${out##*$'\n'}"
    BODY="${out%$'\n'*}"
    return 0
  fi
  CODE=000
  BODY="$1 unreachable: $(head -c 300 "$err")"
  rm -f "$err"
  return 1
}

# Judge a JSON body with the release's Python (no jq needed); prints one summary line.
judge() {  # python code reading the parsed body as `b`
  CHEFIA_PROBE_BODY="$BODY" "$PYTHON" -c "
import json, os, sys
try:
    b = json.loads(os.environ['CHEFIA_PROBE_BODY'])
except ValueError:
    print('not JSON: ' + os.environ['CHEFIA_PROBE_BODY'][:200]); sys.exit(1)
$1"
}

check_health() {
  http_get "$URL/health" || { fail "health: $BODY"; return; }
  local summary
  if summary="$(judge '
storage, bus = b.get("storage") or {}, b.get("bus") or {}
def state(part):
    return "%s:%s" % (part.get("kind"), "ok" if part.get("ok") is True else "DOWN")
print("status=%s version=%s storage=%s bus=%s workers=%s auth=%s" % (
    b.get("status"), b.get("version"), state(storage), state(bus), b.get("workers"), b.get("auth")))
sys.exit(0 if b.get("status") == "ok" and storage.get("ok") is True and bus.get("ok") is True else 1)
')" && [ "$CODE" = 200 ]; then
    ok "health: $summary"
  else
    fail "health: HTTP $CODE $summary"
  fi
}

check_stats() {
  http_get "$URL/api/v1/websocket/stats" token || { fail "stats: $BODY"; return; }
  [ "$CODE" = 200 ] || { fail "stats: HTTP $CODE $BODY"; return; }
  local connections
  if connections="$(judge 'print(b["total_connections"])')"; then
    ok "stats: total_connections=$connections"
  else
    fail "stats: no total_connections in $BODY"
  fi
}

check_monitor() {
  http_get "$URL/monitor" || { fail "monitor: $BODY"; return; }
  if [ "$CODE" = 200 ] && [[ "$BODY" == *"data-ws-path=\"$ws_path\""* ]]; then
    ok "monitor: $URL/monitor serves the Terminal Monitor (WebSocket path $ws_path)"
  else
    fail "monitor: HTTP $CODE, not the Terminal Monitor page for WS_PATH=$ws_path"
  fi
}

# A WebSocket round trip, as a monitor (it only reads) of a store no restaurant uses.
# (With a token the store comes from the token; store_id only counts in open mode.)
check_websocket() {
  local roundtrip
  export CHEFIA_PROBE_URL="ws${URL#http}${ws_path}/$CHEFIA_PROBE_TERMINAL?type=monitor&store_id=health-probe"
  export CHEFIA_PROBE_TIMEOUT="$TIMEOUT"
  if roundtrip="$("$PYTHON" - <<'PROBE' 2>&1
import asyncio, json, os, ssl, time
import websockets

async def probe() -> str:
    url, token = os.environ["CHEFIA_PROBE_URL"], os.environ["CHEFIA_PROBE_TOKEN"]
    headers = {"Authorization": f"Bearer {token}"} if token else None
    context = ssl.create_default_context() if url.startswith("wss:") else None
    async with websockets.connect(url, additional_headers=headers, ssl=context,
                                  open_timeout=float(os.environ["CHEFIA_PROBE_TIMEOUT"])) as ws:
        hello = json.loads(await ws.recv())
        if hello.get("type") != "connection_established":
            raise SystemExit(f"expected connection_established, got {hello}")
        started = time.perf_counter()
        await ws.send(json.dumps({"type": "ping", "timestamp": 4711}))
        while True:
            message = json.loads(await ws.recv())
            if message.get("type") == "pong":
                break
        return (f"store seq {hello.get('last_seq')}, "
                f"ping->pong {1000 * (time.perf_counter() - started):.1f} ms")

try:
    print(asyncio.run(asyncio.wait_for(probe(), float(os.environ["CHEFIA_PROBE_TIMEOUT"]))))
except Exception as exc:
    raise SystemExit(f"{type(exc).__name__}: {exc}")
PROBE
)"; then
    ok "websocket: $roundtrip"
  else
    fail "websocket: ${CHEFIA_PROBE_URL%%\?*}: ${roundtrip##*$'\n'}"
  fi
}

check_prometheus() {
  local base="${PROMETHEUS_URL%/}"
  http_get "$base/-/ready" || { fail "prometheus: $BODY"; return; }
  [ "$CODE" = 200 ] || { fail "prometheus: $base/-/ready: HTTP $CODE $BODY"; return; }
  local targets="targets not listed"
  if http_get "$base/api/v1/query?query=up" && [ "$CODE" = 200 ]; then
    targets="$(judge '
up = [r for r in b["data"]["result"]]
down = sorted("%s/%s" % (r["metric"].get("job"), r["metric"].get("instance")) for r in up
              if r["value"][1] != "1")
print("%d of %d targets up%s" % (len(up) - len(down), len(up),
      (" (down: " + ", ".join(down) + ")") if down else ""))
')" || targets="targets not listed"
  fi
  ok "prometheus: $base ready, $targets"
}

check_grafana() {
  local base="${GRAFANA_URL%/}" summary
  http_get "$base/api/health" || { fail "grafana: $BODY"; return; }
  if summary="$(judge '
print("version %s, database %s" % (b.get("version"), b.get("database")))
sys.exit(0 if b.get("database") == "ok" else 1)
')" && [ "$CODE" = 200 ]; then
    ok "grafana: $base $summary"
  else
    fail "grafana: $base/api/health: HTTP $CODE $summary"
  fi
}

check_health
check_stats
check_monitor
check_websocket
[ -z "$PROMETHEUS_URL" ] || check_prometheus
[ -z "$GRAFANA_URL" ] || check_grafana

if [ "$FAILED" -gt 0 ]; then
  printf 'UNHEALTHY: %d of %d checks failed: %s\n' "$FAILED" "$CHECKS" "$URL" >&2
  exit 1
fi
echo "healthy: $CHECKS checks passed: $URL"
