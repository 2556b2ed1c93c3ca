#!/bin/sh
# /init of the pyvhost-user test guest (busybox sh, runs as PID 1).
#
# The host test chooses the work with kernel command-line words (no dots in
# names: "a.b=c" is a module parameter):
#   pvu_steps=queues,md5,write   steps to run, in this order (a step may repeat:
#                                queues md5 md5parts write writefail rebind
#                                seqwrite hold)
#   pvu_disk=vda                 disk the steps work on (default vda)
#   pvu_write_mib=8              offset in MiB of the 4 MiB "write"/"writefail" range
#   pvu_reboot=1                 "reboot -f" after the steps (else "poweroff -f")
#   pvu_quiet=0                  keep kernel messages on the console during steps
#   pvu_hog_kib=N                hold a random 0..N KiB of RAM (tmpfs) before the
#                                drivers load and at each "rebind", so that rings
#                                and buffers land on other pages than in the last
#                                boot or bind (vIOMMU tests: same IOVAs, new GPAs)
#   pvu_seq_count=N              "seqwrite": records to write (default 256)
#   pvu_seq_first=B              "seqwrite": 4 KiB block of record 0 (default 0)
#   pvu_seq_jobs=P               "seqwrite": parallel writers (default 1)
#   pvu_seq_load=1               "seqwrite": also keep O_DIRECT reads in flight
#                                (after the records) while the writers run
#   pvu_net_ip=10.0.0.1/24       "ping": the address of eth0 (the virtio-net NIC)
#   pvu_net_peer=10.0.0.2        "ping": the address to ping until it answers
#   pvu_net_tries=90             "ping": one-second attempts before giving up
#
# Steps that need no disk (ping, release) run without waiting for one.
#
# Everything the host parses is a marker line on the console (ttyS0):
#   PVU-BOOT                     start of every boot
#   PVU-RESULT name=value        one result
#   PVU-ERROR text               something went wrong (the step result says which)
#   PVU-DMESG text               kernel log tail, printed when a step failed
#   PVU-ACK i                    "seqwrite": record i is written (its dd returned)
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
HOG_KIB=0
SEQ_COUNT=256
SEQ_FIRST=0
SEQ_JOBS=1
SEQ_LOAD=0
NET_IP=""
NET_PEER=""
NET_TRIES=90
for word in $(cat /proc/cmdline); do
    case "$word" in
        pvu_steps=*) STEPS=$(echo "${word#pvu_steps=}" | tr ',' ' ') ;;
        pvu_disk=*) DISK=${word#pvu_disk=} ;;
        pvu_write_mib=*) WRITE_MIB=${word#pvu_write_mib=} ;;
        pvu_reboot=*) REBOOT=${word#pvu_reboot=} ;;
        pvu_quiet=*) QUIET=${word#pvu_quiet=} ;;
        pvu_hog_kib=*) HOG_KIB=${word#pvu_hog_kib=} ;;
        pvu_seq_count=*) SEQ_COUNT=${word#pvu_seq_count=} ;;
        pvu_seq_first=*) SEQ_FIRST=${word#pvu_seq_first=} ;;
        pvu_seq_jobs=*) SEQ_JOBS=${word#pvu_seq_jobs=} ;;
        pvu_seq_load=*) SEQ_LOAD=${word#pvu_seq_load=} ;;
        pvu_net_ip=*) NET_IP=${word#pvu_net_ip=} ;;
        pvu_net_peer=*) NET_PEER=${word#pvu_net_peer=} ;;
        pvu_net_tries=*) NET_TRIES=${word#pvu_net_tries=} ;;
    esac
done
DEV=/dev/$DISK

# Hold a random number of 4 KiB pages in a tmpfs file (never freed): later
# allocations (rings, DMA buffers) then come from other physical pages.
HOGS=0
hog_memory() {
    [ "$HOG_KIB" -gt 0 ] 2>/dev/null || return 0
    r=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
    pages=$(( r % (HOG_KIB / 4 + 1) ))
    HOGS=$((HOGS + 1))
    dd if=/dev/urandom of=/tmp/pvu-hog$HOGS bs=4096 count=$pages 2>/dev/null
    result hog_kib $((pages * 4))
}
hog_memory

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

# md5 of a range read with O_DIRECT: md5_range NAME SKIP_MIB [COUNT_MIB]
md5_range() {
    rm -f /tmp/dd.rc
    if [ -n "$3" ]; then count="count=$3"; else count=""; fi
    sum=$( { dd if="$DEV" bs=1M skip="$2" $count iflag=direct 2>/tmp/dd.err; \
             echo $? >/tmp/dd.rc; } | md5sum)
    if [ "$(cat /tmp/dd.rc)" != 0 ]; then
        error "$1: dd failed: $(cat /tmp/dd.err | tr '\n' ' ')"
        result "$1" failed
    else
        result "$1" "${sum%% *}"
    fi
}

# The disk in three parts around the 4 MiB write range: what a previous write
# (or boot) left there can be checked exactly.
step_md5parts() {
    md5_range md5_head 0 "$WRITE_MIB"
    md5_range md5_range "$WRITE_MIB" 4
    md5_range md5_tail $((WRITE_MIB + 4))
}

# Unbind the virtio-blk driver from the disk's virtio device and bind it again:
# the driver resets the device (status 0), frees its rings, then probes again
# with new rings. Memory is hogged in between (pvu_hog_kib).
step_rebind() {
    drv=/sys/bus/virtio/drivers/virtio_blk
    vdev=$(basename "$(readlink "/sys/block/$DISK/device")")
    case "$vdev" in
        virtio*) ;;
        *) error "rebind: no virtio device behind $DISK ($vdev)"; result rebind failed; return ;;
    esac
    result rebind_dev "$vdev"
    if ! echo "$vdev" > $drv/unbind; then
        error "rebind: unbind $vdev failed"; result rebind failed; return
    fi
    i=0
    while [ -e "/sys/block/$DISK" ]; do
        i=$((i + 1))
        if [ $i -gt 100 ]; then
            error "rebind: $DISK still there 10 s after unbind"; result rebind failed; return
        fi
        sleep 0.1
    done
    hog_memory
    if ! echo "$vdev" > $drv/bind; then
        error "rebind: bind $vdev failed"; result rebind failed; return
    fi
    if ! wait_disk; then
        error "rebind: no block device $DEV 20 s after bind"; result rebind failed; return
    fi
    result rebind ok
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

# ---- seqwrite: sequence-numbered records, verifiable from guest and host ------
# Record i is the 4 KiB block SEQ_FIRST + i: 256 lines of 16 bytes,
# "R%08d.L%03d.\n" (record number, line number), so every 512-byte sector
# names the record and the place it belongs to (the host side is
# pyvhost_user.launch.seqwrite). Writer j of SEQ_JOBS writes records j,
# j + SEQ_JOBS, ... one O_DIRECT dd each and prints "PVU-ACK i" once that dd
# returned. A dd blocks for as long as the back-end is away (QEMU reconnects);
# nothing here has a timeout. Then everything is read back and compared.
seq_template() {
    awk 'BEGIN { for (l = 0; l < 256; l++) printf "R########.L%03d.\n", l }' > /tmp/seqtpl
}

seq_writer() {
    i=$1
    while [ "$i" -lt "$SEQ_COUNT" ]; do
        n=$((100000000 + i))
        sed "s/########/${n#1}/" /tmp/seqtpl > /tmp/seqrec.$1
        if dd if=/tmp/seqrec.$1 of="$DEV" bs=4096 seek=$((SEQ_FIRST + i)) count=1 \
                oflag=direct conv=notrunc 2>/tmp/seqdd.$1; then
            echo "PVU-ACK $i"
        else
            echo "PVU-ERROR seqwrite: record $i: dd failed: $(tr '\n' ' ' </tmp/seqdd.$1)"
            echo "$i" >> /tmp/seqfail
        fi
        i=$((i + SEQ_JOBS))
    done
}

# O_DIRECT reads of 1 MiB after the records, again and again, until the
# writers are done: the queue is rarely empty when the back-end goes away.
seq_load() {
    skip=$(( (SEQ_FIRST + SEQ_COUNT + 15) / 16 ))     # in 64 KiB blocks
    while [ ! -e /tmp/seqdone ]; do
        if ! dd if="$DEV" of=/dev/null bs=64k skip=$skip count=16 iflag=direct \
                2>/tmp/seqload.err; then
            echo "PVU-ERROR seqwrite: load read failed: $(tr '\n' ' ' </tmp/seqload.err)"
            echo load >> /tmp/seqfail
            return
        fi
    done
}

step_seqwrite() {
    rm -f /tmp/seqfail /tmp/seqdone /tmp/seqback /tmp/seqwant
    seq_template
    load=""
    if [ "$SEQ_LOAD" = 1 ]; then
        seq_load &
        load=$!
    fi
    pids=""
    j=0
    while [ "$j" -lt "$SEQ_JOBS" ]; do
        seq_writer "$j" &
        pids="$pids $!"
        j=$((j + 1))
    done
    for p in $pids; do
        wait "$p"
    done
    touch /tmp/seqdone
    if [ -n "$load" ]; then
        wait "$load"
    fi
    if [ -e /tmp/seqfail ]; then
        error "seqwrite: failed: $(tr '\n' ' ' </tmp/seqfail)"
        result seqwrite failed
    else
        result seqwrite ok
    fi
    # Read back, in one O_DIRECT pass, and compare with what was written.
    if ! dd if="$DEV" of=/tmp/seqback bs=4096 skip="$SEQ_FIRST" count="$SEQ_COUNT" \
            iflag=direct 2>/tmp/dd.err; then
        error "seqwrite: read back failed: $(tr '\n' ' ' </tmp/dd.err)"
        result seqwrite_verify failed
        return
    fi
    size=$(wc -c </tmp/seqback)
    if [ "$size" != $((SEQ_COUNT * 4096)) ]; then
        error "seqwrite: read back $size bytes, not $((SEQ_COUNT * 4096))"
        result seqwrite_verify failed
        return
    fi
    sum=$(md5sum /tmp/seqback)
    result seqwrite_md5 "${sum%% *}"
    awk -v n="$SEQ_COUNT" 'BEGIN { for (i = 0; i < n; i++) for (l = 0; l < 256; l++)
        printf "R%08d.L%03d.\n", i, l }' > /tmp/seqwant
    # Bad blocks: how many, then up to 8 of them (record numbers).
    bad=$(cmp -l /tmp/seqwant /tmp/seqback 2>/dev/null | awk '
        { b = int(($1 - 1) / 4096); if (!(b in seen)) { seen[b] = 1; n++; if (n <= 8) l = l "," b } }
        END { printf "%d%s", n, l }')
    result seqwrite_bad "$bad"
    if [ "$bad" = 0 ]; then
        result seqwrite_verify ok
    else
        error "seqwrite: read back differs in blocks (count,first...) $bad"
        result seqwrite_verify failed
    fi
    rm -f /tmp/seqback /tmp/seqwant
}

# Wait for one line typed on the console by the host (Machine(serial_input=True)
# .send_serial): meanwhile the guest does no disk I/O, so the host can act on an
# idle device (restart its back-end, unplug it and plug it back). Then wait for
# the disk, which may have gone and come back.
step_hold() {
    result hold waiting
    if ! read -r line; then
        error "hold: console input closed"; result hold failed; return
    fi
    if ! wait_disk; then
        error "hold: no block device $DEV 20 s after the host let go"; result hold failed; return
    fi
    result hold released
}

# ---- network steps (no disk needed) --------------------------------------------
# Bring eth0 up with $NET_IP and ping $NET_PEER until it answers (the peer may
# boot later): "ping=ok" with the attempts it took, then three more echo
# requests whose replies are counted (ping_replies=3 when nothing was lost).
step_ping() {
    i=0
    while [ ! -e /sys/class/net/eth0 ]; do
        i=$((i + 1))
        if [ $i -gt 200 ]; then
            error "ping: no eth0 after 20 s"; result ping failed; return
        fi
        sleep 0.1
    done
    result net_mac "$(cat /sys/class/net/eth0/address)"
    ip addr add "$NET_IP" dev eth0 && ip link set eth0 up || {
        error "ping: cannot configure eth0 with $NET_IP"; result ping failed; return
    }
    n=0
    while [ $n -lt "$NET_TRIES" ]; do
        n=$((n + 1))
        if ping -c 1 -W 1 "$NET_PEER" >/dev/null 2>&1; then
            result ping_attempts "$n"
            replies=$(ping -c 3 -W 2 "$NET_PEER" 2>/dev/null | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
            result ping_replies "${replies:-0}"
            result ping ok
            return
        fi
    done
    error "ping: $NET_PEER did not answer in $NET_TRIES attempts"
    result ping failed
}

# Wait for one line on the console (Machine(serial_input=True).send_serial):
# the guest stays up, answering pings, until the host lets it go.
step_release() {
    result release waiting
    if ! read -r line; then
        error "release: console input closed"; result release failed; return
    fi
    result release released
}

NEEDS_DISK=0
for step in $STEPS; do
    case "$step" in ping|release) ;; *) NEEDS_DISK=1 ;; esac
done

if [ -n "$STEPS" ] && [ "$NEEDS_DISK" = 0 ]; then
    for step in $STEPS; do
        "step_$step"
    done
elif [ -n "$STEPS" ]; then
    if wait_disk; then
        for step in $STEPS; do
            case "$step" in
                queues|md5|md5parts|write|writefail|rebind|seqwrite|hold|ping|release) "step_$step" ;;
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
