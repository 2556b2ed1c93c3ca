#!/usr/bin/env bash
# Set up everything the tests need on a Debian 12 (bookworm) machine.
# Idempotent, and fast when everything is already there.
#
#   1. Debian packages: QEMU 7.2 (qemu-system-x86, whose qemu-system-common has
#      qemu-storage-daemon; qemu-utils), cpio, kmod, python3-venv, iproute2 (`ip`:
#      the migration test's two hosts are network namespaces), libvirt 9.0
#      (daemon, clients, QEMU driver; plus the kvm group and libvirt-qemu user),
#      DPDK 22.11's dpdk-testpmd (package dpdk-dev; the package dpdk has only the
#      scripts) and its virtio PMD (librte-net-virtio23, only a Recommends): the
#      net interop tests' vhost-user front-end. No hugepages are reserved: testpmd
#      runs with --no-huge, where EAL's memory is a memfd that virtio_user shares.
#   2. .venv at the repository root with `pip install -e '.[test]'`.
#   3. QEMU 10.0 from bookworm-backports (qemu-system-x86, -common, -data and
#      qemu-utils, which has its qemu-storage-daemon), unpacked (dpkg -x, never
#      installed) under the cache dir, with an apt state of its own (the system's package
#      lists stay untouched).
#   4. The test guest (guest-images/build-guest.py): kernel + initramfs.
#
# Cache dir: ${PYVHOST_USER_CACHE:-$HOME/.cache/pyvhost-user}
# Options: --no-venv  skip step 2;  --no-qemu10  skip step 3;  --no-guest  skip step 4.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${PYVHOST_USER_CACHE:-$HOME/.cache/pyvhost-user}
QEMU10_DIR=$CACHE/qemu-10.0
QEMU10_VERSION_PREFIX="1:10.0."
APT_PACKAGES=(qemu-system-x86 qemu-utils cpio kmod python3-venv python3 gzip iproute2
              libvirt-daemon libvirt-clients libvirt-daemon-driver-qemu
              dpdk-dev librte-net-virtio23)

DO_VENV=1 DO_QEMU10=1 DO_GUEST=1
for arg in "$@"; do
    case "$arg" in
        --no-venv) DO_VENV=0 ;;
        --no-qemu10) DO_QEMU10=0 ;;
        --no-guest) DO_GUEST=0 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' \
                       "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "setup: unknown option $arg" >&2; exit 2 ;;
    esac
done

log() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo"
    SUDO=(sudo)
fi

T_START=$(date +%s.%N)
step_time() {  # elapsed seconds since $1
    awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}

# Wait while another apt/dpkg holds the dpkg lock (e.g. an install in progress).
wait_for_dpkg_lock() {
    local i=0
    while "${SUDO[@]}" fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock \
            /var/lib/apt/lists/lock >/dev/null 2>&1; do
        [ $i = 0 ] && log "waiting for another apt/dpkg to finish"
        i=$((i + 1))
        [ $i -gt 600 ] && die "dpkg lock still held after 10 minutes"
        sleep 1
    done
}

# ---- 1. Debian packages ------------------------------------------------------
t=$(date +%s.%N)
missing=()
declare -A installed=()
while read -r name status; do
    [ "$status" = installed ] && installed[$name]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${APT_PACKAGES[@]}" 2>/dev/null || true)
for p in "${APT_PACKAGES[@]}"; do
    [ -n "${installed[$p]:-}" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    if command -v fuser >/dev/null; then wait_for_dpkg_lock; fi
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=600 update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
    log "apt packages installed ($(step_time "$t") s)"
else
    log "apt packages present"
fi
# The guest build asks apt-cache for the current kernel: needs package lists.
if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
    log "apt-get update (no package lists)"
    "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 update -q
fi

# libvirt (the avocado suite's libvirt test): without recommends the packages
# create neither the kvm group nor the libvirt-qemu user its QEMU driver needs.
# kvm must be a system group: a plain one breaks a later install of Debian's udev.
if ! getent group kvm >/dev/null; then
    "${SUDO[@]}" groupadd --system kvm
    log "created the system group kvm"
fi
if ! getent passwd libvirt-qemu >/dev/null; then
    "${SUDO[@]}" useradd --system --user-group --no-create-home --home-dir /var/lib/libvirt \
        --shell /usr/sbin/nologin --groups kvm libvirt-qemu
    log "created the system user libvirt-qemu"
fi

# ---- 2. Python venv ----------------------------------------------------------
if [ $DO_VENV = 1 ]; then
    t=$(date +%s.%N)
    VENV=$REPO/.venv
    STAMP=$VENV/.pyvhost-user-installed
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating .venv"
        python3 -m venv "$VENV"
    fi
    if [ ! -f "$REPO/pyproject.toml" ]; then
        log "no pyproject.toml yet: skipping pip install"
    elif [ -f "$STAMP" ] && [ "$STAMP" -nt "$REPO/pyproject.toml" ]; then
        log "python packages present"
    else
        log "pip install -e '.[test]'"
        "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO[test]"
        touch "$STAMP"
        log "python packages installed ($(step_time "$t") s)"
    fi
    # Byte-code for the package, written now: an editable install compiles on
    # first import, or never where PYTHONDONTWRITEBYTECODE is set, and compiling
    # costs a back-end a third of its start-up (quick when nothing changed).
    "$VENV/bin/python" -m compileall -q -j 0 "$REPO/backend/pyvhost_user" >/dev/null
fi

# ---- 3. QEMU 10.0 from bookworm-backports, unpacked --------------------------
# The mirror URI of the system's bookworm source (deb822 or one-line format).
debian_mirror() {
    local f=/etc/apt/sources.list.d/debian.sources
    if [ -f "$f" ]; then
        awk '
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { if (uri != "" && suite) { print uri; exit } uri = ""; suite = 0; next }
            tolower($1) == "uris:" { uri = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == "bookworm") suite = 1 }
            END { if (uri != "" && suite) print uri }
        ' "$f" | head -n1
        return
    fi
    if [ -f /etc/apt/sources.list ]; then
        awk '$1 == "deb" {
                 for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) break
                 if ($(i + 1) == "bookworm") { print $i; exit }
             }' /etc/apt/sources.list
    fi
}

if [ $DO_QEMU10 = 1 ]; then
    t=$(date +%s.%N)
    if [ -x "$QEMU10_DIR/usr/bin/qemu-system-x86_64" ] \
            && [ -x "$QEMU10_DIR/usr/bin/qemu-storage-daemon" ] \
            && [ -f "$QEMU10_DIR/.version" ]; then
        log "QEMU 10.0 present ($(cat "$QEMU10_DIR/.version"))"
    else
        MIRROR=$(debian_mirror)
        [ -n "$MIRROR" ] || die "cannot find the Debian mirror in /etc/apt/sources.list.d/debian.sources"
        APT_DIR=$CACHE/apt-backports
        mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" \
                 "$APT_DIR/sources.list.d" "$APT_DIR/debs"
        KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
        echo "deb [signed-by=$KEYRING] $MIRROR bookworm-backports main" > "$APT_DIR/sources.list"
        APT_OPTS=(
            -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
            -o "Dir::Etc::SourceParts=$APT_DIR/sources.list.d"
            -o "Dir::State::Lists=$APT_DIR/lists"
            -o "Dir::Cache=$APT_DIR/cache"
        )
        # apt drops to the _apt user for downloads; our cache may be in a home
        # directory it cannot enter.
        [ "$(id -u)" = 0 ] && APT_OPTS+=(-o "APT::Sandbox::User=root")
        log "apt-get update (bookworm-backports from $MIRROR, separate state)"
        apt-get "${APT_OPTS[@]}" update -q >"$APT_DIR/update.log" 2>&1 \
            || { cat "$APT_DIR/update.log" >&2; die "apt-get update for backports failed"; }
        VERSION=$(apt-cache "${APT_OPTS[@]}" show qemu-system-x86 2>/dev/null \
                  | awk -v pre="$QEMU10_VERSION_PREFIX" \
                        '$1 == "Version:" && index($2, pre) == 1 { print $2 }' \
                  | sort -V | tail -n1)
        [ -n "$VERSION" ] || die "bookworm-backports offers no qemu-system-x86 ${QEMU10_VERSION_PREFIX}x"
        log "downloading QEMU $VERSION"
        rm -f "$APT_DIR/debs/"*.deb
        (cd "$APT_DIR/debs" && apt-get "${APT_OPTS[@]}" download -q \
            "qemu-system-x86=$VERSION" "qemu-system-common=$VERSION" \
            "qemu-system-data=$VERSION" "qemu-utils=$VERSION") >"$APT_DIR/download.log" 2>&1 \
            || { cat "$APT_DIR/download.log" >&2; die "apt-get download of QEMU $VERSION failed"; }
        rm -rf "$QEMU10_DIR.tmp"
        mkdir -p "$QEMU10_DIR.tmp"
        for deb in "$APT_DIR/debs/"*.deb; do
            dpkg -x "$deb" "$QEMU10_DIR.tmp"
        done
        echo "$VERSION" > "$QEMU10_DIR.tmp/.version"
        rm -rf "$QEMU10_DIR"
        mv "$QEMU10_DIR.tmp" "$QEMU10_DIR"
        log "QEMU $VERSION unpacked in $QEMU10_DIR ($(step_time "$t") s)"
        # Libraries it needs that this system lacks (it is built for bookworm).
        for exe in qemu-system-x86_64 qemu-storage-daemon; do
            if ldd "$QEMU10_DIR/usr/bin/$exe" | grep -q 'not found'; then
                ldd "$QEMU10_DIR/usr/bin/$exe" | grep 'not found' >&2
                die "QEMU 10.0 $exe misses shared libraries (listed above)"
            fi
        done
    fi
fi

# ---- 4. Guest image -----------------------------------------------------------
if [ $DO_GUEST = 1 ]; then
    t=$(date +%s.%N)
    python3 "$REPO/guest-images/build-guest.py" >/dev/null
    log "guest image ready in $CACHE/guest ($(step_time "$t") s)"
fi

log "done ($(step_time "$T_START") s)"
