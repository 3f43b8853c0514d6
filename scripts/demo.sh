#!/usr/bin/env bash
# The main job on a fresh machine: build, make a real root filesystem (Debian minbase with
# python3 by debootstrap, cached in $CIMG_DEMO_DIR; without debootstrap or network, a small
# root filesystem made of the host's own programs and libraries), pack it into one .cimg
# file, and run commands in a container whose root is that file.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${CIMG_DEMO_DIR:-/var/tmp/cimg-demo}
mkdir -p "$DIR"
cargo build --release -q

ROOTFS=$DIR/rootfs
if [ ! -x "$ROOTFS/usr/bin/python3" ] && [ ! -e "$ROOTFS/.host-made" ]; then
  rm -rf "$ROOTFS"
  if [ "$(id -u)" = 0 ] && { command -v debootstrap >/dev/null ||
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1; } &&
     debootstrap --variant=minbase --include=python3 stable "$ROOTFS.tmp" >"$DIR/debootstrap.log" 2>&1; then
    mv "$ROOTFS.tmp" "$ROOTFS"
  else
    echo "demo: no debootstrap rootfs (see $DIR/debootstrap.log); using the host's programs" >&2
    rm -rf "$ROOTFS.tmp"
    mkdir -p "$ROOTFS"/{etc,dev,proc,sys,tmp,home,root,usr/bin,usr/lib,usr/lib64}
    for l in bin:usr/bin sbin:usr/bin lib:usr/lib lib64:usr/lib64; do ln -s "${l#*:}" "$ROOTFS/${l%%:*}"; done
    cp /etc/os-release "$ROOTFS/etc/" 2>/dev/null || true
    touch "$ROOTFS/etc/passwd" "$ROOTFS/etc/group" "$ROOTFS/.host-made"
    for p in sh ls cat id env uname; do cp -L "$(command -v $p)" "$ROOTFS/usr/bin/"; done
    ldd "$ROOTFS"/usr/bin/* | grep -o '/[^ ]*' | sort -u | while read -r l; do
      rel=${l#/usr}; mkdir -p "$ROOTFS/usr$(dirname "$rel")"; cp -L "$l" "$ROOTFS/usr$rel"
    done
  fi
fi

target/release/cimg pack "$ROOTFS" "$DIR/img.cimg"
target/release/cimg info "$DIR/img.cimg"
target/release/launch "$DIR/img.cimg" -- sh -c 'echo "in the container: $(id)"; cat /etc/os-release 2>/dev/null | head -2; ls /'
if target/release/launch "$DIR/img.cimg" -- sh -c 'command -v python3 >/dev/null'; then
  target/release/launch "$DIR/img.cimg" -- python3 -c 'import json, email, http.client, sys; print("python", sys.version.split()[0], "imports fine")'
fi
