#!/usr/bin/env bash
# Install the Debian/Ubuntu packages Rewind's tests and console use, when they are missing.
# As root: apt-get update, then apt-get install -y. Otherwise: say exactly what to run.
set -euo pipefail
pkgs=(qemu-utils libnbd-bin nbdkit fio e2fsprogs dosfstools fuse3 xvfb util-linux openssl
      libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-shape0 libxcb-xkb1 libxkbcommon-x11-0
      libxcb-render-util0 libxcb-image0 libegl1 libgl1 libfontconfig1 libdbus-1-3 libglib2.0-0)
if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "system-deps: not a Debian/Ubuntu system; install the equivalents of: ${pkgs[*]}" >&2
    exit 0
fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
    echo "system-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "system-deps: missing Debian packages: ${missing[*]}" >&2
    echo "system-deps: run: sudo apt-get install -y ${missing[*]}   (tests that need them will be skipped)" >&2
fi
