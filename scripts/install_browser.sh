#!/usr/bin/env bash
# Install Debian's Chromium for the browser test (tests/test_browser.py drives it through Playwright
# from PyPI; Playwright's own browser download needs hosts this project cannot reach). Never fatal:
# without Chromium the browser test is skipped with a reason, except under CI (FEDLIB_CI=1), where
# it fails. Another Chromium: FEDLIB_CHROMIUM=/path/to/chromium (then nothing is installed).
if [ -n "${FEDLIB_CHROMIUM:-}" ]; then
  if [ -x "$FEDLIB_CHROMIUM" ]; then echo "chromium: found $FEDLIB_CHROMIUM"; else echo "chromium: FEDLIB_CHROMIUM=$FEDLIB_CHROMIUM is not an executable; the browser test will be skipped"; fi
  exit 0
fi
exec bash "$(dirname "$0")/apt_install.sh" chromium chromium /usr/bin/chromium \
  "the browser test will be skipped (install Chromium and set FEDLIB_CHROMIUM to it)"
