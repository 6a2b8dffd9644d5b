#!/usr/bin/env bash
# Install Debian's Chromium (headless, for the report tests), if missing.
#
# Idempotent: does nothing when /usr/bin/chromium exists. Needs root when it has to install.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "install_chromium.sh: chromium already installed ($(dpkg-query -W -f='${Version}' chromium 2>/dev/null || echo 'version unknown'))"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_chromium.sh: /usr/bin/chromium is missing; need root to apt-get install it" >&2
    exit 1
fi
echo "install_chromium.sh: installing chromium"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "install_chromium.sh: done ($(dpkg-query -W -f='${Version}' chromium))"
