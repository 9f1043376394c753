#!/bin/busybox sh
# /init of the emu tiny guest (packed by emu_tests/guest.py). It runs as PID 1 and must never
# exit: PID 1 exiting panics the kernel.

/bin/busybox --install -s /bin
export PATH=/bin HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts

note() {
    echo "emu-guest: $*"
}

# No modules.dep and no modprobe database: the builder wrote the names in dependency order.
load_modules() {
    for name in $(cat /lib/modules/load-order); do
        if [ -e "/lib/modules/$name.ko" ]; then
            insmod "/lib/modules/$name.ko" || note "insmod $name failed"
        else
            note "module $name skipped (built into the kernel or not shipped with it)"
        fi
    done
}

# $1: interface; NIC drivers may register it a little after insmod returns.
wait_for_interface() {
    tries=0
    while [ ! -e "/sys/class/net/$1" ] && [ "$tries" -lt 30 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    [ -e "/sys/class/net/$1" ]
}

# $1: interface, $2: comma-separated addresses in CIDR form.
configure_interface() {
    if ! wait_for_interface "$1"; then
        note "no interface $1, its addresses $2 were not set"
        return
    fi
    ip link set "$1" up
    for address in $(echo "$2" | tr , ' '); do
        ip addr add "$address" dev "$1" || note "could not add $address to $1"
    done
}

# Kernel parameters with a dot are left for modules, so they reach us only via /proc/cmdline.
configure_from_cmdline() {
    gateway=""
    set -f
    for word in $(cat /proc/cmdline); do
        case "$word" in
            emu.ip=*) configure_interface eth0 "${word#*=}" ;;
            emu.ip.*=*)
                spec="${word#emu.ip.}"
                configure_interface "${spec%%=*}" "${spec#*=}"
                ;;
            emu.gw=*) gateway="${word#*=}" ;;
            emu.hostname=*) hostname "${word#*=}" ;;
        esac
    done
    set +f
    if [ -n "$gateway" ]; then
        ip route add default via "$gateway" || note "could not add default route via $gateway"
    fi
}

# busybox acpid does not stay up without its config tree; reading one input event is enough,
# because the power button device only ever reports the power key.
watch_power_buttons() {
    for device in /sys/class/input/event*; do
        [ "$(cat "$device/device/name" 2>/dev/null)" = "Power Button" ] || continue
        (
            dd if="/dev/input/${device##*/}" of=/dev/null bs=24 count=1 2>/dev/null || exit
            note "power button pressed, powering off"
            sync
            poweroff -f
        ) &
    done
}

# Interactive shells read $ENV: plain poweroff/reboot signal init, which this init ignores;
# load_on_demand loads the modules not loaded at boot (CD-ROM, efivarfs), in their order.
write_shell_profile() {
    mkdir -p /etc /root
    cat >/etc/emu-shrc <<'EOF'
PS1='emu-guest# '
poweroff() { sync; busybox poweroff -f; }
reboot() { sync; busybox reboot -f; }
load_on_demand() {
    for name in $(cat /lib/modules/on-demand); do
        grep -q "^$name " /proc/modules || insmod "/lib/modules/$name.ko" 2>/dev/null \
            || echo "emu-guest: module $name not loaded (no such device here?)" >&2
    done
}
EOF
}

# A second serial port (an auxiliary console) gets a shell too; type 0 is no UART at all.
start_second_serial_shell() {
    type=$(cat /sys/class/tty/ttyS1/type 2>/dev/null)
    [ -n "$type" ] && [ "$type" != 0 ] || return 0
    (
        while :; do
            # A session leader opening the tty makes it its controlling terminal.
            setsid sh -c 'exec sh -i </dev/ttyS1 >/dev/ttyS1 2>&1' || sleep 1
        done
    ) &
}

ip link set lo up
load_modules
configure_from_cmdline
watch_power_buttons
write_shell_profile
export ENV=/etc/emu-shrc PS1='emu-guest# '
cd /root
start_second_serial_shell
echo EMU-GUEST-READY

# setsid gives the shell its own session so cttyhack can make the serial line its
# controlling tty (job control, ^C); respawn so PID 1 lives on when the shell exits.
while :; do
    setsid cttyhack sh
    note "shell exited, starting a new one"
done
