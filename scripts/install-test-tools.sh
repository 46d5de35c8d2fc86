#!/usr/bin/env bash
# Install the system tools some tests drive for real (Debian/Ubuntu, as root or with sudo):
# systemd-analyze (unit files), chromium (the dashboard), prometheus/promtool (metrics, rules,
# an end-to-end scrape), amtool (the Alertmanager config), nginx (the site file), shellcheck (the scripts), docker-compose (the
# compose file's schema), openssl, curl and ss (tests/deploy), node and npm (the JS client,
# clients/js). Only what is missing is
# installed; nothing is started (the tests run their own instances on free ports).
set -euo pipefail

declare -A package_of=(
  [systemd-analyze]=systemd
  [chromium]=chromium
  [promtool]=prometheus
  # amtool checks config/alertmanager.yml and its routes.
  [amtool]=prometheus-alertmanager
  [nginx]=nginx-light
  [shellcheck]=shellcheck
  # tests/deploy: compose validation offline, test certificates, health-check.sh, ss.
  [docker-compose]=docker-compose
  [openssl]=openssl
  [curl]=curl
  [ss]=iproute2
  # clients/js: its install (npm ci), build and tests.
  [node]=nodejs
  [npm]=npm
)
missing=()
for tool in "${!package_of[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null 2>&1 \
    || missing+=("${package_of[$tool]}")
done
# Screenshots need real fonts, which chromium only recommends.
if [[ " ${missing[*]} " == *" chromium "* ]]; then missing+=(fonts-liberation); fi
if [ "${#missing[@]}" -eq 0 ]; then
  echo "test tools present"
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "installing: ${missing[*]}"
$sudo apt-get update -qq
# policy-rc.d 101: packages such as nginx and prometheus must not start daemons of their own.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod +x "$policy"
  created_policy=1
fi
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
if [ "$created_policy" -eq 1 ]; then $sudo rm -f "$policy"; fi
echo "installed: ${missing[*]}"
