#!/usr/bin/env bash
# Make a Docker engine and the `memcached:1.6` image available for the integration tests (idempotent).
#
#   1. install Debian's docker.io if `dockerd` is missing (root only; the package's service is not
#      started: we start our own daemon below);
#   2. if `docker info` fails, start dockerd in the background with
#      --storage-driver=overlay2 --ip-forward=false --ip-masq=false (containers cannot reach beyond
#      this machine), after removing stale pid files left by a killed daemon; log to
#      $SHARDCACHE_DOCKERD_LOG (default /tmp/shardcache-dockerd.log); wait up to ~30 s for `docker info`;
#      the PID of a daemon started here is written to $SHARDCACHE_DOCKERD_PIDFILE
#      (default /tmp/shardcache-dockerd.pid) so the caller can stop it (kill -TERM "$(cat FILE)");
#   3. if the image `memcached:1.6` is missing, try a (bounded) pull, else build it locally from the
#      host's /usr/bin/memcached and the libraries it links (run tools/setup-memcached.sh first).
#
# Set SHARDCACHE_SKIP_PULL=1 to go straight to the local build. Exit status 0 = ready, 1 = failure.
set -euo pipefail

IMAGE=${SHARDCACHE_MEMCACHED_IMAGE:-memcached:1.6}
LOG=${SHARDCACHE_DOCKERD_LOG:-/tmp/shardcache-dockerd.log}
PIDFILE=${SHARDCACHE_DOCKERD_PIDFILE:-/tmp/shardcache-dockerd.pid}
WAIT_S=30

log() { printf 'setup-docker: %s\n' "$*"; }
die() { printf 'setup-docker: ERROR: %s\n' "$*" >&2; exit 1; }
is_root() { [[ $(id -u) -eq 0 ]]; }
docker_ok() { timeout 10 docker info >/dev/null 2>&1; }

# --- 1. packages -------------------------------------------------------------------------------
if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    if ! command -v docker >/dev/null 2>&1 || ! docker_ok; then
        is_root || die "Docker is not installed. As root run: apt-get install -y docker.io
(or install Docker Engine another way and start it), then run this script again"
        command -v apt-get >/dev/null 2>&1 || die "dockerd missing and apt-get is not available"
        policy=/usr/sbin/policy-rc.d
        own_policy=0
        if [[ ! -e $policy ]]; then
            printf '#!/bin/sh\n# temporary, written by shardcache tools/setup-docker.sh\nexit 101\n' >"$policy"
            chmod 0755 "$policy"
            own_policy=1
        fi
        trap '[[ $own_policy -eq 1 ]] && rm -f "$policy"' EXIT
        export DEBIAN_FRONTEND=noninteractive
        t0=$SECONDS
        if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
            log "apt-get update"
            apt-get update -q >/dev/null || die "apt-get update failed"
        fi
        log "apt-get install docker.io (takes ~20 s)"
        if ! apt-get install -y -q --no-install-recommends docker.io >/dev/null; then
            log "install failed; apt-get update and retry once"
            apt-get update -q >/dev/null || die "apt-get update failed"
            apt-get install -y -q --no-install-recommends docker.io >/dev/null || die "apt-get install docker.io failed"
        fi
        [[ $own_policy -eq 1 ]] && rm -f "$policy"
        own_policy=0
        log "installed docker.io in $((SECONDS - t0)) s"
    fi
else
    log "docker and dockerd already installed"
fi

# --- 2. the daemon -----------------------------------------------------------------------------
# True if PID runs (not a zombie: a killed daemon whose parent doesn't reap it stays <defunct>)
# and its command name starts with NAME.
alive_as() { # PID NAME
    local pid=$1 want=$2 comm state
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ $comm == "$want"* && $state != Z && $state != X ]]
}

# A pid file is stale when its process is gone or is not the program that wrote it.
clean_pidfile() { # FILE EXPECTED_COMM
    local file=$1 want=$2 pid
    [[ -f $file ]] || return 0
    pid=$(tr -dc '0-9' <"$file" 2>/dev/null || true)
    if [[ -n $pid ]] && alive_as "$pid" "$want"; then
        return 0 # alive and genuine: keep it
    fi
    rm -f "$file"
    log "removed stale pid file $file (pid '${pid:-?}' is not a running $want)"
}

if docker_ok; then
    log "Docker engine already answers (server $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
else
    is_root || die "no Docker engine answers 'docker info' and only root can start dockerd here:
start Docker (e.g. sudo tools/setup-docker.sh), or add yourself to the docker group"
    running=""
    for pid in $(pgrep -x dockerd || true); do
        if alive_as "$pid" dockerd; then running="$running $pid"; fi
    done
    running=${running# }
    if [[ -n $running ]]; then
        die "a dockerd is running (PID $running) but 'docker info' fails; see its log, or stop it with: kill -TERM $running"
    fi
    clean_pidfile /var/run/docker.pid dockerd
    clean_pidfile /var/run/docker/containerd/containerd.pid containerd
    log "starting dockerd (log: $LOG)"
    # setsid: own session, so the daemon outlives this script and the caller's terminal.
    setsid dockerd --storage-driver=overlay2 --ip-forward=false --ip-masq=false \
        </dev/null >"$LOG" 2>&1 &
    dpid=$!
    echo "$dpid" >"$PIDFILE" # at once: if we are killed while waiting, the caller can still stop it
    t0=$SECONDS
    until docker_ok; do
        if ! kill -0 "$dpid" 2>/dev/null; then
            rm -f "$PIDFILE"
            tail -n 20 "$LOG" >&2 || true
            die "dockerd exited during start-up (log above, full log: $LOG)"
        fi
        if ((SECONDS - t0 >= WAIT_S)); then
            tail -n 20 "$LOG" >&2 || true
            kill -TERM "$dpid" 2>/dev/null || true
            rm -f "$PIDFILE"
            die "dockerd (PID $dpid) did not answer 'docker info' within ${WAIT_S} s; stopped it (log: $LOG)"
        fi
        sleep 0.5
    done
    log "dockerd started, PID $dpid, answered after $((SECONDS - t0)) s (PID also in $PIDFILE; stop: kill -TERM $dpid)"
fi

# --- 3. the image ------------------------------------------------------------------------------
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "image $IMAGE present ($(docker image inspect --format '{{.Id}}' "$IMAGE" | cut -c1-19))"
    exit 0
fi

if [[ ${SHARDCACHE_SKIP_PULL:-0} != 1 ]]; then
    log "trying: docker pull $IMAGE (bounded to 20 s)"
    if timeout 20 docker pull -q "$IMAGE" >/dev/null 2>&1; then
        log "pulled $IMAGE"
        exit 0
    fi
    log "pull failed (no registry reachable?); building $IMAGE from the host's memcached"
fi

MEMCACHED=$(command -v memcached || true)
[[ -n $MEMCACHED ]] || die "memcached is not installed on this host: run tools/setup-memcached.sh first"
command -v ldd >/dev/null 2>&1 || die "ldd not found (package libc-bin)"

root=$(mktemp -d /tmp/shardcache-memcached-image.XXXXXX)
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root" # the container runs as nobody: it must be able to traverse /
mkdir -p "$root/usr/bin" "$root/etc" "$root/tmp"
chmod 1777 "$root/tmp"
cp -L "$MEMCACHED" "$root/usr/bin/memcached"
chmod 0755 "$root/usr/bin/memcached"
# Every library ldd lists (including the dynamic loader), at the path ldd names.
while read -r lib; do
    [[ -n $lib ]] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
    chmod 0755 "$root$lib" # the dynamic loader must be executable
done < <(ldd "$MEMCACHED" | grep -oE '/[^ ]+\.so[^ ]*' | sort -u)
printf 'root:x:0:0:root:/:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' \
    >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
find "$root" -type d -exec chmod a+rx {} +

version=$("$MEMCACHED" -V | awk '{print $2}')
tar --numeric-owner --owner=0 --group=0 -C "$root" -c . |
    docker import \
        --change 'CMD ["memcached"]' \
        --change 'USER 65534:65534' \
        --change 'EXPOSE 11211/tcp' \
        --change "LABEL org.shardcache.origin=local-build org.shardcache.memcached-version=$version" \
        - "$IMAGE" >/dev/null || die "docker import failed"

# Sanity check: the image runs memcached (no network needed).
if ! out=$(timeout 30 docker run --rm --network none "$IMAGE" memcached -V 2>&1); then
    docker image rm -f "$IMAGE" >/dev/null 2>&1 || true # don't leave a broken image behind
    die "the built image does not run memcached (removed it again): $out"
fi
log "built $IMAGE locally from $MEMCACHED ($out)"
