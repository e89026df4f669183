#!/usr/bin/env bash
# Build the kvpilot container image with no container registry: a root filesystem from Debian's
# packages (mmdebstrap), the kvpilot wheel installed into a venv in it, packed as an OCI image
# (umoci). The same layout as the Dockerfile: /opt/kvpilot venv, uid 65532, entrypoint `kvpilot`.
#
# Cached outside the clone by the hash of its inputs (this script, the Debian suite, pyproject.toml
# and the package sources): a warm run skips the build and says so. The Debian layer is
# cached on its own (by suite, packages and mirror), so a code change rebuilds only the venv layer. Prints, last, the
# path of the OCI archive (a tar of the OCI layout), which `ctr -n k8s.io images import`,
# `podman load` and `skopeo copy oci-archive:...` take.
#   KVPILOT_CACHE          cache root (default: ${XDG_CACHE_HOME:-~/.cache}/kvpilot)
#   KVPILOT_IMAGE_NAME     the name given to the image (default: ghcr.io/kvpilot/kvpilot:<version>)
#   KVPILOT_DEBIAN_MIRROR  Debian mirror (default: http://deb.debian.org)
# Needs root (mmdebstrap's root mode) and installs mmdebstrap and umoci from Debian when missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

SUITE=bookworm          # python3.11, like the Dockerfile's python:3.11-slim-bookworm
PACKAGES=python3,python3-venv,ca-certificates,libstdc++6,tzdata
MIRROR="${KVPILOT_DEBIAN_MIRROR:-http://deb.debian.org}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)"
NAME="${KVPILOT_IMAGE_NAME:-ghcr.io/kvpilot/kvpilot:$VERSION}"
CACHE_ROOT="${KVPILOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvpilot}"

log() { echo "[build-image] $*" >&2; }

# -- the inputs' hash --------------------------------------------------------------------------
inputs() {
  echo "suite=$SUITE packages=$PACKAGES name=$NAME"
  sha256sum scripts/build-image.sh pyproject.toml
  # Tracked and untracked-but-not-ignored sources, so a local edit makes a new image.
  git ls-files -co --exclude-standard -- core operator router autoscaler kvtransfer sim rayserve | LC_ALL=C sort \
    | while read -r f; do [ -f "$f" ] && sha256sum "$f"; done
}
HASH="$(inputs | sha256sum | cut -c1-16)"
OUT="$CACHE_ROOT/image/$HASH"
ARCHIVE="$OUT/kvpilot-oci.tar"

if [ -f "$OUT/complete" ] && [ -f "$ARCHIVE" ]; then
  log "image $NAME for inputs $HASH already cached in $OUT: skipping the build"
  echo "$ARCHIVE"
  exit 0
fi

# -- tools, from Debian -----------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || { log "needs root (mmdebstrap --mode=root, chroot)"; exit 1; }
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v umoci >/dev/null || need+=(umoci)
if [ ${#need[@]} -gt 0 ]; then
  log "installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
python="${KVPILOT_VENV:-$root/.venv}/bin/python"
[ -x "$python" ] || python=python3

t0=$(date +%s)
work="$CACHE_ROOT/image/.work-$HASH"
trap 'rm -rf "$work" "${base:-/nonexistent}.tmp"' EXIT
rm -rf "$work" && mkdir -p "$work/dist"

# -- 1. the wheel ------------------------------------------------------------------------------
# The image runs every component (operator, router, autoscaler, simulator, KV events), not the
# benchmarks: kvpilot[all], no plotting stack.
EXTRAS=all
log "building the kvpilot $VERSION wheel"
# From a copy of exactly the hashed files: nothing else (no build/ left in the clone).
mkdir -p "$work/src"
{ echo pyproject.toml; git ls-files -co --exclude-standard -- core operator router autoscaler kvtransfer sim rayserve; } \
  | while read -r f; do [ -f "$f" ] && echo "$f"; done | tar -cf - -T - | tar -C "$work/src" -xf -
echo "kvpilot: see https://github.com/kvpilot/kvpilot" >"$work/src/README.md"   # pyproject's readme; not an input
"$python" -P -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$work/src" >&2
wheel="$(ls "$work/dist"/kvpilot-*.whl)"
# Its dependencies as wheels, fetched here by pip through this machine's pip settings (index,
# proxy, CA) and built from source where PyPI has no wheel. With a Python 3.11 here (bookworm's
# minor version) that is nearly all of them; pip in the root filesystem then resolves with the
# image's own Python (environment markers differ between 3.11 patch releases) and fetches the
# rest from the same index, trusting this machine's CA bundle for the duration of the install.
if "$python" -P -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  log "fetching its dependencies as wheels"
  "$python" -P -m pip wheel --quiet --wheel-dir "$work/dist" "$wheel[$EXTRAS]" >&2
fi
ca="$("$python" -P -c 'import os, ssl; print(os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or ssl.get_default_verify_paths().cafile or "")')"
if [ -n "$ca" ] && [ -f "$ca" ]; then cp "$ca" "$work/dist/host-ca.pem"; else : >"$work/dist/host-ca.pem"; fi
pip_env=(PATH=/usr/bin:/bin PIP_CERT=/tmp/dist/host-ca.pem)
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  [ -n "${!v:-}" ] && pip_env+=("$v=${!v}")
done
[ -s "$work/dist/host-ca.pem" ] || pip_env=(PATH=/usr/bin:/bin "${pip_env[@]:2}")
t_wheels=$(date +%s)

# -- 2. the Debian layer: a root filesystem from Debian's packages, cached on its own ------------
# (keyed by suite, packages, mirror and this step's text, so a code change re-runs only step 3):
# the tree itself, to install the venv into, and an OCI layout whose one layer it is.
BASE_KEY="$(printf '%s\n' "$SUITE" "$PACKAGES" "$MIRROR" "$(sed -n '/^# -- 2\./,/^# -- 3\./p' "$root/scripts/build-image.sh")" \
  | sha256sum | cut -c1-16)"
base="$CACHE_ROOT/image/debian-$SUITE-$BASE_KEY"
if [ -f "$base/complete" ]; then
  log "Debian $SUITE layer cached in $base"
else
  log "mmdebstrap $SUITE ($PACKAGES)"
  rm -rf "$base" "$base.tmp" && mkdir -p "$base.tmp"
  mmdebstrap --mode=root --variant=essential --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='echo "nonroot:x:65532:65532:nonroot:/tmp:/usr/sbin/nologin" >>"$1/etc/passwd"' \
    --customize-hook='echo "nonroot:x:65532:" >>"$1/etc/group"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/* "$1"/tmp/*' \
    "$SUITE" "$base.tmp/rootfs" \
    "deb $MIRROR/debian $SUITE main" "deb $MIRROR/debian $SUITE-updates main" \
    "deb $MIRROR/debian-security $SUITE-security main" >&2
  umoci init --layout "$base.tmp/oci"
  umoci new --image "$base.tmp/oci:kvpilot"
  umoci insert --image "$base.tmp/oci:kvpilot" --history.created_by "mmdebstrap $SUITE $PACKAGES" \
    "$base.tmp/rootfs" / >&2
  touch "$base.tmp/complete" && mv "$base.tmp" "$base"
fi
t_base=$(date +%s)

# -- 3. the venv layer: the wheel and its dependencies, installed by the image's own Python -----
log "installing the wheel into /opt/kvpilot"
rootfs="$work/rootfs"
cp -a "$base/rootfs" "$rootfs"
mkdir -p "$rootfs/tmp/dist" && cp "$work/dist"/* "$rootfs/tmp/dist/"
cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf" 2>/dev/null || true   # only used if a wheel is fetched
chroot "$rootfs" /usr/bin/python3 -m venv /opt/kvpilot
chroot "$rootfs" /usr/bin/env -i "${pip_env[@]}" /opt/kvpilot/bin/pip install --quiet \
  --disable-pip-version-check --no-cache-dir --find-links /tmp/dist "kvpilot[$EXTRAS]" >&2
chroot "$rootfs" /usr/bin/env -i /opt/kvpilot/bin/pip uninstall --quiet -y pip setuptools >&2
chroot "$rootfs" /opt/kvpilot/bin/python -m compileall -q /opt/kvpilot >&2
t_venv=$(date +%s)

log "packing $NAME with umoci"
oci="$work/oci"
cp -a "$base/oci" "$oci"
umoci insert --image "$oci:kvpilot" --history.created_by "kvpilot $(basename "$wheel") in a venv" \
  "$rootfs/opt/kvpilot" /opt/kvpilot >&2
umoci config --image "$oci:kvpilot" --config.user 65532:65532 --config.workingdir /tmp \
  --config.entrypoint kvpilot --config.cmd --help \
  --config.env PATH=/opt/kvpilot/bin:/usr/local/bin:/usr/bin:/bin --config.env PYTHONDONTWRITEBYTECODE=1 \
  --config.env PYTHONUNBUFFERED=1 --config.env HOME=/tmp --config.env MPLCONFIGDIR=/tmp/matplotlib \
  --config.env HF_HOME=/tmp/hf --config.label org.opencontainers.image.version="$VERSION" \
  --config.label org.opencontainers.image.title=kvpilot --history.created_by "umoci config"
umoci gc --layout "$oci"
# umoci's tags cannot hold '/' or ':'; containerd takes the full name from this annotation.
"$python" -P - "$oci/index.json" "$NAME" <<'PY'
import json, sys
path, name = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = name
json.dump(index, open(path, "w"))
PY
tar -C "$oci" -cf "$work/kvpilot-oci.tar" .

# -- 4. into the cache -------------------------------------------------------------------------
rm -rf "$OUT" && mkdir -p "$OUT"
mv "$work/kvpilot-oci.tar" "$ARCHIVE"
t1=$(date +%s)
debian_mb=$(du -sm "$base/rootfs" | cut -f1); venv_mb=$(du -sm "$rootfs/opt/kvpilot" | cut -f1)
cache_mb=$(du -sm --exclude=".work-*" "$CACHE_ROOT/image" | cut -f1)
cat >"$OUT/build.json" <<EOF
{"name": "$NAME", "hash": "$HASH", "seconds": $((t1 - t0)), "wheels_seconds": $((t_wheels - t0)),
 "debian_seconds": $((t_base - t_wheels)),
 "venv_seconds": $((t_venv - t_base)), "debian_mb": $debian_mb, "venv_mb": $venv_mb,
 "archive_bytes": $(stat -c %s "$ARCHIVE"), "cache_mb": $cache_mb}
EOF
touch "$OUT/complete"
# Keep the three newest images; older ones are only older sources.
find "$CACHE_ROOT/image" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended -regex '.*/[0-9a-f]{16}' \
  -printf '%T@ %p\n' | sort -rn | tail -n +4 | cut -d' ' -f2- | xargs -r rm -rf
log "built $NAME in $((t1 - t0)) s (wheels $((t_wheels - t0)) s, Debian layer $((t_base - t_wheels)) s," \
  "venv $((t_venv - t_base)) s, packing $((t1 - t_venv)) s):" \
  "Debian ${debian_mb} MB + venv ${venv_mb} MB unpacked, archive $(du -h "$ARCHIVE" | cut -f1)"
echo "$ARCHIVE"
