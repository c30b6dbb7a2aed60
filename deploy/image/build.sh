#!/usr/bin/env bash
# Builds flowtel's container image (Containerfile at the repository root)
# with Debian's buildah: no daemon, no registry, no base image.
#
#   deploy/image/build.sh [--tag IMAGE] [--archive FILE] [--binary PATH]
#
#   --tag IMAGE     the image name (default localhost/flowtel:<version of Cargo.toml>,
#                   the Helm chart's default image.repository and tag)
#   --archive FILE  also write the image as an OCI archive, for
#                   `kind load image-archive FILE`, `ctr -n k8s.io images import FILE`
#                   or `k3s ctr images import FILE`
#   --binary PATH   use this flowtel binary instead of building one with
#                   `cargo build --release --locked` ($CARGO_TARGET_DIR/release/flowtel)
#
# The binary goes in with the shared libraries `ldd` lists (at the same
# paths), the host's CA bundle and an nsswitch.conf. Prints the image name.
# Needs buildah (apt-get install buildah); run as root or with rootless
# storage set up.
set -euo pipefail
cd "$(dirname "$0")/../.."

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
tag="localhost/flowtel:$version"
archive=""
binary=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --archive) archive="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
command -v buildah >/dev/null || { echo "build.sh: buildah is not installed (apt-get install buildah)" >&2; exit 1; }

if [ -z "$binary" ]; then
  cargo build --release --locked --bin flowtel >&2
  binary="${CARGO_TARGET_DIR:-target}/release/flowtel"
fi
[ -x "$binary" ] || { echo "build.sh: $binary is not an executable" >&2; exit 1; }

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
root="$context/rootfs"
install -D -m 0755 "$binary" "$root/usr/bin/flowtel"
# Shared libraries, at the paths the binary's loader looks for them.
ldd "$binary" | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r lib; do
  install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done
ca=/etc/ssl/certs/ca-certificates.crt
[ -f "$ca" ] || { echo "build.sh: $ca is missing (apt-get install ca-certificates)" >&2; exit 1; }
install -D -m 0644 "$ca" "$root$ca"
# glibc resolves host names (the collector's) from /etc/hosts, then DNS;
# the runtime mounts /etc/hosts and /etc/resolv.conf.
install -d "$root/etc"
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
chmod 0644 "$root/etc/nsswitch.conf"

buildah bud --quiet --layers=false -f Containerfile --build-arg "VERSION=$version" \
  -t "$tag" "$context" >&2
if [ -n "$archive" ]; then
  rm -f "$archive"
  buildah push --quiet "$tag" "oci-archive:$archive:$tag" >&2
fi
echo "$tag"
