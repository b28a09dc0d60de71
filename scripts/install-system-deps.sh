#!/usr/bin/env bash
# Debian packages the test suite needs: OpenStack Swift (a real S3-compatible object store on
# 127.0.0.1, through its s3api middleware) and Chromium for the playground browser test.
# Idempotent: installs only what is missing. Needs root (or sudo) and Debian's package lists.
set -euo pipefail
packages=(swift-proxy swift-object swift-container swift-account chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
