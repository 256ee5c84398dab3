#!/usr/bin/env bash
# Installs the Debian packages hxb and its tests need, only those missing.
# Idempotent; uses sudo when not root. Usage: scripts/install-system-deps.sh [--test]
set -euo pipefail

# The linux sandbox: namespaces and NAT (iproute2, nftables, util-linux), the disk-backed
# /tmp volumes (e2fsprogs, mount), the seccomp filter (libseccomp2).
packages=(python3 python3-venv python3-dev gcc make zip unzip procps
          iproute2 nftables util-linux mount e2fsprogs libseccomp2)
if [[ "${1:-}" == "--test" ]]; then
    packages+=(wrk bubblewrap)
    # The PostgreSQL store is tested against a real server the tests start; any initdb will do.
    if ! compgen -G "/usr/local/bin/initdb" >/dev/null && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
        packages+=(postgresql)
    fi
fi

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "hxb: missing packages (${missing[*]}) and no apt-get here: install them by hand" >&2
    exit 1
fi
sudo_cmd=()
[[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
echo "hxb: installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
