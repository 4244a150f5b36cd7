#!/usr/bin/env bash
# Install Debian's Chromium for the browser test (tests/test_browser.py drives it through Playwright
# from PyPI; Playwright's own browser download needs hosts this project cannot reach). Never fatal:
# without Chromium the browser test is skipped with a reason, except under CI (FEDLIB_CI=1), where
# it fails. Override the browser with FEDLIB_CHROMIUM=/path/to/chromium.
set -u
BROWSER=${FEDLIB_CHROMIUM:-/usr/bin/chromium}
if [ -x "$BROWSER" ]; then
  echo "chromium: found $BROWSER"; exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium: apt-get is not available here; the browser test will be skipped (install Chromium and set FEDLIB_CHROMIUM to it)"; exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "chromium: not root, cannot apt-get install; run 'sudo apt-get install chromium' or the browser test will be skipped"; exit 0
fi
echo "chromium: installing Debian's chromium with apt-get (about 300 MB, once)"
if ! (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)); then
  echo "chromium: apt-get install chromium failed; the browser test will be skipped"; exit 0
fi
if [ -x "$BROWSER" ]; then echo "chromium: installed $BROWSER"; else echo "chromium: apt-get installed chromium but $BROWSER is missing; set FEDLIB_CHROMIUM"; fi
