#!/bin/sh
# Make sure Debian's Chromium and chromedriver are installed for the playground's browser test
# (tests/server/test_playground_browser.py, Selenium). Idempotent: does nothing when both exist.
# Without root or apt-get it only says why and continues; the browser test then skips.
set -u
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${CHROMEDRIVER:-/usr/bin/chromedriver}
if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-browser: $CHROMIUM or $CHROMEDRIVER is missing and apt-get is not available;" \
         "install Chromium and chromedriver yourself (the browser test will be skipped)" >&2
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "ensure-browser: $CHROMIUM or $CHROMEDRIVER is missing and this is not root;" \
         "run 'apt-get install -y chromium chromium-driver' as root" \
         "(the browser test will be skipped)" >&2
    exit 0
fi
echo "ensure-browser: installing Debian's chromium and chromium-driver (apt-get)..." >&2
if ! apt-get update -qq \
   || ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
        >/dev/null; then
    echo "ensure-browser: apt-get could not install chromium (offline?);" \
         "the browser test will be skipped" >&2
    exit 0
fi
echo "ensure-browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium installed)" >&2
