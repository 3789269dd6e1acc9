#!/usr/bin/env bash
# napari needs an X server even in tests: install Xvfb and the XCB libraries Qt 6 needs, if missing.
set -euo pipefail
need=()
command -v Xvfb >/dev/null 2>&1 || need+=(xvfb xauth)
ldconfig -p 2>/dev/null | grep -q libxcb-icccm.so.4 || need+=(libxcb-icccm4)
ldconfig -p 2>/dev/null | grep -q libxcb-keysyms.so.1 || need+=(libxcb-keysyms1)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[xvfb] installing ${need[*]}"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "[xvfb] missing system packages: ${need[*]} (install them with your package manager)" >&2
        exit 1
    fi
fi
