#!/bin/sh
# System packages the tests need, on Debian/Ubuntu: iproute2 (ip, tc) and nftables (nft) for
# the network-namespace tests (tests/test_netns.py); buildah and debootstrap to build and run
# the deploy image (tests/test_deploy_image.py). Installs only what is missing, and only
# as root with apt-get; otherwise says what it skipped (those tests then skip, naming it).
set -eu
PACKAGES="iproute2 nftables buildah debootstrap"

missing=""
for pkg in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $pkg"
done
if [ -z "$missing" ]; then
    echo "system-deps: already installed:$(printf ' %s' $PACKAGES)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: not root or no apt-get: skipped installing$missing (tests that need them skip)"
    exit 0
fi
echo "system-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086  # one word per package
apt-get install -y -qq --no-install-recommends $missing >/dev/null
