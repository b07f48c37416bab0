#!/bin/sh
# deploy/image/dockerd.sh COMMAND [ARG…]: runs COMMAND with a Docker daemon to talk to.
#
# A daemon that already answers `docker info` is used as it is and left running. Otherwise
# dockerd is started here, as root, in the background, and stopped once COMMAND has ended,
# whatever its outcome. Either way the exit status is COMMAND's, or 1 with the reason when no
# daemon could be had (never a silent skip: CI must see why the image was not tested).
#
# The daemon started here changes nothing on the host's network: no bridge, no iptables rules
# (the image is built with --network none and run with --network host). Its data stay in
# /var/lib/docker, so the base image and the build cache outlive it.
#
#   DOCKERD_LOG      where its log goes (default: build/dockerd.log under the current directory)
#   DOCKERD_TIMEOUT  seconds to wait for it to answer (default: 60)
#   DOCKERD_LOCK     the lock that keeps runs apart (default: /run/lock/token-broker-dockerd.lock)
set -eu

[ "$#" -gt 0 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }

log=${DOCKERD_LOG:-build/dockerd.log}
timeout=${DOCKERD_TIMEOUT:-60}
# One run at a time on a machine: a second run would otherwise find the daemon the first one
# started, and lose it when the first one stops it.
lock=${DOCKERD_LOCK:-/run/lock/token-broker-dockerd.lock}

fail() {
    echo "dockerd.sh: $*" >&2
    exit 1
}

answers() {
    docker info >/dev/null 2>&1
}

tail_log() {
    echo "--- last lines of $log ---" >&2
    tail -n 25 "$log" >&2 || true
}

start() {
    command -v docker >/dev/null || fail "no docker command: run 'make image-tools' (Debian's docker.io)"
    command -v dockerd >/dev/null || fail "no Docker daemon answers and there is no dockerd to start: run 'make image-tools' (Debian's docker.io), or start Docker"
    [ "$(id -u)" = 0 ] || fail "no Docker daemon answers, and dockerd can only be started as root: run as root, or start Docker"
    mkdir -p "$(dirname "$log")"
    echo "dockerd.sh: starting dockerd (log: $log)" >&2
    # 9>&-: the lock is this run's, not the daemon's nor its containers'.
    dockerd --iptables=false --ip-masq=false --bridge=none >"$log" 2>&1 9>&- &
    started=$!
    waited=0
    until answers; do
        if ! kill -0 "$started" 2>/dev/null; then
            wait "$started" || status=$?
            started=
            tail_log
            fail "dockerd exited with status ${status:-0} before answering"
        fi
        if [ "$waited" -ge "$((timeout * 2))" ]; then
            tail_log
            fail "dockerd did not answer 'docker info' within ${timeout} s"
        fi
        sleep 0.5
        waited=$((waited + 1))
    done
    echo "dockerd.sh: dockerd answers (pid $started)" >&2
}

# shellcheck disable=SC2317,SC2329 # called by the EXIT trap
stop() {
    [ -n "$started" ] || return 0
    echo "dockerd.sh: stopping the dockerd started here (pid $started)" >&2
    kill -TERM "$started" 2>/dev/null || return 0
    waited=0
    while kill -0 "$started" 2>/dev/null; do
        if [ "$waited" -ge 60 ]; then
            echo "dockerd.sh: dockerd still running after 30 s; killing it" >&2
            kill -KILL "$started" 2>/dev/null || true
            break
        fi
        sleep 0.5
        waited=$((waited + 1))
    done
    wait "$started" 2>/dev/null || true
    started=
}

started=
mkdir -p "$(dirname "$lock")"
exec 9>"$lock"
flock 9
trap 'stop' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

answers || start
status=0
"$@" 9>&- || status=$?
exit "$status"
