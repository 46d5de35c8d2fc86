#!/usr/bin/env bash
# Is this chefia-rt node serving? Checks, in order, and stops at the first failure:
#   1. GET /health answers 200 with status ok, storage ok and (with Redis) the bus ok;
#   2. GET /ws/stats answers (with a monitor token when JWT_SECRET_KEY is set);
#   3. a real WebSocket round trip: connect as a monitor terminal of a probe store, receive
#      connection_established, send an application ping, receive its pong.
# One line per check on stdout; on failure one line `FAIL <check>: <why>` on stderr, exit 1.
#
#   health-check.sh [--url http://127.0.0.1:8001] [--env-file /etc/chefia-rt/env]
#                   [--python /opt/chefia-rt/current/venv/bin/python] [--timeout 10]
#
# The URL defaults to 127.0.0.1 and WS_PORT of the env file (8001). The WebSocket client and the
# token come from the release's Python (websockets and chefia_rt are installed there).
set -euo pipefail

URL=""
ENV_FILE="${CHEFIA_ENV_FILE:-/etc/chefia-rt/env}"
PYTHON="${CHEFIA_PYTHON:-/opt/chefia-rt/current/venv/bin/python}"
TIMEOUT=10

fail() { printf 'FAIL %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --url) URL="${2:?--url needs a URL}"; shift 2 ;;
    --env-file) ENV_FILE="${2:?--env-file needs a file}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs a path}"; shift 2 ;;
    --timeout) TIMEOUT="${2:?--timeout needs seconds}"; shift 2 ;;
    -h | --help) usage ;;
    *) printf 'health-check.sh: unknown option %s\n' "$1" >&2; usage ;;
  esac
done
case "$TIMEOUT" in '' | *[!0-9]*) fail "usage: --timeout takes whole seconds (got $TIMEOUT)" ;; esac
[ -x "$PYTHON" ] || fail "setup: no Python at $PYTHON (give --python)"
command -v curl >/dev/null || fail "setup: curl is not installed"

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
')" || fail "token: could not sign a monitor token with JWT_SECRET_KEY"
fi
export CHEFIA_PROBE_TOKEN

# GET URL PATH into BODY and CODE; curl's own error (refused, timeout) fails the check NAME.
http_get() {  # name path
  local out err
  err="$(mktemp)"
  local -a auth=()
  [ -n "$CHEFIA_PROBE_TOKEN" ] && auth=(-H @-)
  out="$(printf 'Authorization: Bearer %s\n' "$CHEFIA_PROBE_TOKEN" |
    curl -sS --max-time "$TIMEOUT" "${auth[@]}" -o - -w '\n%{http_code}' "$URL$2" 2>"$err")" || {
    local why
    why="$(head -c 300 "$err")"
    rm -f "$err"
    fail "$1: $URL$2 unreachable: $why"
  }
  rm -f "$err"
  CODE="${out##*$'\n'}"
  BODY="${out%$'\n'*}"
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

# 1. /health
http_get health /health
summary="$(judge '
storage, bus = b.get("storage") or {}, b.get("bus") or {}
def state(part):
    return "%s:%s" % (part.get("kind"), "ok" if part.get("ok") is True else "DOWN")
print("status=%s version=%s storage=%s bus=%s workers=%s auth=%s" % (
    b.get("status"), b.get("version"), state(storage), state(bus), b.get("workers"), b.get("auth")))
sys.exit(0 if b.get("status") == "ok" and storage.get("ok") is True and bus.get("ok") is True else 1)
')" || fail "health: HTTP $CODE $summary"
[ "$CODE" = 200 ] || fail "health: HTTP $CODE $summary"
echo "ok health: $summary"

# 2. /ws/stats
http_get stats "$ws_path/stats"
[ "$CODE" = 200 ] || fail "stats: HTTP $CODE $BODY"
connections="$(judge 'print(b["total_connections"])')" ||
  fail "stats: no total_connections in $BODY"
echo "ok stats: total_connections=$connections"

# 3. A WebSocket round trip, as a monitor (it only reads) of a store no restaurant uses.
# (With a token the store comes from the token; store_id only counts in open mode.)
ws_url="ws${URL#http}${ws_path}/$CHEFIA_PROBE_TERMINAL?type=monitor&store_id=health-probe"
export CHEFIA_PROBE_URL="$ws_url" CHEFIA_PROBE_TIMEOUT="$TIMEOUT"
roundtrip="$("$PYTHON" - <<'PROBE' 2>&1
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
)" || fail "websocket: ${roundtrip##*$'\n'}"
echo "ok websocket: $roundtrip"
echo "healthy: $URL"
