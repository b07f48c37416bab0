#!/bin/sh
# deploy/image/base.sh: prints the tag of a Debian bookworm base image with Debian's Python
# 3.11, built here with debootstrap when Docker does not have it yet.
#
# For machines that reach Debian's package mirrors but no image registry: `make image` builds
# on it (BASE=…) instead of the public python:3.11-slim-bookworm, which deploy/Dockerfile
# keeps as its default. The same release as that image, so the wheelhouse built on a bookworm
# host fits both. The tag names what went into the base (release, variant and a digest of
# this script, which holds the package list and the trimming), so a changed recipe builds a
# new base and an unchanged one is never built twice.
#
#   DEBIAN_MIRROR  the mirror to bootstrap from (default: the one apt uses for bookworm main)
set -eu

suite=bookworm
variant=minbase
packages=python3,python3-venv
arch=$(dpkg --print-architecture)
digest=$( (cat "$0"; echo "$arch") | sha256sum | cut -c1-12)
tag="token-broker-base:$suite-$variant-$digest"

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base.sh: $tag is built already" >&2
    echo "$tag"
    exit 0
fi

command -v debootstrap >/dev/null || { echo "base.sh: no debootstrap: run 'make image-tools'" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "base.sh: debootstrap needs root" >&2; exit 1; }
# shellcheck disable=SC2016 # $(REPO_URI) is apt's field, not the shell's
mirror=${DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI)' \
    "Release: $suite" 'Component: main' 'Identifier: Packages' 2>/dev/null | head -n 1)}
[ -n "$mirror" ] || {
    echo "base.sh: apt knows no mirror for $suite main: run 'apt-get update', or set DEBIAN_MIRROR" >&2
    exit 1
}

root=$(mktemp -d /var/tmp/token-broker-base.XXXXXX)
cleanup() {
    # debootstrap unmounts what it mounted, but not when it was interrupted.
    for point in proc sys dev/pts; do
        mountpoint -q "$root/$point" 2>/dev/null && umount -l "$root/$point"
    done
    rm -rf "$root"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "base.sh: debootstrap --variant=$variant $suite with $packages from $mirror" >&2
started=$(date +%s)
debootstrap --variant="$variant" --include="$packages" --arch="$arch" "$suite" "$root" "$mirror" \
    >"$root.log" 2>&1 || {
    tail -n 25 "$root.log" >&2
    rm -f "$root.log"
    exit 1
}
rm -f "$root.log"

# What a container never reads: downloaded packages and indexes, documentation (each package's
# copyright file stays), manuals, translations, logs, and the host's own files that
# debootstrap copied in (Docker supplies /etc/resolv.conf, /etc/hostname and /dev at run).
cd "$root"
rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/* \
    usr/share/man/* usr/share/info/* var/log/* etc/resolv.conf etc/hostname dev/*
find usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
find usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find usr/share/doc -mindepth 1 -depth -type d -empty -delete
cd - >/dev/null

echo "base.sh: importing it as $tag" >&2
tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "deploy/image/base.sh: debootstrap --variant=$variant --include=$packages $suite" \
    - "$tag" >/dev/null
echo "base.sh: built $tag in $(($(date +%s) - started)) s" >&2
echo "$tag"
