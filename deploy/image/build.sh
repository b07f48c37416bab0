#!/bin/sh
# deploy/image/build.sh: builds the image token-broker:VERSION from deploy/Dockerfile, with
# no network: the wheelhouse comes from this host (wheelhouse.sh), the base image from Docker's
# store (base.sh builds it with debootstrap unless BASE names another one already there).
# Needs a Docker daemon (`make image` runs it under dockerd.sh).
#
#   BASE    the base image (default: the debootstrap'd bookworm of base.sh)
#   PYTHON  the interpreter that builds the wheelhouse (default: python3)
#   IMAGE   the tag to build (default: token-broker:VERSION, VERSION from pyproject.toml)
set -eu
cd "$(dirname "$0")/../.."

python=${PYTHON:-python3}
version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
image=${IMAGE:-token-broker:$version}
started=$(date +%s)

base=${BASE:-$(deploy/image/base.sh)}
docker image inspect "$base" >/dev/null 2>&1 || {
    echo "build.sh: Docker has no image $base (no registry is asked: pull it, or leave BASE unset)" >&2
    exit 1
}
series='import sys; print("%d.%d" % sys.version_info[:2])'
theirs=$(docker run --rm --network none --entrypoint python3 "$base" -c "$series")
ours=$("$python" -c "$series")
[ "$theirs" = "$ours" ] || {
    echo "build.sh: $base has Python $theirs, the wheelhouse would be for $ours: use a Python $theirs here (PYTHON=…)" >&2
    exit 1
}

PYTHON=$python deploy/image/wheelhouse.sh
docker build --network none --build-arg "BASE=$base" -f deploy/Dockerfile -t "$image" .
size=$(docker image inspect --format '{{.Size}}' "$image")
echo "build.sh: built $image on $base: $((size / 1000000)) MB, in $(($(date +%s) - started)) s" >&2
