#!/usr/bin/env bash
# Installs the given Debian/Ubuntu packages that are not installed yet (apt-get), and nothing
# else. Quick and harmless to run again. KVTIER_NO_APT=1 skips it (dependencies come from
# elsewhere), as does a system without dpkg.
#   tools/apt_deps.sh PACKAGE...
set -euo pipefail
[ "${KVTIER_NO_APT:-0}" = "1" ] && exit 0
command -v dpkg-query >/dev/null || exit 0
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
echo "[kvtier setup] installing: ${missing[*]}"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
