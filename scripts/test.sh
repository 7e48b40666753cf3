#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine with Python 3.11
# (Debian packages, Python extras), then runs the whole test suite.
# The test fixtures start every service themselves (strata, redis-server, the
# Kafka-protocol broker, an S3-protocol server, headless Chromium); strace
# injects a kill -9 at an exact syscall in the loader's crash tests.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
need=""
command -v redis-server >/dev/null 2>&1 || need="$need redis-server"
[ -x /usr/bin/chromium ] || need="$need chromium"
command -v wrk >/dev/null 2>&1 || need="$need wrk"
command -v strace >/dev/null 2>&1 || need="$need strace"
if [ -n "$need" ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'

python3 -m pytest -q -p no:cacheprovider "$@"
