#!/usr/bin/env bash
# Installs what tests/test_server_browser.py needs: Debian's chromium (driven by the playwright
# Python package, which comes with the `serve` extra; never `playwright install`, whose browser
# downloads are not Debian's). Idempotent and quiet; .ci/run calls it before the test command.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "browser-deps: no apt-get here; install chromium yourself (the browser test skips without it)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "browser-deps: not root and no sudo; the browser test will skip" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null &&
       $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
         chromium >/dev/null 2>&1; } || ! command -v chromium >/dev/null 2>&1; then
  echo "browser-deps: could not install Debian's chromium; the browser test will skip" >&2
fi
exit 0
