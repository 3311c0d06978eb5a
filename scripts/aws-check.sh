#!/usr/bin/env bash
# The check of Attaché on real EC2: two instances share one io2 multi-attach
# volume; one serves it, the other takes it over when the first is stopped
# dead (SIGSTOP, as a hung machine), and the volume itself then refuses the
# deposed primary's writes (its NVMe reservation was preempted). What moto
# and the loop-device test cannot show. See the README, "Running on AWS".
#
# Needs, on both instances (same availability zone; Nitro, so EBS volumes
# are NVMe devices): root, nvme-cli, the `attache` binary on PATH (or
# ATTACHE=/path/to/attache), credentials with the IAM permissions in the
# README (an instance role), and one `attache meta` both reach. USE A
# SCRATCH VOLUME: `start --format` formats it if blank, and `fence` writes
# one block back onto it as it read it.
#
#   A$ scripts/aws-check.sh preflight VOLUME
#   A$ scripts/aws-check.sh start VOLUME grpc://META:7300 --format   # A becomes primary
#   B$ scripts/aws-check.sh start VOLUME grpc://META:7300            # B is backup
#   A$ scripts/aws-check.sh write VOLUME                             # 100 acknowledged writes
#   A$ scripts/aws-check.sh fence VOLUME B_ADDR                      # stop A, B takes over, A's write refused
#   B$ scripts/aws-check.sh verify VOLUME SHARD                      # all 100 writes read back on B
#   A$ scripts/aws-check.sh stop; B$ scripts/aws-check.sh stop
#
# Each step prints PASS or FAIL lines and exits non-zero on a failure.
# State (log, pid, shard id) is kept in $ATTACHE_CHECK_DIR (/var/tmp/attache-check).
set -euo pipefail

attache="${ATTACHE:-attache}"
state="${ATTACHE_CHECK_DIR:-/var/tmp/attache-check}"
port="${ATTACHE_CHECK_PORT:-7400}"
root=/mnt/attache-check
mkdir -p "$state"

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "PASS: $*"; }
usage() { sed -n '/^#   A\$/,/^# Each/p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

# The NVMe device the kernel names for EBS volume $1.
device_of() {
    local link="/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${1//-/}"
    [ -e "$link" ] || fail "no device $link: is $1 attached to this instance? (attache volume attach $1)"
    readlink -f "$link"
}

resv_report() {
    echo "--- nvme resv-report $1"
    nvme resv-report "$1" --eds 2>/dev/null || nvme resv-report "$1"
}

my_addr() { echo "$(hostname -I | awk '{print $1}'):$port"; }

# The address `attache client status` gives as volume $1's primary ("down" when none).
primary_of() {
    "$attache" client --addr "$2" --retry-secs 5 status 2>/dev/null \
        | awk -v v="$1" '$1 == v { gsub(/[()]/, "", $5); print $5 }'
}

cmd="${1:-}"
[ -n "$cmd" ] || usage
shift
case "$cmd" in
preflight)
    volume="${1:?volume id}"
    [ "$(id -u)" = 0 ] || fail "run as root (block volumes are mounted)"
    command -v nvme >/dev/null || fail "nvme-cli is missing (apt-get install nvme-cli / dnf install nvme-cli)"
    command -v "$attache" >/dev/null || fail "no attache binary (put it on PATH or set ATTACHE)"
    "$attache" volume describe "$volume" | tee "$state/describe.txt"
    grep -q "usable by attache node" "$state/describe.txt" || fail "$volume cannot serve here (see above)"
    pass "$volume is io2 with multi-attach in this instance's zone"
    ;;
start)
    volume="${1:?volume id}" metadata="${2:?metadata address, e.g. grpc://10.0.0.5:7300}"
    format=()
    if [ "${3:-}" = --format ]; then format=(--format-new-volumes); fi
    mkdir -p "$root"
    nohup "$attache" node --volume-mode aws --volumes "$volume" --volume-root "$root" \
        --metadata "$metadata" --data-dir "$state/node" --listen "0.0.0.0:$port" --advertise "$(my_addr)" \
        "${format[@]}" >"$state/node.log" 2>&1 &
    echo $! >"$state/node.pid"
    for _ in $(seq 1 180); do
        if grep -q "serving gRPC" "$state/node.log"; then break; fi
        kill -0 "$(cat "$state/node.pid")" 2>/dev/null || { cat "$state/node.log"; fail "attache node exited"; }
        sleep 1
    done
    grep -q "serving gRPC" "$state/node.log" || fail "attache node not serving after 180 s ($state/node.log)"
    pass "attache node serving at $(my_addr) (log: $state/node.log)"
    "$attache" volume describe "$volume" | head -2
    resv_report "$(device_of "$volume")"
    echo "status: $(primary_of "$volume" "$(my_addr)") is primary for $volume"
    ;;
write)
    volume="${1:?volume id}"
    [ "$(primary_of "$volume" "$(my_addr)")" = "$(my_addr)" ] || fail "this node is not $volume's primary"
    shard=$("$attache" client --addr "$(my_addr)" new-shard --client-id aws-check | awk '{print $2}')
    echo "$shard" >"$state/shard"
    for i in $(seq 1 100); do
        "$attache" client --addr "$(my_addr)" put --shard "$shard" --client-id aws-check "key-$i" "value-$i" >/dev/null
    done
    pass "100 writes acknowledged in shard $shard (on $volume)"
    ;;
fence)
    volume="${1:?volume id}" other="${2:?the other node address, host:7400}"
    dev=$(device_of "$volume")
    [ "$(primary_of "$volume" "$(my_addr)")" = "$(my_addr)" ] || fail "this node is not $volume's primary"
    kill -STOP "$(cat "$state/node.pid")"
    echo "node stopped (SIGSTOP); waiting for $other to take $volume over"
    for _ in $(seq 1 60); do
        if [ "$(primary_of "$volume" "$other")" = "$other" ]; then break; fi
        sleep 1
    done
    [ "$(primary_of "$volume" "$other")" = "$other" ] || fail "$other did not take $volume over in 60 s"
    pass "$other took $volume over"
    resv_report "$dev"
    # One block written back as read (the last LBA: no data changes if the
    # device took it). The reservation must refuse it: EIO.
    bs=$(blockdev --getss "$dev")
    last=$(( $(blockdev --getsize64 "$dev") / bs - 1 ))
    dd if="$dev" of="$state/block" bs="$bs" skip="$last" count=1 iflag=direct status=none
    if dd if="$state/block" of="$dev" bs="$bs" seek="$last" count=1 oflag=direct conv=notrunc status=none 2>"$state/dd.err"; then
        kill -CONT "$(cat "$state/node.pid")"
        fail "the device took a write from the deposed primary: the reservation does not fence it"
    fi
    pass "the device refused the deposed primary's write: $(cat "$state/dd.err")"
    kill -CONT "$(cat "$state/node.pid")"
    sleep 5
    echo "--- the resumed node's log since (it must step down, acknowledging nothing):"
    tail -n 20 "$state/node.log"
    ;;
verify)
    volume="${1:?volume id}"
    shard="${2:-$(cat "$state/shard" 2>/dev/null || true)}"
    [ -n "$shard" ] || fail "give the shard id that write printed"
    for i in $(seq 1 100); do
        got=$("$attache" client --addr "$(my_addr)" get --shard "$shard" --client-id aws-check "key-$i")
        [ "$got" = "value-$i" ] || fail "key-$i reads back as '$got'"
    done
    pass "all 100 acknowledged writes read back on $(my_addr), $volume's primary now"
    ;;
stop)
    pid=$(cat "$state/node.pid" 2>/dev/null || true)
    [ -n "$pid" ] || fail "no node started here"
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    pass "node stopped (the volume stays attached: attache volume detach VOLUME detaches it)"
    ;;
*) usage ;;
esac
