#!/bin/sh
# Runs inside the freshly bootstrapped `base` tree (chroot) to finish it.
set -eu
useradd --create-home --uid 1000 --user-group --shell /bin/bash user
echo 'user ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/user
chmod 0440 /etc/sudoers.d/user
echo wrenn > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 wrenn\n::1 localhost ip6-localhost ip6-loopback\n' > /etc/hosts
# Shrink the image: package lists and downloaded archives are not needed at run time.
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log
