#!/usr/bin/env bash
# Install and run chefia-rt on a bare-metal Ubuntu/Debian host.
#
#   deploy.sh deploy   [--source DIR | --wheel FILE] [--wheelhouse DIR] [--label TEXT]
#                      [--system-site-packages] [--no-backup]
#   deploy.sh rollback
#   deploy.sh backup-timer
#   deploy.sh verify   [--url http://127.0.0.1:8001]
#   deploy.sh tune     [--no-apply]
#   common options:    [--prefix DIR] [--env-file FILE] [--no-systemctl] [--keep N]
#
# Layout: every release is a directory of its own with its own virtualenv, side by side:
#   PREFIX/releases/<UTC time>-<version>[-label]/venv/bin/chefia-rt
#   PREFIX/releases/<...>/deploy/            this script, health-check.sh and the unit files
#   PREFIX/current -> releases/<...>         what systemd runs, switched atomically
# `deploy` first checks the host (Python 3.11+, free disk for a release and a backup), builds the
# new release beside the running one, runs `chefia-rt check-config` from it, takes a backup with
# the running release (`chefia-rt backup`, then `backup --verify` of that archive; --no-backup
# skips it, the first deploy has nothing to back up) and runs `chefia-rt migrate`; only then it
# switches `current`, restarts the service and runs `verify`. A release that fails a step before
# the switch is never switched to: the old one keeps serving. A release that fails its restart
# or `verify` is rolled back by itself: `current` goes back to the release before it, which is
# restarted and verified again, the failed release is removed, and deploy exits 1 saying so.
# Migrations only add, so the previous release runs on the migrated schema; the backup taken
# before them is named in the output should the data itself need restoring.
# Every release installs its dependencies exactly as uv.lock pins them (hash-checked), from the
# lock of --source DIR or else of the checkout this script is in, with the uv that lock pins
# (kept in PREFIX/tools); the project itself goes in without dependencies of its own. The lock
# used is kept in the release (uv.lock, requirements.txt). --wheelhouse DIR installs offline from
# wheels built on a machine with access: in a checkout, `uv export --frozen --no-dev
# --no-emit-project -o req.txt && pip download --only-binary :all: -d DIR -r req.txt`, then
# `pip download --no-deps -d DIR "$(python scripts/lock_pin.py uv | cut -d' ' -f1)"` and
# `uv build --wheel -o DIR`.
# `rollback` switches `current` back to the release deployed before it and restarts.
# `tune` installs the kernel settings (sysctl.d), the descriptor limits of the service user and,
# when nginx is installed, sizes it for the connections (deploy/nginx/60-chefia-rt-limits.conf).
# `backup-timer` (also run at every restart) writes chefia-rt-backup.timer's schedule from
# BACKUP_SCHEDULE of the env file, as the drop-in chefia-rt-backup.timer.d/schedule.conf
# (OnCalendar= from `chefia-rt backup --print-oncalendar`), and enables the timer, or disables
# it with BACKUP_ENABLED=false. Run it after changing either in the env file.
#
# Environment (the options win): CHEFIA_PREFIX (/opt/chefia-rt), CHEFIA_ENV_FILE
# (/etc/chefia-rt/env), CHEFIA_DATA_DIR (/var/lib/chefia-rt: the service's working directory,
# where check-config and migrate run too), CHEFIA_USER (chefia), CHEFIA_DEPLOY_NO_SYSTEMCTL=1,
# CHEFIA_SERVICE (chefia-rt.service), CHEFIA_KEEP_RELEASES (5), CHEFIA_PYTHON (python3),
# CHEFIA_DEPLOY_ROOT (prefix of the /etc paths written by `tune` and the unit installation),
# CHEFIA_DEPLOY_RESERVE_MB (100: free space left over after a release and a backup),
# CHEFIA_RESTART_COMMAND (with --no-systemctl: the command, run by sh -c, that restarts the service
# on a host without systemd; like `systemctl restart` of the Type=notify unit it must return once
# the server is ready and fail when it does not come up. Without it, --no-systemctl neither
# restarts nor verifies).
# Run as root, `deploy` also creates the service user and its directories when missing.
#
# Exit codes: 0 done, 1 a step failed (the message says which), 2 usage.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PREFIX="${CHEFIA_PREFIX:-/opt/chefia-rt}"
ENV_FILE="${CHEFIA_ENV_FILE:-/etc/chefia-rt/env}"
DATA_DIR="${CHEFIA_DATA_DIR:-/var/lib/chefia-rt}"
RUN_USER="${CHEFIA_USER:-chefia}"
SERVICE="${CHEFIA_SERVICE:-chefia-rt.service}"
KEEP="${CHEFIA_KEEP_RELEASES:-5}"
PYTHON="${CHEFIA_PYTHON:-python3}"
ROOT_DIR="${CHEFIA_DEPLOY_ROOT:-}"
NO_SYSTEMCTL="${CHEFIA_DEPLOY_NO_SYSTEMCTL:-0}"
SOURCE=""
WHEEL=""
WHEELHOUSE=""
LABEL=""
BUILDING=""
SYSTEM_SITE=0
APPLY=1
BACKUP=1
BACKUP_ARCHIVE=""
RESERVE_MB="${CHEFIA_DEPLOY_RESERVE_MB:-100}"
RESTART_COMMAND="${CHEFIA_RESTART_COMMAND:-}"
URL=""

say() { printf 'deploy.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
usage() {
  sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# Run a command from a release as the service would: its user, directory and environment, so
# that a SQLite file created by `migrate` belongs to the service and lies where it looks.
as_service() {
  local -a prefix=()
  if [ "$(id -u)" = 0 ] && [ "$RUN_USER" != root ] && id -u "$RUN_USER" >/dev/null 2>&1; then
    prefix=(runuser -u "$RUN_USER" --)
  fi
  [ -d "$DATA_DIR" ] || die "data directory $DATA_DIR does not exist (set CHEFIA_DATA_DIR)"
  (cd "$DATA_DIR" && with_env "${prefix[@]}" "$@")
}

# Run a command with the variables of ENV_FILE added to the environment.
with_env() {
  if [ -r "$ENV_FILE" ]; then
    # systemd's EnvironmentFile= syntax is KEY=VALUE per line; read it without a shell so that
    # JSON values (SYNC_POLICIES) and secrets are passed through untouched.
    local -a vars=()
    local line key value
    while IFS= read -r line || [ -n "$line" ]; do
      line="${line#"${line%%[![:space:]]*}"}"
      case "$line" in '' | '#'* | ';'*) continue ;; esac
      key="${line%%=*}"
      [ "$key" = "$line" ] && continue
      value="${line#*=}"
      # Like systemd: one pair of surrounding quotes is not part of the value.
      case "$value" in \"*\" | \'*\') [ "${#value}" -ge 2 ] && value="${value:1:${#value}-2}" ;; esac
      vars+=("$key=$value")
    done <"$ENV_FILE"
    env "${vars[@]}" "$@"
  else
    say "no readable $ENV_FILE: running with the defaults (SQLite, open mode)"
    "$@"
  fi
}

# A build that did not finish leaves nothing behind that `rollback` could pick.
on_exit() {
  if [ -n "$BUILDING" ]; then
    rm -rf "$BUILDING"
    say "deploy failed: removed the unfinished $BUILDING; $(current_release || true) is still current"
  fi
}
trap on_exit EXIT

# First deploy on a fresh host (as root, with systemd): the service user and its directories.
prepare_host() {
  [ "$(id -u)" = 0 ] || return 0
  if ! id -u "$RUN_USER" >/dev/null 2>&1; then
    useradd --system --home-dir "$DATA_DIR" --no-create-home --shell /usr/sbin/nologin "$RUN_USER"
    say "created system user $RUN_USER"
  fi
  install -d -m 0750 -o "$RUN_USER" -g "$RUN_USER" "$DATA_DIR"
  install -d -m 0750 -o root -g "$RUN_USER" "$(dirname "$ENV_FILE")"
  if [ ! -e "$ENV_FILE" ]; then
    install -m 0640 -o root -g "$RUN_USER" "$SCRIPT_DIR/../config/.env.example" "$ENV_FILE" 2>/dev/null ||
      install -m 0640 -o root -g "$RUN_USER" /dev/null "$ENV_FILE"
    say "created $ENV_FILE from config/.env.example: set DATABASE_URL, REDIS_URL, JWT_SECRET_KEY"
  fi
}

systemctl_enabled() { [ "$NO_SYSTEMCTL" != "1" ]; }

release_dirs() {  # every release, oldest first (names start with a sortable UTC time)
  [ -d "$PREFIX/releases" ] || return 0
  find "$PREFIX/releases" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort
}

current_release() {
  [ -L "$PREFIX/current" ] || return 0
  basename "$(readlink "$PREFIX/current")"
}

# Point PREFIX/current at releases/NAME atomically: a new symlink beside it, renamed over it
# (rename(2) replaces in one step; `ln -sfn` alone unlinks first and leaves a moment without one).
switch_to() {
  local name="$1"
  ln -sfn "releases/$name" "$PREFIX/.current.new"
  mv -T "$PREFIX/.current.new" "$PREFIX/current"
  printf '%s\n' "$name" >>"$PREFIX/releases.log"
  say "current -> releases/$name"
}

# Restart the service on the current release. Returns 1 (with the reason said) when it does
# not come up; 0 also when nothing restarts it (--no-systemctl without CHEFIA_RESTART_COMMAND).
restart_service() {
  if ! systemctl_enabled; then
    if [ -z "$RESTART_COMMAND" ]; then
      say "systemctl skipped (--no-systemctl): restart $SERVICE yourself, then run verify"
      return 0
    fi
    say "restarting with CHEFIA_RESTART_COMMAND"
    sh -c "$RESTART_COMMAND" || { say "CHEFIA_RESTART_COMMAND failed"; return 1; }
    return 0
  fi
  command -v systemctl >/dev/null || die "systemctl not found (use --no-systemctl to skip it)"
  install_units
  say "restarting $SERVICE"
  systemctl restart "$SERVICE" || {
    say "systemctl restart $SERVICE failed: journalctl -u $SERVICE"
    return 1
  }
  systemctl is-active --quiet "$SERVICE" || { say "$SERVICE is not active after the restart"; return 1; }
}

# Something restarts the service (so `verify` after a restart judges the new release).
restarts_service() { systemctl_enabled || [ -n "$RESTART_COMMAND" ]; }

# The unit files of the current release into /etc/systemd/system (only when they changed).
install_units() {
  local unit changed=0 target="$ROOT_DIR/etc/systemd/system"
  for unit in chefia-rt.service chefia-rt-backup.service chefia-rt-backup.timer; do
    if ! cmp -s "$PREFIX/current/deploy/$unit" "$target/$unit"; then
      install -m 0644 "$PREFIX/current/deploy/$unit" "$target/$unit"
      changed=1
    fi
  done
  write_backup_schedule && changed=1
  if [ "$changed" = 1 ]; then
    systemctl daemon-reload
    systemctl enable --quiet chefia-rt.service
  fi
  apply_backup_enabled
}

# The timer's OnCalendar= from BACKUP_SCHEDULE (as the current release reads the env file).
# Returns 0 when the drop-in changed.
write_backup_schedule() {
  local dropin="$ROOT_DIR/etc/systemd/system/chefia-rt-backup.timer.d" schedule lines
  local -a calendars=()
  schedule="$(env_value BACKUP_SCHEDULE)"
  lines="$(as_service "$PREFIX/current/venv/bin/chefia-rt" backup --print-oncalendar)" ||
    die "BACKUP_SCHEDULE in $ENV_FILE has no systemd equivalent (the line above says why)"
  # One expression, or two when cron's day-of-month OR day-of-week needs both.
  mapfile -t calendars <<<"$lines"
  mkdir -p "$dropin"
  {
    printf '# Written by deploy.sh from BACKUP_SCHEDULE="%s" of %s.\n' "${schedule:-0 2 * * *}" "$ENV_FILE"
    printf '[Timer]\nOnCalendar=\n'
    printf 'OnCalendar=%s\n' "${calendars[@]}"
  } >"$dropin/schedule.conf.new"
  if cmp -s "$dropin/schedule.conf.new" "$dropin/schedule.conf"; then
    rm -f "$dropin/schedule.conf.new"
    return 1
  fi
  mv "$dropin/schedule.conf.new" "$dropin/schedule.conf"
  say "backup schedule: $(printf '%s' "$lines" | paste -sd';') ($dropin/schedule.conf)"
}

# BACKUP_ENABLED: the timer on or off (as the current release reads it, so any spelling of a
# boolean the server accepts works the same here).
apply_backup_enabled() {
  local state
  state="$(as_service "$PREFIX/current/venv/bin/chefia-rt" check-config 2>/dev/null |
    "$PREFIX/current/venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["scheduled_backups"])')" ||
    die "could not read BACKUP_ENABLED from $ENV_FILE with the current release"
  if [ "$state" = off ]; then
    if systemctl_enabled; then
      systemctl disable --now --quiet chefia-rt-backup.timer
    fi
    say "scheduled backups are off (BACKUP_ENABLED=false): chefia-rt-backup.timer disabled"
  else
    if systemctl_enabled; then
      systemctl enable --now --quiet chefia-rt-backup.timer
    fi
    say "scheduled backups are on: chefia-rt-backup.timer enabled"
  fi
}

cmd_backup_timer() {
  [ -x "$PREFIX/current/venv/bin/chefia-rt" ] || die "nothing deployed in $PREFIX"
  if [ -z "$ROOT_DIR" ] && [ "$(id -u)" != 0 ]; then
    die "backup-timer writes /etc: run it as root (or set CHEFIA_DEPLOY_ROOT to stage the files)"
  fi
  if write_backup_schedule && systemctl_enabled; then
    systemctl daemon-reload
  fi
  apply_backup_enabled
}

cmd_deploy() {
  local stamp version dir
  [ -n "$SOURCE" ] && [ -n "$WHEEL" ] && die "give --source or --wheel, not both"
  if [ -n "$WHEELHOUSE" ]; then
    [ -d "$WHEELHOUSE" ] || die "wheelhouse not found: $WHEELHOUSE"
    [ -n "$SOURCE" ] && die "--source builds from the network; with --wheelhouse give --wheel"
    if [ -z "$WHEEL" ]; then
      WHEEL="$(find "$WHEELHOUSE" -maxdepth 1 -name 'chefia_rt-*.whl' | sort -V | tail -n 1)"
      [ -n "$WHEEL" ] || die "no chefia_rt-*.whl in $WHEELHOUSE"
    fi
  fi
  if [ -n "$WHEEL" ]; then
    [ -f "$WHEEL" ] || die "wheel not found: $WHEEL"
    WHEEL="$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")"
  else
    SOURCE="${SOURCE:-$(dirname "$SCRIPT_DIR")}"
    [ -f "$SOURCE/pyproject.toml" ] || die "no pyproject.toml in $SOURCE (give --source DIR)"
    SOURCE="$(cd "$SOURCE" && pwd)"
  fi
  check_prerequisites

  case "$LABEL" in *[!A-Za-z0-9._-]*) die "--label may hold only [A-Za-z0-9._-] (got $LABEL)" ;; esac
  if [ -n "$WHEEL" ]; then
    version="$(basename "$WHEEL" | cut -d- -f2)"
  else
    version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$SOURCE/pyproject.toml" | head -n 1)"
  fi
  # Names sort in deploy order (the UTC time first): rollback and pruning rely on it.
  stamp="$(date -u +%Y%m%dT%H%M%SZ)"
  local name="$stamp-${version:-unknown}${LABEL:+-$LABEL}" n=1
  RELEASE="$name"
  while [ -e "$PREFIX/releases/$RELEASE" ]; do  # two deploys within one second
    RELEASE="$name.$n"
    n=$((n + 1))
  done
  dir="$PREFIX/releases/$RELEASE"
  if systemctl_enabled; then prepare_host; fi
  mkdir -p "$PREFIX/releases"

  say "building release $RELEASE in $dir"
  BUILDING="$dir"
  mkdir -p "$dir"
  local -a venv_args=() index=() uv_pip
  [ "$SYSTEM_SITE" = 1 ] && venv_args+=(--system-site-packages)
  [ -n "$WHEELHOUSE" ] && index=(--no-index --find-links "$WHEELHOUSE")
  local project="${SOURCE:-$(dirname "$SCRIPT_DIR")}" uv
  [ -f "$project/uv.lock" ] || die "no uv.lock in $project: releases install only what it pins"
  uv="$(bootstrap_uv "$project/uv.lock")"
  cp "$project/uv.lock" "$dir/uv.lock"
  UV_PYTHON_DOWNLOADS=never "$uv" export --quiet --project "$project" --frozen --no-dev \
    --no-emit-project --no-header --format requirements-txt -o "$dir/requirements.txt" ||
    die "could not read the dependencies from $project/uv.lock"
  # A venv without a pip of its own: uv installs into it, and releases are never changed by hand.
  "$PYTHON" -m venv --without-pip "${venv_args[@]}" "$dir/venv"
  uv_pip=("$uv" pip install --quiet --python "$dir/venv/bin/python" "${index[@]}")
  "${uv_pip[@]}" --require-hashes -r "$dir/requirements.txt" ||
    die "installing the locked dependencies failed (the lines above say why)"
  if [ -z "$WHEEL" ]; then
    # Built with the setuptools the lock pins (tool.uv.build-constraint-dependencies).
    UV_PYTHON_DOWNLOADS=never "$uv" build --quiet --wheel --project "$SOURCE" \
      --python "$dir/venv/bin/python" --out-dir "$dir/wheel" || die "building $SOURCE failed"
    WHEEL="$(find "$dir/wheel" -name 'chefia_rt-*.whl' | head -n 1)"
  fi
  "${uv_pip[@]}" --no-deps "$WHEEL" || die "installing $WHEEL failed"
  rm -rf "$dir/wheel"
  # The wheel's own requirements must all be met by what the lock installed.
  "$uv" pip check --quiet --python "$dir/venv/bin/python" ||
    die "$WHEEL needs what $project/uv.lock does not pin: deploy it from its own checkout"
  # The scripts and units travel with the release: rollback and verify use the matching ones.
  mkdir -p "$dir/deploy"
  cp -R "$SCRIPT_DIR/." "$dir/deploy/"
  "$dir/venv/bin/chefia-rt" --version >"$dir/VERSION"

  say "checking the configuration with the new release"
  as_service "$dir/venv/bin/chefia-rt" check-config >/dev/null ||
    die "the new release refuses the configuration in $ENV_FILE (the line above says why)"
  local previous
  previous="$(current_release)"
  backup_before_migrating "$previous"
  say "applying migrations"
  as_service "$dir/venv/bin/chefia-rt" migrate || die "migrations failed (the lines above say why)"
  BUILDING=""

  switch_to "$RELEASE"
  local failed=""
  if ! restart_service; then
    failed="it did not start"
  elif restarts_service && ! verify_current; then
    failed="it failed verify"
  fi
  [ -z "$failed" ] || roll_back_failed "$RELEASE" "$previous" "$failed"
  prune
  if restarts_service; then
    say "deployed $RELEASE ($(cat "$dir/VERSION")): restarted and verified"
  else
    say "deployed $RELEASE ($(cat "$dir/VERSION")): not restarted, so not verified yet"
  fi
}

# Before anything is built: a Python the releases can run on, and room for a release and a backup.
check_prerequisites() {
  command -v "$PYTHON" >/dev/null || die "prerequisite: no $PYTHON on this host (set CHEFIA_PYTHON)"
  "$PYTHON" -c 'import sys; raise SystemExit(sys.version_info < (3, 11))' 2>/dev/null ||
    die "prerequisite: $PYTHON is $("$PYTHON" --version 2>&1); chefia-rt needs Python 3.11 or newer (set CHEFIA_PYTHON)"
  local release_kb backup_kb=0 backup_dir db
  # A release takes what the current one takes (a first one about 300 MiB: venv and uv cache).
  if [ -d "$PREFIX/current/" ]; then
    release_kb="$(du -sk "$PREFIX/current/" | cut -f1)"
  else
    release_kb=$((300 * 1024))
  fi
  # A backup takes about what the newest archive took, or the SQLite file when there is none.
  backup_dir="$(env_value BACKUP_DIR)"
  backup_dir="$(in_data_dir "${backup_dir:-./backups}")"
  if [ -d "$backup_dir" ]; then
    backup_kb="$(find "$backup_dir" -maxdepth 1 -type f -name '*.tar*' -printf '%T@ %k\n' |
      sort -n | tail -n 1 | cut -d' ' -f2)"
    backup_kb="${backup_kb:-0}"
  fi
  db="$(env_value DATABASE_URL)"
  if [ "$backup_kb" = 0 ] && [ "${db#sqlite:///}" != "$db" ]; then
    db="$(in_data_dir "${db#sqlite:///}")"
    [ -f "$db" ] && backup_kb="$(du -sk "$db" | cut -f1)"
  fi
  [ "$BACKUP" = 1 ] || backup_kb=0
  local reserve_kb=$((RESERVE_MB * 1024)) on="$DATA_DIR"
  mkdir -p "$PREFIX"
  need_space "$PREFIX" $((release_kb + reserve_kb)) "a release ($((release_kb / 1024)) MiB)"
  [ -d "$backup_dir" ] && on="$backup_dir"
  if [ -d "$on" ] && [ "$backup_kb" -gt 0 ]; then
    if [ "$(stat -c %d "$on")" = "$(stat -c %d "$PREFIX")" ]; then
      need_space "$on" $((release_kb + backup_kb + reserve_kb)) \
        "a release and a backup ($(((release_kb + backup_kb) / 1024)) MiB)"
    else
      need_space "$on" $((backup_kb + reserve_kb)) "a backup ($((backup_kb / 1024)) MiB)"
    fi
  fi
}

in_data_dir() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$DATA_DIR" "${1#./}" ;; esac; }

need_space() {  # directory, KiB needed (reserve included), what for
  local free_kb
  free_kb="$(df -Pk "$1" | awk 'NR == 2 { print $4 }')"
  [ "$free_kb" -ge "$2" ] ||
    die "prerequisite: not enough disk space on $1 for $3 and ${RESERVE_MB} MiB to spare (CHEFIA_DEPLOY_RESERVE_MB): $((free_kb / 1024)) MiB free, $(($2 / 1024)) MiB needed"
}

# One value of ENV_FILE (KEY=VALUE, optional quotes), empty when unset.
env_value() {
  [ -r "$ENV_FILE" ] || return 0
  sed -n "s/^[[:space:]]*$1=//p" "$ENV_FILE" | tail -n 1 |
    sed 's/^"\(.*\)"$/\1/; s/^'"'"'\(.*\)'"'"'$/\1/'
}

# A verified backup of the data as it is before the migrations, made by the release that runs
# on it now. The first deploy (no current release) has no data of a release to keep.
backup_before_migrating() {
  local running="$1" archive
  if [ "$BACKUP" = 0 ]; then
    say "no backup before migrating (--no-backup)"
    return 0
  fi
  if [ -z "$running" ]; then
    say "first deploy: no backup before migrating (no release ran on this data yet)"
    return 0
  fi
  local cli="$PREFIX/releases/$running/venv/bin/chefia-rt"
  say "backing up the data with $running before migrating"
  archive="$(as_service "$cli" backup)" ||
    die "the backup before migrating failed (the lines above say why; --no-backup skips it)"
  archive="$(in_data_dir "$(printf '%s\n' "$archive" | tail -n 1)")"
  as_service "$cli" backup --verify "$archive" >&2 ||
    die "the backup before migrating, $archive, does not verify (the lines above say why)"
  BACKUP_ARCHIVE="$archive"
  say "backup verified: $archive"
}

verify_current() {
  say "verifying $(current_release)"
  cmd_verify
}

# The release just switched to failed: back to the one before it, restarted and verified.
roll_back_failed() {
  local failed="$1" previous="$2" why="$3" note=""
  [ -n "$BACKUP_ARCHIVE" ] && note="; the backup taken before migrating is $BACKUP_ARCHIVE"
  if [ -z "$previous" ]; then
    die "release $failed: $why, and there is no earlier release to roll back to: $failed stays current; fix it and deploy again$note"
  fi
  say "release $failed: $why; rolling back to $previous by itself"
  switch_to "$previous"
  rm -rf "${PREFIX:?}/releases/$failed"
  say "removed the failed release $failed"
  restart_service ||
    die "release $failed: $why; rolled back to $previous, but it did not start either: the service is DOWN$note"
  if restarts_service && ! verify_current; then
    die "release $failed: $why; rolled back to $previous, but it fails verify too: the service is NOT HEALTHY$note"
  fi
  die "release $failed: $why; rolled back to $previous, which is serving and verified$note"
}

# The uv that LOCK pins, hash-checked, in PREFIX/tools/uv-VERSION (made once, shared by releases).
bootstrap_uv() {
  local lock="$1" pin version target
  pin="$(dirname "$lock")/scripts/lock_pin.py"
  [ -f "$pin" ] || pin="$SCRIPT_DIR/../scripts/lock_pin.py"
  version="$("$PYTHON" "$pin" --lock "$lock" --version uv)" || die "no uv in $lock"
  target="$PREFIX/tools/uv-$version"
  if [ ! -x "$target/bin/uv" ]; then
    say "installing uv $version from $lock into $target"
    local -a index=()
    [ -n "$WHEELHOUSE" ] && index=(--no-index --find-links "$WHEELHOUSE")
    rm -rf "$target.tmp"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check "${index[@]}" --target \
      "$target.tmp" --require-hashes -r <("$PYTHON" "$pin" --lock "$lock" uv) >&2 ||
      die "could not install uv $version (pip for $PYTHON is needed once: apt install python3-pip)"
    mv -T "$target.tmp" "$target"
  fi
  printf '%s\n' "$target/bin/uv"
}

# Keep the newest KEEP releases and always the current one.
prune() {
  local current name
  local -a all=()
  current="$(current_release)"
  mapfile -t all < <(release_dirs)
  local excess=$((${#all[@]} - KEEP))
  for name in "${all[@]}"; do
    [ "$excess" -le 0 ] && break
    if [ "$name" != "$current" ]; then
      rm -rf "${PREFIX:?}/releases/$name"
      say "pruned old release $name"
    fi
    excess=$((excess - 1))
  done
}

cmd_rollback() {
  local current previous="" name
  current="$(current_release)"
  [ -n "$current" ] || die "nothing deployed in $PREFIX (no current symlink)"
  # The release before the current one, in deploy order (names sort by time).
  while IFS= read -r name; do
    [ "$name" = "$current" ] && break
    previous="$name"
  done < <(release_dirs)
  [ -n "$previous" ] || die "no release older than $current to roll back to"
  [ -x "$PREFIX/releases/$previous/venv/bin/chefia-rt" ] ||
    die "release $previous is incomplete (no venv/bin/chefia-rt)"
  say "rolling back from $current to $previous"
  # Migrations only add: the older release runs on the newer schema, so no migration here.
  as_service "$PREFIX/releases/$previous/venv/bin/chefia-rt" check-config >/dev/null ||
    die "release $previous refuses the configuration in $ENV_FILE (the line above says why)"
  switch_to "$previous"
  restart_service || die "$previous did not start after the rollback"
  say "rolled back to $previous"
}

# Returns 1 (never exits) when the current release does not pass: deploy rolls back then.
cmd_verify() {
  [ -x "$PREFIX/current/venv/bin/python" ] || { say "error: nothing deployed in $PREFIX"; return 1; }
  local -a args=(--python "$PREFIX/current/venv/bin/python")
  [ -n "$URL" ] && args+=(--url "$URL")
  [ -r "$ENV_FILE" ] && args+=(--env-file "$ENV_FILE")
  if systemctl_enabled && command -v systemctl >/dev/null; then
    systemctl is-active --quiet "$SERVICE" || { say "error: $SERVICE is not active"; return 1; }
  fi
  "$PREFIX/current/deploy/health-check.sh" "${args[@]}"
}

# nginx sized for the connections chefia-rt takes (deploy/nginx/60-chefia-rt-limits.conf says
# how): the main-context snippet, and worker_connections in nginx.conf (kept as .chefia-rt.bak).
NGINX_WORKER_CONNECTIONS=16384
tune_nginx() {
  local nginx_dir="$ROOT_DIR/etc/nginx"
  if [ ! -f "$nginx_dir/nginx.conf" ]; then
    say "no $nginx_dir/nginx.conf: nginx not tuned (run tune again after installing nginx)"
    return 0
  fi
  mkdir -p "$nginx_dir/modules-enabled"
  install -m 0644 "$SCRIPT_DIR/nginx/60-chefia-rt-limits.conf" \
    "$nginx_dir/modules-enabled/60-chefia-rt-limits.conf"
  grep -q '^[[:space:]]*worker_connections[[:space:]]' "$nginx_dir/nginx.conf" ||
    die "$nginx_dir/nginx.conf has no worker_connections line to set: set it to $NGINX_WORKER_CONNECTIONS in events {} yourself"
  [ -e "$nginx_dir/nginx.conf.chefia-rt.bak" ] || cp -p "$nginx_dir/nginx.conf" "$nginx_dir/nginx.conf.chefia-rt.bak"
  sed -i -E "s/^([[:space:]]*worker_connections[[:space:]]+)[0-9]+;/\1$NGINX_WORKER_CONNECTIONS;/" \
    "$nginx_dir/nginx.conf"
  say "nginx: worker_connections $NGINX_WORKER_CONNECTIONS, worker_rlimit_nofile 65536 (reload nginx after nginx -t)"
  if [ "$APPLY" = 1 ] && command -v nginx >/dev/null; then
    nginx -t -q || die "nginx -t refuses the tuned configuration (nginx.conf.chefia-rt.bak is the old one)"
  fi
}

cmd_tune() {
  local sysctl_dir="$ROOT_DIR/etc/sysctl.d" limits_dir="$ROOT_DIR/etc/security/limits.d"
  if [ -z "$ROOT_DIR" ] && [ "$(id -u)" != 0 ]; then
    die "tune writes /etc: run it as root (or set CHEFIA_DEPLOY_ROOT to stage the files)"
  fi
  mkdir -p "$sysctl_dir" "$limits_dir"
  install -m 0644 "$SCRIPT_DIR/sysctl.d/60-chefia-rt.conf" "$sysctl_dir/60-chefia-rt.conf"
  # The unit sets LimitNOFILE for the service; this is for chefia's own shells (chefia-rt
  # backup or restore run by hand) and for the load generator's user.
  cat >"$limits_dir/60-chefia-rt.conf" <<'LIMITS'
# Installed by chefia-rt deploy.sh tune: descriptors for chefia-rt commands run by hand.
chefia soft nofile 65536
chefia hard nofile 65536
LIMITS
  chmod 0644 "$limits_dir/60-chefia-rt.conf"
  say "installed $sysctl_dir/60-chefia-rt.conf and $limits_dir/60-chefia-rt.conf"
  tune_nginx
  if [ "$APPLY" = 1 ]; then
    sysctl -q -p "$sysctl_dir/60-chefia-rt.conf" || die "sysctl could not apply the settings"
    say "kernel settings applied"
  fi
}

[ $# -ge 1 ] || usage
COMMAND="$1"
shift
while [ $# -gt 0 ]; do
  case "$1" in
    --source) SOURCE="${2:?--source needs a directory}"; shift 2 ;;
    --wheel) WHEEL="${2:?--wheel needs a file}"; shift 2 ;;
    --wheelhouse) WHEELHOUSE="${2:?--wheelhouse needs a directory}"; shift 2 ;;
    --label) LABEL="${2:?--label needs a text}"; shift 2 ;;
    --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
    --env-file) ENV_FILE="${2:?--env-file needs a file}"; shift 2 ;;
    --keep) KEEP="${2:?--keep needs a number}"; shift 2 ;;
    --url) URL="${2:?--url needs a URL}"; shift 2 ;;
    --system-site-packages) SYSTEM_SITE=1; shift ;;
    --no-systemctl) NO_SYSTEMCTL=1; shift ;;
    --no-apply) APPLY=0; shift ;;
    --no-backup) BACKUP=0; shift ;;
    -h | --help) usage ;;
    *) say "unknown option: $1"; usage ;;
  esac
done
case "$KEEP" in '' | *[!0-9]* | 0 | 1) die "--keep must be a number of at least 2 (got $KEEP)" ;; esac
case "$RESERVE_MB" in
  '' | *[!0-9]*) die "CHEFIA_DEPLOY_RESERVE_MB must be a whole number of MiB (got $RESERVE_MB)" ;;
esac
# Commands run from DATA_DIR: relative paths given here mean relative to where we were started.
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
PREFIX="$(absolute "${PREFIX%/}")"
ENV_FILE="$(absolute "$ENV_FILE")"
DATA_DIR="$(absolute "$DATA_DIR")"

case "$COMMAND" in
  deploy) cmd_deploy ;;
  rollback) cmd_rollback ;;
  backup-timer) cmd_backup_timer ;;
  verify) cmd_verify ;;
  tune) cmd_tune ;;
  -h | --help | help) usage ;;
  *) say "unknown command: $COMMAND"; usage ;;
esac
