#!/usr/bin/env bash
# Build the images of deploy/compose.yaml on this host, without any image
# registry: only Debian's package mirror and PyPI are used.
#
#   rtmanager-base:bookworm-rootfs  Debian 12 minbase + python3, python3-venv, ca-certificates,
#                                   made with debootstrap and `docker import`
#   rtmanager-base:bookworm         the above + updates/security suites, upgraded (base/Dockerfile)
#   rtmanager:0.1.0                 deploy/Dockerfile FROM the base; wheels downloaded here
#                                   (pip) and installed offline in the build
#   rtmanager-postgres:15           postgres/Dockerfile: Debian's postgresql-15
#   rtmanager-redis:7               redis/Dockerfile: Debian's redis-server (7.0)
#   rtmanager-prometheus:2.42       prometheus/Dockerfile: Debian's prometheus (2.42)
#
# Usage: deploy/images/build.sh [--force] [IMAGE...]
#   IMAGE: base, rtmanager, postgres, redis, prometheus (default: all; the base
#   is built first whenever something needs it).
#   --force: rebuild even when the inputs did not change.
#
# Cached: each image carries a label with a hash of its inputs (the files it is
# built from, the base image's id, the debootstrap settings); an image whose
# hash is unchanged is not rebuilt. The rtmanager image's inputs are
# deploy/Dockerfile, pyproject.toml, README.md and the four packages, so
# editing the code rebuilds it (about 30 s) and nothing else. Untagged leftovers of
# earlier builds (older than 15 min, with the label) are removed at the end.
#
# Needs root (debootstrap) and dockerd. Installs
# debootstrap with apt-get when it is missing. Environment:
#   RTM_DEBIAN_MIRROR           default http://deb.debian.org/debian
#   RTM_DEBIAN_SECURITY_MIRROR  default http://deb.debian.org/debian-security
#   RTM_IMAGES_WORK             scratch space (default /var/tmp), emptied after each build
#   RTM_HOST_CA                 CA bundle pip trusts while fetching the wheels (default: the
#                               host's, /etc/ssl/certs/ca-certificates.crt)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
MIRROR=${RTM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${RTM_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
WORK=${RTM_IMAGES_WORK:-/var/tmp}
HOST_CA=${RTM_HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
SUITE=bookworm
INCLUDE=python3,python3-venv,ca-certificates
LABEL=com.galaxy.rtmanager.build-inputs

ROOTFS_TAG=rtmanager-base:bookworm-rootfs
BASE_TAG=rtmanager-base:bookworm
RTM_TAG=rtmanager:0.1.0
PG_TAG=rtmanager-postgres:15
REDIS_TAG=rtmanager-redis:7
PROM_TAG=rtmanager-prometheus:2.42

# The legacy builder: this Docker CLI may come without buildx, and nothing here
# needs BuildKit.
export DOCKER_BUILDKIT=0

force=0
wanted=()
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    base|rtmanager|postgres|redis|prometheus) wanted+=("$arg") ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#wanted[@]} -gt 0 ] || wanted=(rtmanager postgres redis prometheus)

log() { echo "images: $*" >&2; }
die() { echo "images: error: $*" >&2; exit 1; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

scratch=$(mktemp -d "$WORK/rtmanager-images.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

docker info >/dev/null 2>&1 || die "dockerd does not answer (start it, e.g. with deploy/local/services.sh up)"

label_of() { docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true; }
id_of() { docker image inspect -f '{{ .Id }}' "$1"; }
# Hash of a folder's files (names and contents), stable across checkouts.
hash_tree() { (cd "$1" && find . -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z \
  | xargs -0 sha256sum); }
digest() { sha256sum | cut -c1-24; }
# up_to_date TAG HASH: the image exists and was built from these inputs.
up_to_date() { [ "$force" = 0 ] && [ "$(label_of "$1")" = "$2" ]; }
report() { printf 'images: %-32s %-7s %6ss\n' "$1" "$2" "$3" >&2; }

build_rootfs() {
  local hash t0 dir
  hash=$( { echo "debootstrap minbase $SUITE $INCLUDE $MIRROR"; uname -m; } | digest)
  t0=$(now)
  if up_to_date "$ROOTFS_TAG" "$hash"; then report "$ROOTFS_TAG" cached "$(secs "$t0")"; return; fi
  if ! command -v debootstrap >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "debootstrap is missing and this is not root: apt-get install debootstrap"
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }
  fi
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  dir=$scratch/rootfs
  log "debootstrap $SUITE (minbase + $INCLUDE) from $MIRROR"
  debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$dir" "$MIRROR" >"$scratch/debootstrap.log" 2>&1 \
    || { tail -n 30 "$scratch/debootstrap.log" >&2; die "debootstrap failed"; }
  # Downloaded packages, package lists and the host's resolver/hostname stay out of the image.
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/var/log/bootstrap.log
  : >"$dir/etc/resolv.conf"
  : >"$dir/etc/hostname"
  tar --numeric-owner -C "$dir" -c . \
    | docker import --change "LABEL $LABEL=$hash" --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' \
        - "$ROOTFS_TAG" >/dev/null
  rm -rf "$dir"
  report "$ROOTFS_TAG" built "$(secs "$t0")"
}

# docker_build TAG HASH CONTEXT [docker build options...]
docker_build() {
  local tag=$1 hash=$2 ctx=$3; shift 3
  if ! docker build -q --force-rm --network host --label "$LABEL=$hash" -t "$tag" "$@" "$ctx" \
      >"$scratch/build.log" 2>&1; then
    tail -n 40 "$scratch/build.log" >&2
    die "building $tag failed"
  fi
}

build_base() {
  build_rootfs
  local hash t0
  hash=$( { id_of "$ROOTFS_TAG"; hash_tree "$here/base"; echo "$MIRROR $SECURITY_MIRROR"; } | digest)
  t0=$(now)
  if up_to_date "$BASE_TAG" "$hash"; then report "$BASE_TAG" cached "$(secs "$t0")"; return; fi
  docker_build "$BASE_TAG" "$hash" "$here/base" --build-arg ROOTFS_IMAGE="$ROOTFS_TAG" \
    --build-arg DEBIAN_MIRROR="$MIRROR" --build-arg DEBIAN_SECURITY_MIRROR="$SECURITY_MIRROR"
  report "$BASE_TAG" built "$(secs "$t0")"
}

build_rtmanager() {
  local hash t0 ctx
  hash=$( { id_of "$BASE_TAG"; cat "$root/deploy/Dockerfile" "$root/pyproject.toml" "$root/README.md";
            for d in controller desired observed migrations; do hash_tree "$root/$d" | sed "s|  \./|  $d/|"; done; } | digest)
  t0=$(now)
  if up_to_date "$RTM_TAG" "$hash"; then report "$RTM_TAG" cached "$(secs "$t0")"; return; fi
  ctx=$scratch/rtmanager
  mkdir -p "$ctx/src" "$ctx/wheels"
  # The project's wheel is built from a copy, so that no build/ or *.egg-info lands in the work tree.
  cp "$root/pyproject.toml" "$root/README.md" "$ctx/src/"
  tar -C "$root" -c --exclude=__pycache__ --exclude='*.pyc' controller desired observed migrations \
    | tar -C "$ctx/src" -x
  # The wheels must suit the base image's Python (its full version too: dependency markers test
  # it, and pip evaluates markers with the interpreter it runs on), C library and machine, not the
  # host's. So pip runs in a throwaway container of the base image, on the host's network (PyPI),
  # and writes the wheels into the build context; the image build itself then has no network use.
  log "wheels for $(docker run --rm --network none "$BASE_TAG" python3 -c \
    'import platform; print("Python", platform.python_version(), platform.machine())')"
  # pip there trusts what the host trusts (the host's CA bundle, e.g. a TLS-inspecting proxy's CA),
  # and follows PIP_INDEX_URL / PIP_EXTRA_INDEX_URL when they are set here.
  local opts=(-v "$ctx:/ctx" -e PIP_DISABLE_PIP_VERSION_CHECK=1 -e PIP_NO_CACHE_DIR=1)
  if [ -r "$HOST_CA" ]; then opts+=(-v "$HOST_CA:/etc/rtmanager-host-ca.crt:ro" -e PIP_CERT=/etc/rtmanager-host-ca.crt); fi
  [ -z "${PIP_INDEX_URL:-}" ] || opts+=(-e PIP_INDEX_URL)
  [ -z "${PIP_EXTRA_INDEX_URL:-}" ] || opts+=(-e PIP_EXTRA_INDEX_URL)
  docker run --rm --network host "${opts[@]}" "$BASE_TAG" sh -ec 'python3 -m venv /tmp/pip && /tmp/pip/bin/pip wheel -q --prefer-binary \
        --wheel-dir /ctx/wheels /ctx/src' >"$scratch/pip.log" 2>&1 \
    || { tail -n 30 "$scratch/pip.log" >&2; die "making the wheels failed"; }
  rm -rf "$ctx/src"
  docker_build "$RTM_TAG" "$hash" "$ctx" -f "$root/deploy/Dockerfile" --build-arg BASE_IMAGE="$BASE_TAG"
  report "$RTM_TAG" built "$(secs "$t0")"
}

build_from_folder() { # TAG FOLDER
  local tag=$1 dir=$here/$2 hash t0
  hash=$( { id_of "$BASE_TAG"; hash_tree "$dir"; } | digest)
  t0=$(now)
  if up_to_date "$tag" "$hash"; then report "$tag" cached "$(secs "$t0")"; return; fi
  docker_build "$tag" "$hash" "$dir" --build-arg BASE_IMAGE="$BASE_TAG"
  report "$tag" built "$(secs "$t0")"
}

start=$(now)
build_base
for image in "${wanted[@]}"; do
  case "$image" in
    base) ;;
    rtmanager) build_rtmanager ;;
    postgres) build_from_folder "$PG_TAG" postgres ;;
    redis) build_from_folder "$REDIS_TAG" redis ;;
    prometheus) build_from_folder "$PROM_TAG" prometheus ;;
  esac
done
# A rebuild leaves the previous image (and the rtmanager build stage) untagged. Remove such
# leftovers of this script (they carry its label), once they are old enough not to belong to a
# build still running next to this one.
docker image prune -f --filter "label=$LABEL" --filter until=15m >/dev/null 2>&1 || true
log "done in $(secs "$start")s"
