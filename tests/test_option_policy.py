"""A node's ``options`` cannot reach the host, whatever syntax QEMU would accept them in.

The catalog below (this test's own, not emu's) lists options that open a host file, a host
device or a socket. Hypothesis spells each one in every syntax QEMU 7.2 reads — ``key=value``
lists with an implied first key, ``driver=`` spelled out, ``no``-prefixed and bare booleans,
JSON objects (compact, spaced, reordered, with ``\\u`` escapes), ``-global`` in both forms,
``--double-dash`` names, placeholders carrying the text in the node's name — among safe
options, and checks that the node is refused with ``$.options`` named, while the same text
reaches QEMU's argv unchanged when the host allows unsafe options. The attacks of the issue
are also replayed against the real QEMU.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emucore.errors import ConfigError
from tests.conftest import QemuLab, run

pytestmark = pytest.mark.usefixtures("kvm_off")

HOST_FILE = "/etc/shadow"

# (driver, properties): devices that load host files, pass host devices through, or open
# the host's sound system.
DANGEROUS_DEVICES: list[tuple[str, dict[str, str]]] = [
    ("loader", {"file": HOST_FILE, "addr": "201326592"}),
    ("guest-loader", {"kernel": HOST_FILE, "addr": "0x1000"}),
    ("usb-host", {"hostbus": "1", "hostaddr": "2"}),
    ("u2f-passthru", {"hidraw": "/dev/hidraw0"}),
    ("usb-mtp", {"rootdir": "/etc", "readonly": "on"}),
    ("vfio-pci", {"host": "0000:00:01.0"}),
    ("vhost-vsock-pci", {"guest-cid": "3"}),
    ("vhost-user-blk-pci", {"chardev": "c0"}),
    ("virtio-input-host-pci", {"evdev": "/dev/input/event0"}),
    ("ccid-card-emulated", {"backend": "nss-emulated", "db": "/etc/pki"}),
    ("virtio-9p-pci", {"fsdev": "f0", "mount_tag": "host"}),
    ("ivshmem-plain", {"memdev": "m0"}),
    ("AC97", {}),
    ("intel-hda", {}),
    ("e1000", {"romfile": HOST_FILE}),
    ("virtio-net-pci", {"romfile": HOST_FILE, "mac": "02:00:00:00:00:01"}),
    ("pcnet", {"romfile": HOST_FILE}),
]

# (driver, property): defaults that make every such device read a host file.
DANGEROUS_GLOBALS = [("e1000", "romfile"), ("virtio-net-pci", "romfile"), ("loader", "file")]

# (option, implied key, items): option strings with a key that names a host file.
DANGEROUS_KEYS: list[tuple[str, str, dict[str, str]]] = [
    ("-machine", "type", {"type": "q35", "kernel": HOST_FILE}),
    ("-M", "type", {"type": "pc", "dumpdtb": "/tmp/out"}),
    ("-machine", "type", {"type": "q35", "firmware": HOST_FILE}),
    ("-boot", "order", {"order": "c", "splash": HOST_FILE}),
    ("-smbios", "type", {"file": HOST_FILE}),
    ("-fw_cfg", "name", {"name": "opt/x", "file": HOST_FILE}),
    ("-icount", "shift", {"shift": "1", "rr": "record", "rrfile": "/tmp/rr"}),
]

# Whole options (and their values) that open files, devices or sockets, or edit others.
DANGEROUS_WORDS: list[list[str]] = [
    ["-drive", f"file={HOST_FILE},format=raw"],
    ["-blockdev", json.dumps({"driver": "file", "filename": HOST_FILE, "node-name": "x"})],
    ["-hda", HOST_FILE],
    ["-cdrom", HOST_FILE],
    ["-chardev", "socket,id=c9,host=0.0.0.0,port=4444,server=on,wait=off"],
    ["-serial", "tcp::4444,server=on"],
    ["-monitor", "tcp::4445,server=on,wait=off"],
    ["-qmp", "tcp::4446,server=on,wait=off"],
    ["-netdev", "user,id=n9,smb=/etc"],
    ["-nic", "user,hostfwd=tcp::2222-:22"],
    ["-object", f"memory-backend-file,id=m9,size=1M,mem-path={HOST_FILE}"],
    ["-object", json.dumps({"qom-type": "filter-dump", "id": "d", "netdev": "n", "file": "x"})],
    ["-readconfig", HOST_FILE],
    ["-set", f"device.adapter0.romfile={HOST_FILE}"],
    ["-add-fd", "fd=3,set=1"],
    ["-incoming", "tcp:0:4447"],
    ["-D", "/tmp/qemu-debug.log"],
    ["-pidfile", "/tmp/qemu.pid"],
    ["-trace", "file=/tmp/trace"],
    ["-plugin", "/tmp/plugin.so"],
    ["-L", "/tmp"],
    ["-bios", HOST_FILE],
    ["-kernel", HOST_FILE],
    ["-display", "vnc=0.0.0.0:1"],
    ["-vnc", "0.0.0.0:2"],
    ["-spice", "port=5930,disable-ticketing=on"],
    ["-audiodev", "wav,id=a,path=/tmp/a.wav"],
    ["-virtfs", "local,path=/etc,mount_tag=h,security_model=none"],
    ["-gdb", "tcp::1234"],
    ["-s"],
    ["-acpitable", f"file={HOST_FILE}"],
    ["-mem-path", "/dev/shm"],
    ["-snapshot"],
    ["-loadvm", "warm"],
    ["-sandbox", "off"],
    ["-usbdevice", "host:1.2"],
    [HOST_FILE],  # a bare word: QEMU opens it as the first hard disk
]

SAFE_WORDS: list[list[str]] = [
    ["-cpu", "max"],
    ["-smp", "2,sockets=1,cores=2"],
    ["-rtc", "base=utc,clock=host"],
    ["-no-hpet"],
    ["-nographic"],
    ["-device", "virtio-rng-pci"],
    ["-device", json.dumps({"driver": "virtio-rng-pci", "id": "rng9"})],
    ["-global", "kvm-pit.lost_tick_policy=discard"],
    ["-boot", "menu=on"],
    ["-smbios", "type=1,product=emu"],
]


def _escaped(text: str) -> str:
    """Every character as a JSON ``\\u`` escape (QEMU's JSON parser decodes them too)."""
    return "".join(f"\\u{ord(char):04x}" for char in text)


def json_object(pairs: dict[str, str], style: str) -> str:
    if style == "compact":
        return json.dumps(pairs, separators=(",", ":"))
    if style == "spaced":
        return "{ " + json.dumps(pairs, separators=(" ,  ", " : "))[1:-1] + " }"
    if style == "reordered":
        return json.dumps(dict(reversed(list(pairs.items()))))
    members = ", ".join(f'"{_escaped(k)}": "{_escaped(str(v))}"' for k, v in pairs.items())
    return "{" + members + "}"


def option_string(implied: str | None, pairs: dict[str, str], style: str) -> str:
    items = dict(pairs)
    head = items.pop(implied) if implied in items and style != "explicit" else None
    if head is None and implied is not None and implied in pairs:
        items = {implied: pairs[implied], **items}
    rendered = []
    for key, value in items.items():
        value = value.replace(",", ",,")
        if style == "booleans" and value == "on":
            rendered.append(key)  # a bare key is key=on
        else:
            rendered.append(f"{key}={value}")
    return ",".join(([head] if head is not None else []) + rendered)


STYLES = ["plain", "explicit", "booleans", "compact", "spaced", "reordered", "escaped"]


@st.composite
def dangerous(draw: st.DrawFn) -> list[str]:
    kind = draw(st.sampled_from(["device", "global", "keys", "words"]))
    style = draw(st.sampled_from(STYLES))
    dashes = draw(st.sampled_from(["-", "--"]))
    if kind == "device":
        driver, props = draw(st.sampled_from(DANGEROUS_DEVICES))
        pairs = {"driver": driver, **props}
        if style in ("compact", "spaced", "reordered", "escaped"):
            return [f"{dashes}device", json_object(pairs, style)]
        return [f"{dashes}device", option_string("driver", pairs, style)]
    if kind == "global":
        driver, prop = draw(st.sampled_from(DANGEROUS_GLOBALS))
        if style in ("explicit", "reordered"):
            spelled = {"driver": driver, "property": prop, "value": HOST_FILE}
            if style == "reordered":
                spelled = dict(reversed(list(spelled.items())))
            return [f"{dashes}global", ",".join(f"{k}={v}" for k, v in spelled.items())]
        return [f"{dashes}global", f"{driver}.{prop}={HOST_FILE}"]
    if kind == "keys":
        option, implied, pairs = draw(st.sampled_from(DANGEROUS_KEYS))
        if style in ("compact", "spaced", "reordered", "escaped"):
            return [dashes + option.lstrip("-"), json_object(pairs, style)]
        return [dashes + option.lstrip("-"), option_string(implied, pairs, style)]
    words = draw(st.sampled_from(DANGEROUS_WORDS))
    if words[0].startswith("-"):
        return [dashes + words[0].lstrip("-"), *words[1:]]
    return words


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    attack=dangerous(),
    before=st.lists(st.sampled_from(SAFE_WORDS), max_size=2),
    after=st.lists(st.sampled_from(SAFE_WORDS), max_size=2),
    through_name=st.booleans(),
)
def test_no_spelling_of_a_host_reaching_option_gets_through(
    qemu_lab: QemuLab,
    attack: list[str],
    before: list[list[str]],
    after: list[list[str]],
    through_name: bool,
) -> None:
    if attack[0] == HOST_FILE:
        after = [words for words in after if len(words) == 1]  # a value would swallow it
    words = [w for group in before for w in group] + attack + [w for group in after for w in group]
    name = "R1"
    if through_name and len(attack) == 2 and "," not in attack[1]:
        name, attack_value = attack[1], "%vm-name%"  # the node's name carries the value
        words = [attack_value if w == attack[1] else w for w in words]
    options = shlex.join(words)
    session = qemu_lab.session()
    with pytest.raises(ConfigError) as refused:
        session.add_node({"name": name, "emulator": "qemu", "options": options})
    assert all(problem.startswith("$.options: ") for problem in refused.value.problems)
    allowed = qemu_lab.session(allow_unsafe_options=True)
    description = {"name": name, "emulator": "qemu", "options": options}
    if "%vm-name%" in words and "=" in name:
        # A name standing for a whole item that reads as key=value is refused in any case.
        with pytest.raises(ConfigError, match="stands for a whole item"):
            allowed.add_node(description)
        return
    node = allowed.add_node(description)
    argv = run(node.dry_run())
    expected = [attack[1] if w == "%vm-name%" else w for w in words]
    assert argv[-len(expected) :] == expected


@pytest.mark.parametrize("words", SAFE_WORDS, ids=lambda w: " ".join(w)[:30])
def test_safe_options_reach_qemu(qemu_lab: QemuLab, words: list[str]) -> None:
    argv = qemu_lab.argv(options=shlex.join(words))
    assert argv[-len(words) :] == words


# -- the attacks of the issue, against the real QEMU ------------------------------------------


LOADER = {"driver": "loader", "file": "", "addr": 201326592}


def _loader_option(path: str) -> str:
    return "-device " + shlex.quote(json.dumps({**LOADER, "file": path}))


def test_a_json_device_loading_a_host_file_is_refused(qemu_lab: QemuLab) -> None:
    secret = qemu_lab.root / "secret"
    secret.write_text("host secret\n")
    with pytest.raises(ConfigError) as refused:
        qemu_lab.node(options=_loader_option(str(secret)))
    assert "$.options: -device file=, -device loader could reach host files" in str(refused.value)


def test_a_node_named_like_a_json_device_is_refused(qemu_lab: QemuLab) -> None:
    name = json.dumps({**LOADER, "file": "/etc/hostname"}, separators=(",", ":"))
    with pytest.raises(ConfigError) as refused:
        qemu_lab.node(name=name, options="-device %vm-name%")
    assert "$.options: -device " in str(refused.value)


def test_the_json_attack_is_real_when_the_host_allows_unsafe_options(qemu_lab: QemuLab) -> None:
    """The refusals above guard a real hole: with unsafe options allowed, QEMU loads the
    host file into guest RAM (read back over QMP)."""
    secret = qemu_lab.root / "secret"
    secret.write_bytes(b"EMU-HOST-SECRET!")
    session = qemu_lab.session(allow_unsafe_options=True)
    node = qemu_lab.node(session, options=_loader_option(str(secret)))

    async def body() -> Any:
        try:
            await node.start()
            from emu_qemu.contract import monitor_of

            monitor = monitor_of(node)
            await monitor.execute("stop")
            dump = await monitor.execute(
                "human-monitor-command", {"command-line": f"xp /4xw {LOADER['addr']}"}
            )
            return dump
        finally:
            await node.stop()

    dump = run(body())
    words = [int(word, 16) for line in dump.splitlines() for word in line.split()[1:]]
    assert b"".join(word.to_bytes(4, "little") for word in words) == b"EMU-HOST-SECRET!"
