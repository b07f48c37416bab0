#!/bin/sh
# deploy/image/wheelhouse.sh: build/wheelhouse/, the broker's wheel and every wheel it runs on,
# built on this host for deploy/Dockerfile, which installs from it with --no-index: the image
# build itself needs no network (`make image` builds it with --network none).
#
# The wheels are this host's: its Python's version (3.11) and platform (manylinux, glibc) must
# be the base image's, which build.sh checks. Every dependency ships wheels, so none is
# compiled here (--only-binary). The broker's own wheel is built from a copy of the sources
# (what an sdist holds), never from the work tree's build/ left by an older build.
#
#   PYTHON  the interpreter whose pip builds the wheelhouse (default: python3)
set -eu
cd "$(dirname "$0")/../.."

python=${PYTHON:-python3}
extras=fast,emulator
out=build/wheelhouse
src=$(mktemp -d /tmp/token-broker-src.XXXXXX)
trap 'rm -rf "$src" "$out.new"' EXIT

tar -c --exclude=__pycache__ pyproject.toml README.md broker | tar -x -C "$src"
rm -rf "$out.new"
mkdir -p "$out.new"
# A fixed date for the wheel's entries: unchanged sources give the same bytes, so Docker's
# build cache keeps the installed layer.
#
# pip resolves the dependencies' markers for this host's Python, not the image's: a host on a
# later 3.11 release than Debian 12's 3.11.2 leaves out what only older releases need. redis-py
# wants async-timeout below 3.11.3, so it is added here by name (pip in the image installs it
# only where the marker asks for it).
for_older_311='async-timeout>=4.0.3'
SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel --quiet --disable-pip-version-check \
    --only-binary=:all: --wheel-dir "$out.new" "${src}[$extras]" $for_older_311
rm -rf "$out"
mv "$out.new" "$out"
echo "wheelhouse.sh: $(find "$out" -name '*.whl' | wc -l) wheels in $out for Python $("$python" -c \
    'import sys; print("%d.%d" % sys.version_info[:2])')" >&2
