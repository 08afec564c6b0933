#!/bin/sh
# Headless Chromium + chromedriver for tests/test_report.py (the report page in a real browser).
# Debian packages of the same version, so no driver download at test time; no-op when present.
set -eu
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
