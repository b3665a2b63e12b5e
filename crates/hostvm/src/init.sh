#!/bin/busybox sh
# PID 1 of Wrenn's host VM (L1); see crates/hostvm/src/lib.rs for the design.
#
# 1. load the virtio-mmio and 9p modules, mount the per-run share (tag wrennrun) at /wrenn;
# 2. load kvm and kvm_amd, check /dev/kvm; with wrenn.ip= and wrenn.gw= on the kernel command
#    line (the host asked for a network), load virtio_net and bring up eth0 with that address
#    and a default route through that gateway (QEMU's user-mode networking: static, no DHCP),
#    and (once the host root is there, for nft) reject forwarding to the gateway;
# 3. mount the host's root read-only at /mnt/host with /dev, /proc, /sys, a fresh /run, the
#    a fresh tmpfs /tmp and the writable shares (listed in /wrenn/spec.sh) at their host paths;
# 4. start a heartbeat (/wrenn/alive gets the uptime every few seconds, so the host can tell a
#    frozen VM from a quiet command); create /wrenn/ready, run the command of /wrenn/spec.sh chrooted there with stdout and stderr
#    going to /wrenn/stdout and /wrenn/stderr, write its exit status to /wrenn/exit;
# 5. reset the VM (QEMU runs with -no-reboot, so it exits).
# Progress and failures go to the console (the host's console.log); a failure once /wrenn is
# mounted is also written to /wrenn/error, which the host reports.

/bin/busybox mkdir -p /bin /dev /proc /sys /run /wrenn /mnt/host
/bin/busybox --install -s /bin
export PATH=/bin

say() { echo "wrenn-init: $*" >/dev/console; }

finish() {
    sync
    reboot -f
    sleep 10
}

fail() {
    say "error: $*"
    if grep -q ' /wrenn ' /proc/mounts; then
        { echo "$*"; echo "--- last kernel messages:"; dmesg | tail -n 12; } >/wrenn/error.new
        mv /wrenn/error.new /wrenn/error
    fi
    finish
}

# load GROUP [HINT]: insmod /lib/modules/GROUP/*.ko, whose names start with their load position.
load() {
    for m in /lib/modules/"$1"/*.ko; do
        [ -e "$m" ] || continue
        out=$(insmod "$m" 2>&1) || fail "${2:+$2: }insmod $m failed: $out"
    done
}

mount -t devtmpfs devtmpfs /dev || say "cannot mount devtmpfs"
mount -t proc proc /proc || say "cannot mount proc"
mount -t sysfs sysfs /sys || say "cannot mount sysfs"
# Loopback: commands serve and connect on 127.0.0.1 (the agent, envd, tests).
ip link set lo up || say "cannot bring up lo"

opts=trans=virtio,version=9p2000.L,msize=512000
load fs
mount -t 9p -o "$opts" wrennrun /wrenn || fail "cannot mount the per-run share"

load kvm "no /dev/kvm: kvm_amd needs AMD SVM with nested paging in the VM's CPU model (QEMU -cpu)"
[ -c /dev/kvm ] || fail "/dev/kvm is missing after loading kvm and kvm_amd"

net_ip= net_gw=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    wrenn.ip=*) net_ip=${arg#wrenn.ip=} ;;
    wrenn.gw=*) net_gw=${arg#wrenn.gw=} ;;
    esac
done
if [ -n "$net_ip" ]; then
    load net "the host VM's network"
    [ -d /sys/class/net/eth0 ] || fail "no eth0 after loading virtio_net (is QEMU's virtio-net-device there?)"
    ip addr add "$net_ip" dev eth0 || fail "cannot give eth0 the address $net_ip"
    ip link set eth0 up || fail "cannot bring up eth0"
    ip route add default via "$net_gw" dev eth0 || fail "cannot add the default route via $net_gw"
fi

mount -t 9p -o "$opts,ro,cache=loose" hostroot /mnt/host || fail "cannot mount the host root"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o ptmxmode=0666 devpts /dev/pts || fail "cannot mount devpts"
mount -t tmpfs -o mode=1777 tmpfs /dev/shm || fail "cannot mount /dev/shm"
mount -o rbind /dev /mnt/host/dev || fail "cannot bind /dev"
mount -t proc proc /mnt/host/proc || fail "cannot mount /proc"
mount -t sysfs sysfs /mnt/host/sys || fail "cannot mount /sys"
mount -t tmpfs -o mode=755 tmpfs /mnt/host/run || fail "cannot mount /run"
# The host's own /tmp stays reachable here, for keep() below.
mkdir -p /hosttmp
mount -o bind /mnt/host/tmp /hosttmp || fail "cannot bind the host's /tmp aside"
# A tmpfs, not a directory of the 9p share: 9p cannot hold unix sockets (bind fails with
# ENXIO), and VMM tests and the agent keep their sockets under /tmp.
mount -t tmpfs -o mode=1777 tmpfs /mnt/host/tmp || fail "cannot mount /tmp"

# With a network: what the host VM forwards (the agent's sandboxes, behind their slots) must not
# reach the host's loopback, which slirp maps to the gateway: services there (the control
# plane, PostgreSQL) trust it. The host VM's own processes (OUTPUT, not FORWARD) still do.
if [ -n "$net_ip" ]; then
    printf '%s\n' "table ip wrenn_hostvm {" "  chain forward {" \
        "    type filter hook forward priority filter; policy accept;" \
        "    ip daddr $net_gw reject with icmp type admin-prohibited" "  }" "}" |
        chroot /mnt/host /usr/sbin/nft -f - || fail "cannot keep forwarded traffic off the host's loopback (nft, Debian package nftables)"
fi

# Called by spec.sh for each writable share, parents before children.
share() {
    mkdir -p "/mnt/host$2" 2>/dev/null
    mount -t 9p -o "$opts,cache=mmap" "$1" "/mnt/host$2" || fail "cannot mount writable share $2"
}

# Called by spec.sh for a host path under /tmp that the command needs but the per-run /tmp
# hides (its cwd, its program): bind the host's original there, read-only.
keep() {
    rest=${1#/tmp/}
    if [ -d "/hosttmp/$rest" ]; then
        mkdir -p "/mnt/host$1"
    else
        mkdir -p "$(dirname "/mnt/host$1")" && : >"/mnt/host$1"
    fi
    mount -o bind,ro "/hosttmp/$rest" "/mnt/host$1" || fail "cannot keep $1 visible"
}

# Sets WRENN_CWD, mounts the shares, keeps paths under /tmp visible, and sets "$@" to NAME=VALUE... ARGV...
[ -r /wrenn/spec.sh ] || fail "/wrenn/spec.sh is missing"
. /wrenn/spec.sh

# Busybox's sleep and echo: the heartbeat needs nothing from the host's root.
( while :; do echo "$(cat /proc/uptime)" >/wrenn/alive; sleep 3; done ) </dev/null >/dev/null 2>&1 &
: >/wrenn/ready
# In a subshell, so that the redirections are the command's only: a simple command's are also
# active in ash itself, which would then write "Killed" to the command's stderr.
(exec chroot /mnt/host /usr/bin/env -i -C "$WRENN_CWD" -- "$@") </dev/null >/wrenn/stdout 2>/wrenn/stderr
code=$?
echo "$code" >/wrenn/exit.new && mv /wrenn/exit.new /wrenn/exit || say "cannot record the exit status $code"
finish
