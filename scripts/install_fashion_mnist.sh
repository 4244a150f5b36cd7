#!/usr/bin/env bash
# Install Debian's dataset-fashion-mnist (the full Fashion-MNIST idx files, no network beyond the
# package registry) where apt is available and we are root. Never fatal: without it the
# Fashion-MNIST parts are skipped with a reason and everything on digits still runs.
set -u
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  echo "fashion-mnist: found in $DIR"; exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "fashion-mnist: apt-get is not available here; Fashion-MNIST parts will be skipped (set FEDLIB_DATA to a folder with the idx files instead)"; exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "fashion-mnist: not root, cannot apt-get install; run 'sudo apt-get install dataset-fashion-mnist' or set FEDLIB_DATA"; exit 0
fi
if ! (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)); then
  echo "fashion-mnist: apt-get install dataset-fashion-mnist failed; Fashion-MNIST parts will be skipped"; exit 0
fi
echo "fashion-mnist: installed into $DIR"
