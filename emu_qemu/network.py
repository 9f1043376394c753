"""Network adapters and their connections (NIOs), live relinking, link state.

Every adapter *n* is a NIC whose backend is a QEMU hub, so the NIO behind it can change
while the guest runs and keeps its NIC:

* ``-netdev hubport,id=nic<n>,hubid=<n>`` — the NIC's side of the hub (captures attach here,
  so a capture survives relinks);
* ``-netdev hubport,id=sink<n>,hubid=<n>`` — a port with no peer. Without it, a hub whose
  only other port is the NIC cannot deliver the NIC's frames, QEMU queues them and the NIC
  stays stalled even after a link is added (seen on QEMU 7.2: pings only passed after a
  ``stop``/``cont``). The sink accepts and discards, like an unplugged cable;
* ``-device <model>,netdev=nic<n>,mac=...,id=adapter<n>``;
* when connected: the NIO's netdev (``dgram`` for UDP, ``tap`` for TAP) plus a hub port
  joining it to the hub. Attaching or detaching at run time adds or deletes these two netdevs
  over QMP (``netdev_add``/``netdev_del``), with fresh ids each time.

The guest sees carrier down on an adapter without NIO and after a link suspend (QMP
``set_link`` on the NIC device).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from emu_qemu import positions
from emu_qemu.contract import QemuNode, binary, monitor_of
from emu_qemu.properties import CustomAdapter
from emu_qemu.qemuopts import opts
from emu_qemu.qmp import Monitor
from emucore import hookimpl
from emucore.errors import ConfigError
from emucore.models import Nio, TapNio
from emucore.records import ArgFragment
from emucore.stash import StashKey

EMULATOR = "qemu"

# NICs 0..ROOT_SLOTS-1 sit on the root PCI bus; the rest on bridges of BRIDGE_SLOTS each.
ROOT_SLOTS = 12
BRIDGE_SLOTS = 31
_MAC_SPACE = 1 << 48

# How many times each adapter was linked at run time: netdev ids are never reused.
_GENERATION = StashKey[dict[int, int]]()


def base_mac(node: QemuNode) -> int:
    """The node's base MAC address as an integer.

    The property ``mac_address`` if set; else locally administered ``02:xx:xx:xx:00:00``
    derived from the project and node ids, so the same node gets the same MACs on every
    start and host.
    """
    if node.properties.mac_address:
        return int(node.properties.mac_address.replace(":", ""), 16)
    digest = hashlib.sha256(f"{node.project.id}/{node.config.id}".encode()).digest()
    return (0x02 << 40) | (int.from_bytes(digest[:3], "big") << 16)


@hookimpl(trylast=True)
def emu_node_created(node: QemuNode) -> None:
    """Claim the node's MAC range [base, base + adapters) in its project: a lab's derived
    MACs come from a 24-bit hash, so two nodes could meet; they are refused instead."""
    low = base_mac(node)
    high = low + max(1, len(node.adapters))
    other = node.claims.take_range(node, "MAC addresses", node.project.id, low, high)
    if other is not None:
        raise ConfigError(
            f"node {node.name!r}",
            [
                f"$.mac_address: MAC addresses {format_mac(low)}..{format_mac(high - 1)}"
                f" overlap node {other.name!r}'s in this project; set mac_address to a free base"
            ],
        )


def format_mac(value: int) -> str:
    """``0x0c1234560001`` → ``0c:12:34:56:00:01``."""
    return (value % _MAC_SPACE).to_bytes(6, "big").hex(":")


def adapter_mac(node: QemuNode, adapter: int) -> str:
    """The MAC of ``adapter``: its custom MAC, else base + adapter number."""
    return _mac(base_mac(node), _customs(node).get(adapter), adapter)


def adapter_model(node: QemuNode, adapter: int) -> str:
    """The QEMU device of ``adapter`` (GNS3's ``virtio`` is ``virtio-net-pci``)."""
    return _model(node.properties.adapter_type, _customs(node).get(adapter))


def _customs(node: QemuNode) -> dict[int, CustomAdapter]:
    return {custom.adapter_number: custom for custom in node.properties.custom_adapters}


def _mac(base: int, custom: CustomAdapter | None, adapter: int) -> str:
    if custom is not None and custom.mac_address:
        return custom.mac_address.lower()
    return format_mac(base + adapter)


def _model(default: str, custom: CustomAdapter | None) -> str:
    model = custom.adapter_type if custom is not None and custom.adapter_type else default
    return "virtio-net-pci" if model == "virtio" else model


def _pci_placement(adapter: int) -> dict[str, str]:
    if adapter < ROOT_SLOTS:
        return {}
    bridge, slot = divmod(adapter - ROOT_SLOTS, BRIDGE_SLOTS)
    return {"bus": f"pci-bridge{bridge}", "addr": f"{slot + 1:#x}"}


def _bridges(adapters: int) -> list[str]:
    count = -(-max(0, adapters - ROOT_SLOTS) // BRIDGE_SLOTS)
    args: list[str] = []
    for bridge in range(count):
        device: dict[str, str | int | bool] = {
            "id": f"pci-bridge{bridge}",
            "chassis_nr": bridge + 1,
        }
        device["shpc"] = False
        args += ["-device", opts("pci-bridge", device)]
    return args


def nio_netdev(node: QemuNode, nio: Nio, netdev_id: str) -> dict[str, Any]:
    """The QMP ``netdev_add`` arguments of a NIO's backend (also used for the command line)."""
    if isinstance(nio, TapNio):
        tap = {"ifname": nio.device, "script": "no", "downscript": "no"}
        return {"type": "tap", "id": netdev_id, **tap}
    local_host = node.settings.udp_host
    if binary(node).version >= (7, 2, 0):
        return {
            "type": "dgram",
            "id": netdev_id,
            "local": {"type": "inet", "host": local_host, "port": str(nio.local_port)},
            "remote": {"type": "inet", "host": nio.remote_host, "port": str(nio.remote_port)},
        }
    return {
        "type": "socket",
        "id": netdev_id,
        "udp": f"{nio.remote_host}:{nio.remote_port}",
        "localaddr": f"{local_host}:{nio.local_port}",
    }


def _netdev_option(netdev: dict[str, Any]) -> str:
    """Flatten ``netdev_add`` arguments into a ``-netdev`` option string."""
    flat: dict[str, Any] = {}
    for key, value in netdev.items():
        if key == "type":
            continue
        if isinstance(value, dict):
            flat |= {f"{key}.{sub}": item for sub, item in value.items()}
        else:
            flat[key] = value
    return opts(str(netdev["type"]), flat)


def _link_ids(adapter: int, generation: int) -> tuple[str, str]:
    suffix = f"g{generation}" if generation else ""
    return f"link{adapter}{suffix}", f"linkport{adapter}{suffix}"


def _hub_port(port_id: str, adapter: int, netdev_id: str) -> dict[str, Any]:
    return {"type": "hubport", "id": port_id, "hubid": adapter, "netdev": netdev_id}


@hookimpl(trylast=True)
def emu_prepare(node: QemuNode) -> None:
    """A new start begins netdev ids afresh."""
    node.stash[_GENERATION] = {}


@hookimpl(trylast=True)
def emu_build_args(node: QemuNode) -> Sequence[ArgFragment]:
    """NICs on hubs, sinks, PCI bridges, and the NIOs connected at start."""
    args = _bridges(len(node.adapters))
    # Computed once, not per adapter: a start must stay fast with 275 adapters.
    base, customs, default = base_mac(node), _customs(node), node.properties.adapter_type
    for adapter in node.adapters:
        n = adapter.number
        custom = customs.get(n)
        args += ["-netdev", f"hubport,id=nic{n},hubid={n}"]
        args += ["-netdev", f"hubport,id=sink{n},hubid={n}"]
        device = {"netdev": f"nic{n}", "mac": _mac(base, custom, n), "id": f"adapter{n}"}
        args += ["-device", opts(_model(default, custom), device | _pci_placement(n))]
        if adapter.nio is not None:
            link_id, port_id = _link_ids(n, 0)
            args += ["-netdev", _netdev_option(nio_netdev(node, adapter.nio, link_id))]
            # The _hub_port netdev, spelled out: its ids and numbers are ours, nothing to escape.
            args += ["-netdev", f"hubport,id={port_id},hubid={n},netdev={link_id}"]
    return [ArgFragment(positions.NETWORK, args, "qemu.network")]


@hookimpl(trylast=True)
async def emu_started(node: QemuNode) -> None:
    """Carrier down on adapters without NIO or with a suspended link."""
    monitor = monitor_of(node)
    for adapter in node.adapters:
        if adapter.nio is None or not adapter.link_up:
            await _set_carrier(monitor, adapter.number, False)


async def _set_carrier(monitor: Monitor, adapter: int, up: bool) -> None:
    await monitor.execute("set_link", {"name": f"adapter{adapter}", "up": up})


async def _add_link(node: QemuNode, adapter: int, nio: Nio) -> None:
    generations = node.stash.setdefault(_GENERATION, {})
    generations[adapter] = generation = generations.get(adapter, 0) + 1
    link_id, port_id = _link_ids(adapter, generation)
    monitor = monitor_of(node)
    await monitor.execute("netdev_add", nio_netdev(node, nio, link_id))
    try:
        await monitor.execute("netdev_add", _hub_port(port_id, adapter, link_id))
    except Exception:
        await monitor.execute("netdev_del", {"id": link_id})
        raise


async def _remove_link(node: QemuNode, adapter: int) -> None:
    generation = node.stash.setdefault(_GENERATION, {}).get(adapter, 0)
    link_id, port_id = _link_ids(adapter, generation)
    monitor = monitor_of(node)
    await monitor.execute("netdev_del", {"id": port_id})
    await monitor.execute("netdev_del", {"id": link_id})


def _link_up(node: QemuNode, adapter: int) -> bool:
    return node.adapters[adapter].link_up


@hookimpl(trylast=True)
async def emu_attach_nio(node: QemuNode, adapter: int, nio: Nio) -> None:
    """Join the NIO's netdev to the adapter's hub; carrier up unless the link is suspended."""
    await _add_link(node, adapter, nio)
    if _link_up(node, adapter):
        await _set_carrier(monitor_of(node), adapter, True)


@hookimpl(trylast=True)
async def emu_update_nio(node: QemuNode, adapter: int, old: Nio, new: Nio) -> None:
    """Swap the NIO behind the hub; the guest's NIC and its carrier stay as they are."""
    await _remove_link(node, adapter)
    await _add_link(node, adapter, new)


@hookimpl(trylast=True)
async def emu_detach_nio(node: QemuNode, adapter: int, nio: Nio) -> None:
    """Carrier down, then remove the NIO's netdev and its hub port."""
    await _set_carrier(monitor_of(node), adapter, False)
    await _remove_link(node, adapter)


@hookimpl(trylast=True)
async def emu_set_link(node: QemuNode, adapter: int, up: bool) -> None:
    """Carrier up or down as the guest sees it (a down link also stops all traffic)."""
    has_nio = node.adapters[adapter].nio is not None
    await _set_carrier(monitor_of(node), adapter, up and has_nio)
