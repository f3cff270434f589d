#!/usr/bin/env bash
# Install the Debian `memcached` and `openssl` packages if they are missing (idempotent).
#
# The integration tests start their own memcached processes on random 127.0.0.1 ports, so the
# package's system service is not wanted: the install runs with a policy-rc.d that forbids starting
# services, and if a memcached service still came up during the install (e.g. the host's
# policy-rc.d allows it), it is stopped by its PID and disabled at boot.
#
# Needs root (or the packages already installed). Exit status: 0 = installed/present, 1 = failure.
set -euo pipefail

log() { printf 'setup-memcached: %s\n' "$*"; }
die() { printf 'setup-memcached: ERROR: %s\n' "$*" >&2; exit 1; }

need=()
command -v memcached >/dev/null 2>&1 || [[ -x /usr/bin/memcached ]] || need+=(memcached)
command -v openssl >/dev/null 2>&1 || need+=(openssl)

if [[ ${#need[@]} -eq 0 ]]; then
    log "memcached $(memcached -V 2>/dev/null | awk '{print $2}') and openssl already installed: nothing to do"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    die "missing: ${need[*]}. Install them as root, e.g.: sudo apt-get install -y --no-install-recommends ${need[*]}
(then run this script again; it will not start any system service)"
fi
command -v apt-get >/dev/null 2>&1 || die "missing: ${need[*]}, and apt-get is not available to install them"

# PIDs of memcached processes running as the package's `memcache` user (the system service).
service_pids() {
    local uid pid exe
    uid=$(id -u memcache 2>/dev/null) || return 0
    for pid in $(pgrep -u "$uid" -x memcached 2>/dev/null || true); do
        exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
        if [[ $exe == */memcached ]] && alive "$pid"; then echo "$pid"; fi
    done
    return 0
}

# True while PID exists and is not a zombie (an orphan whose PID 1 doesn't reap stays <defunct>).
alive() {
    local state
    state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

before=" $(service_pids | tr '\n' ' ') "

# Forbid service starts during the install, unless the host already has a policy-rc.d (we then
# leave it alone and stop whatever it let start, below).
policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# temporary, written by shardcache tools/setup-memcached.sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    own_policy=1
fi
cleanup() { if [[ $own_policy -eq 1 ]]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt_install() { apt-get install -y -q --no-install-recommends "${need[@]}"; }

# apt-get update only when needed: no package lists yet, no install candidate, or a failed install
# (stale lists point at files the mirror no longer has).
needs_update=0
if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    needs_update=1
else
    for p in "${need[@]}"; do
        cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
        if [[ -z $cand || $cand == "(none)" ]]; then needs_update=1; fi
    done
fi
if [[ $needs_update -eq 1 ]]; then
    log "apt-get update"
    apt-get update -q || die "apt-get update failed"
fi
log "apt-get install ${need[*]}"
if ! apt_install; then
    log "install failed; apt-get update and retry once"
    apt-get update -q || die "apt-get update failed"
    apt_install || die "apt-get install ${need[*]} failed"
fi

# Stop a service the install started after all (only processes that were not running before).
stopped=()
for pid in $(service_pids); do
    [[ $before == *" $pid "* ]] && continue
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 1 50); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    stopped+=("$pid")
    pidfile=/run/memcached/memcached.pid
    if [[ -f $pidfile && $(cat "$pidfile" 2>/dev/null) == "$pid" ]]; then rm -f "$pidfile"; fi
done
if [[ ${#stopped[@]} -gt 0 ]]; then
    log "stopped the memcached system service the install started (PID ${stopped[*]})"
fi
# Don't let the package's service start at the next boot either (only when we installed it).
if [[ " ${need[*]} " == *" memcached "* ]]; then
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
        if systemctl disable --now memcached >/dev/null 2>&1; then log "stopped and disabled memcached.service"; fi
    elif command -v systemctl >/dev/null 2>&1; then
        # no running systemd (container, chroot): systemctl edits the boot symlinks offline
        if systemctl disable memcached >/dev/null 2>&1; then log "disabled memcached.service"; fi
    else
        link=/etc/systemd/system/multi-user.target.wants/memcached.service
        if [[ -L $link ]]; then rm -f "$link" && log "disabled memcached.service (removed $link)"; fi
    fi
    if command -v update-rc.d >/dev/null 2>&1 && [[ -e /etc/init.d/memcached ]]; then
        if update-rc.d memcached disable >/dev/null 2>&1; then log "disabled the memcached init script"; fi
    fi
fi

command -v memcached >/dev/null 2>&1 || die "memcached still not on PATH after install"
command -v openssl >/dev/null 2>&1 || die "openssl still not on PATH after install"
log "installed: memcached $(memcached -V | awk '{print $2}') at $(command -v memcached); $(openssl version)"
