#!/bin/sh
# Install Debian packages the project drives but does not ship — chromium for the browser tests,
# wrk for the benchmarks' load generator — once: a package whose command is on PATH is skipped.
# Usage: scripts/apt-install.sh PACKAGE...   (each package's command has the package's name)
set -eu
missing=""
for package in "$@"; do
    command -v "$package" >/dev/null 2>&1 || missing="$missing $package"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install Debian's$missing (apt-get install$missing) first" >&2; exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086
$SUDO apt-get install -y -q $missing >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $missing >/dev/null; }
