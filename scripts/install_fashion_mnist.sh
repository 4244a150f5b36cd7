#!/usr/bin/env bash
# Install Debian's dataset-fashion-mnist (the full Fashion-MNIST idx files, no network beyond the
# package registry) where apt is available and we are root. Never fatal: without it the
# Fashion-MNIST parts are skipped with a reason and everything on digits still runs.
exec bash "$(dirname "$0")/apt_install.sh" fashion-mnist dataset-fashion-mnist \
  /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
  "Fashion-MNIST parts will be skipped (or set FEDLIB_DATA to a folder with the idx files)"
