#!/bin/sh
# /init of the pyvhost-user test guest (busybox sh, runs as PID 1).
#
# The host test chooses the work with kernel command-line words (no dots in
# names: "a.b=c" is a module parameter):
#   pvu_steps=queues,md5,write   steps to run, in this order
#   pvu_disk=vda                 disk the steps work on (default vda)
#   pvu_write_mib=8              offset in MiB of the 4 MiB "write"/"writefail" range
#   pvu_reboot=1                 "reboot -f" after the steps (else "poweroff -f")
#   pvu_quiet=0                  keep kernel messages on the console during steps
#
# Everything the host parses is a marker line on the console (ttyS0):
#   PVU-BOOT                     start of every boot
#   PVU-RESULT name=value        one result
#   PVU-ERROR text               something went wrong (the step result says which)
#   PVU-DMESG text               kernel log tail, printed when a step failed
#   PVU-DONE                     all steps finished (then poweroff or reboot)

export PATH=/bin:/sbin:/usr/bin:/usr/sbin

/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s 2>/dev/null

# The console is /dev/console (ttyS0 via console=ttyS0).
exec </dev/console >/dev/console 2>&1

echo "PVU-BOOT"

result() { echo "PVU-RESULT $1=$2"; }
error() { echo "PVU-ERROR $*"; FAILED=1; }
FAILED=0

# ---- kernel command line ----------------------------------------------------
STEPS=""
DISK=vda
WRITE_MIB=8
REBOOT=0
QUIET=1
for word in $(cat /proc/cmdline); do
    case "$word" in
        pvu_steps=*) STEPS=$(echo "${word#pvu_steps=}" | tr ',' ' ') ;;
        pvu_disk=*) DISK=${word#pvu_disk=} ;;
        pvu_write_mib=*) WRITE_MIB=${word#pvu_write_mib=} ;;
        pvu_reboot=*) REBOOT=${word#pvu_reboot=} ;;
        pvu_quiet=*) QUIET=${word#pvu_quiet=} ;;
    esac
done
DEV=/dev/$DISK

# ---- modules (order matters: dependencies first) ----------------------------
for mod in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev \
           virtio_pci virtio_blk failover net_failover virtio_net; do
    if [ -d "/sys/module/$mod" ]; then
        continue            # built in, or already loaded
    fi
    modprobe "$mod" 2>/tmp/modprobe.err || {
        error "modprobe $mod: $(cat /tmp/modprobe.err)"
    }
done

# ---- wait for the disk --------------------------------------------------------
wait_disk() {
    i=0
    while [ ! -b "$DEV" ] || [ ! -e "/sys/block/$DISK/size" ]; do
        i=$((i + 1))
        if [ $i -gt 200 ]; then     # 20 s
            return 1
        fi
        sleep 0.1
    done
    return 0
}

if [ "$QUIET" = 1 ]; then
    # Keep kernel messages from cutting our marker lines in the middle.
    dmesg -n 1
fi

# ---- steps -------------------------------------------------------------------
step_queues() {
    n=$(ls "/sys/block/$DISK/mq" | wc -l)
    result queues "$n"
}

step_md5() {
    sectors=$(cat "/sys/block/$DISK/size")
    result size $((sectors * 512))
    rm -f /tmp/dd.rc
    sum=$( { dd if="$DEV" bs=1M iflag=direct 2>/tmp/dd.err; echo $? >/tmp/dd.rc; } | md5sum)
    if [ "$(cat /tmp/dd.rc)" != 0 ]; then
        error "md5: dd failed: $(cat /tmp/dd.err | tr '\n' ' ')"
        result md5 failed
        return
    fi
    result md5 "${sum%% *}"
}

# Write 4 MiB of random data at $WRITE_MIB MiB with O_DIRECT; print "ok" or $1.
write_range() {
    dd if=/dev/urandom of=/tmp/wdata bs=1M count=4 2>/dev/null
    if dd if=/tmp/wdata of="$DEV" bs=1M seek="$WRITE_MIB" count=4 oflag=direct \
            2>/tmp/dd.err && sync; then
        echo ok
    else
        echo "$1"
    fi
}

step_write() {
    status=$(write_range failed)
    sum=$(md5sum /tmp/wdata)
    result write_md5 "${sum%% *}"
    result write "$status"
    if [ "$status" != ok ]; then
        error "write: dd failed: $(cat /tmp/dd.err | tr '\n' ' ')"
    fi
    rm -f /tmp/dd.rc
    sum=$( { dd if="$DEV" bs=1M skip="$WRITE_MIB" count=4 iflag=direct 2>/tmp/dd.err; \
             echo $? >/tmp/dd.rc; } | md5sum)
    if [ "$(cat /tmp/dd.rc)" != 0 ]; then
        error "readback: dd failed: $(cat /tmp/dd.err | tr '\n' ' ')"
        result readback_md5 failed
    else
        result readback_md5 "${sum%% *}"
    fi
    rm -f /tmp/wdata
}

step_writefail() {
    status=$(write_range refused)
    result write "$status"
    rm -f /tmp/wdata
}

if [ -n "$STEPS" ]; then
    if wait_disk; then
        for step in $STEPS; do
            case "$step" in
                queues|md5|write|writefail) "step_$step" ;;
                *) error "unknown step $step" ;;
            esac
        done
    else
        error "no block device $DEV after 20 s"
        result disk missing
    fi
fi

if [ "$FAILED" != 0 ]; then
    dmesg | tail -n 40 | sed 's/^/PVU-DMESG /'
fi
echo "PVU-DONE"

if [ "$REBOOT" = 1 ]; then
    reboot -f
else
    poweroff -f
fi
# Should poweroff fail, do not let PID 1 exit (that panics): wait.
while true; do sleep 1; done
