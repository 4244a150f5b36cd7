#!/usr/bin/env bash
# apt_install.sh LABEL PACKAGE PROOF WITHOUT
# Install Debian's PACKAGE with apt-get unless PROOF (a file it installs) is already there. Never fatal:
# always exits 0 and says plainly what it did, or why it could not and what happens WITHOUT it.
set -u
label=$1 package=$2 proof=$3 without=$4
if [ -e "$proof" ]; then
  echo "$label: found $proof"; exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "$label: apt-get is not available here; $without"; exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "$label: not root, cannot apt-get install (run 'sudo apt-get install $package'); $without"; exit 0
fi
if ! (apt-get install -y -qq "$package" >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$package" >/dev/null 2>&1)); then
  echo "$label: apt-get install $package failed; $without"; exit 0
fi
if [ -e "$proof" ]; then echo "$label: installed $proof"; else echo "$label: installed $package, but $proof is missing; $without"; fi
