"""``%guest-cid%``: a vsock CID unique on the host, and the one ``vhost-vsock-pci`` a node's
options may add (with that CID).

Command lines only: this host has no ``/dev/vhost-vsock`` (no vhost_vsock module in the
container), so QEMU cannot open a vsock device here; the argv is what GNS3's users write.
"""

from __future__ import annotations

import pytest

from emucore.claims import Claims
from emucore.errors import ConfigError
from tests.conftest import QemuLab, run, values_of

pytestmark = pytest.mark.usefixtures("kvm_off")

VSOCK = "-device vhost-vsock-pci,guest-cid=%guest-cid%"


def test_each_node_gets_its_own_cid_the_console_port_when_fixed(qemu_lab: QemuLab) -> None:
    claims = Claims()
    one = qemu_lab.session(claims=claims)
    other = qemu_lab.session(
        project=qemu_lab.project.__class__.for_directory(qemu_lab.root / "p2"), claims=claims
    )
    first = qemu_lab.node(one, name="a", options=VSOCK)
    second = qemu_lab.node(other, name="b", options=VSOCK)  # another project, same host
    fixed = qemu_lab.node(one, name="c", options=VSOCK, console=5123)
    plain = qemu_lab.node(one, name="d")  # no placeholder: no CID taken
    cids = [values_of(run(node.dry_run()), "-device")[-1] for node in (first, second, fixed)]
    assert cids == [
        "vhost-vsock-pci,guest-cid=3",
        "vhost-vsock-pci,guest-cid=4",
        "vhost-vsock-pci,guest-cid=5123",
    ]
    assert all(kind != "guest cid" for kind, _ in claims.held_by(plain))
    run(one.remove_node("a"))  # given back with the node
    again = qemu_lab.node(one, name="e", options=f"-smbios type=11,value=cid-%guest-cid% {VSOCK}")
    argv = run(again.dry_run())
    assert values_of(argv, "-smbios") == ["type=11,value=cid-3"]
    assert values_of(argv, "-device")[-1] == "vhost-vsock-pci,guest-cid=3"


@pytest.mark.parametrize(
    "options",
    [
        "-device vhost-vsock-pci,guest-cid=3",  # no placeholder: the node holds no CID
        "-device vhost-vsock-pci,guest-cid=9 -smbios type=11,value=%guest-cid%",  # not its own
        f"{VSOCK},vhostfd=7",  # a host descriptor
        "-device vhost-user-vsock-pci,guest-cid=%guest-cid%",  # another vhost device
        """-device '{"driver":"vhost-vsock-pci","guest-cid":%guest-cid%,"vhostfd":"7"}'""",
    ],
)
def test_other_vsock_devices_stay_refused(qemu_lab: QemuLab, options: str) -> None:
    with pytest.raises(ConfigError, match=r"\$\.options: "):
        qemu_lab.node(options=options)


def test_a_json_vsock_device_with_the_node_cid_is_allowed(qemu_lab: QemuLab) -> None:
    argv = qemu_lab.argv(
        options="""-device '{"driver":"vhost-vsock-pci","guest-cid":%guest-cid%}'"""
    )
    assert values_of(argv, "-device")[-1] == '{"driver":"vhost-vsock-pci","guest-cid":3}'
