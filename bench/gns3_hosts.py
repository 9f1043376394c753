"""Two guests on one compute against two guests on two computes: ping RTT and TCP throughput.

Run from the repository root, as root, after ``./scripts/setup`` (which installs the GNS3
controller)::

    .venv/bin/python bench/gns3_hosts.py [--mib 32] [--runs 3] [--pings 20]

One real ``gns3-server==3.0.6`` controller and two ``emu serve`` computes, each in its own
network namespace on one veth pair (``tests/netns.py``; two loopback addresses where
namespaces cannot be made), as the multi-host tests set them up. One project holds two pairs
of tiny guests (10.0.0.1 ↔ 10.0.0.2, each pair on its own link without filters): the *local*
pair on compute A, its tunnel inside A's namespace; the *remote* pair split over A and B, its
tunnel crossing the wire. Both pairs run for the whole measurement; they take turns,
alternating, so the load of the idle pair weighs on both alike. A turn is a ping of
``--pings`` echoes 0.2 s apart (the RTT is ping's average), then a TCP transfer of ``--mib``
MiB (busybox ``nc``, timed from the sender's command until the receiver counts every byte,
as ``bench/link_throughput.py`` does). Printed: medians of each kind and remote / local.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import benchlib
from link_throughput import transfer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emu_tests.console import wait_for_prompt
from emucore.telnet import TelnetConsole
from tests.gns3_controller import (
    Controller,
    computes_on,
    gns3_controller,
    qemu_properties,
    wait_status,
)
from tests.netns import two_hosts_or_loopback

KINDS = ("local", "remote")


def build(controller: Controller, ids: tuple[str, str], tiny: benchlib.TinyGuest) -> str:
    """The project with both pairs (``local-1``/``local-2`` on A; ``remote-1`` on A and
    ``remote-2`` on B), linked and started; its id."""
    project = controller.api("POST", "/projects", {"name": "bench-hosts"})["project_id"]
    placement = {"local": (ids[0], ids[0]), "remote": (ids[0], ids[1])}
    for kind, computes in placement.items():
        nodes = []
        for index, compute_id in enumerate(computes, start=1):
            name = f"{kind}-{index}"
            properties = qemu_properties(tiny, name, "tiny-initrd.img", eth0=f"10.0.0.{index}/24")
            properties["qemu_path"] = benchlib.QEMU
            body = {"name": name, "node_type": "qemu", "compute_id": compute_id}
            body["properties"] = properties
            nodes.append(controller.api("POST", f"/projects/{project}/nodes", body)["node_id"])
        ends = [{"node_id": n, "adapter_number": 0, "port_number": 0} for n in nodes]
        controller.api("POST", f"/projects/{project}/links", {"nodes": ends})
    controller.api("POST", f"/projects/{project}/nodes/start")
    for node in controller.api("GET", f"/projects/{project}/nodes"):
        wait_status(controller, project, node["node_id"], "started")
    return str(project)


async def consoles(controller: Controller, project: str) -> dict[str, TelnetConsole]:
    """A shell on each guest's console, by node name."""
    opened = {}
    for node in controller.api("GET", f"/projects/{project}/nodes"):
        console = await TelnetConsole.connect(
            node["console_host"], node["console"], name=node["name"]
        )
        await wait_for_prompt(console)
        opened[str(node["name"])] = console
    return opened


async def rtt_ms(console: TelnetConsole, pings: int) -> float:
    """ping's average round trip to 10.0.0.2, in ms."""
    status, output = await console.run(f"ping -c {pings} -i 0.2 -W 3 10.0.0.2", timeout=120)
    found = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", output)
    if status != 0 or found is None:
        raise RuntimeError(f"ping failed: {output}")
    return float(found.group(1))


async def measure(
    controller: Controller, project: str, mib: int, runs: int, pings: int
) -> dict[str, dict[str, list[float]]]:
    """RTTs (ms) and throughputs (Mbit/s) of each kind, taking turns."""
    shells = await consoles(controller, project)
    results: dict[str, dict[str, list[float]]] = {k: {"rtt": [], "mbps": []} for k in KINDS}
    try:
        for kind in KINDS:  # warm-up: ARP, caches, the first frames' path
            await rtt_ms(shells[f"{kind}-1"], 3)
        for run in range(runs):
            for kind in KINDS if run % 2 == 0 else reversed(KINDS):
                sender, receiver = shells[f"{kind}-1"], shells[f"{kind}-2"]
                results[kind]["rtt"].append(await rtt_ms(sender, pings))
                wall, _ = await transfer(sender, receiver, mib)
                results[kind]["mbps"].append(mib * 8 * 1.048576 / wall)
    finally:
        for shell in shells.values():
            await shell.close()
    return results


def main(mib: int, runs: int, pings: int) -> None:
    tiny = benchlib.guest()
    with tempfile.TemporaryDirectory(prefix="emu-bench-hosts-") as name:
        root = Path(name)
        with gns3_controller(root / "controller") as controller, two_hosts_or_loopback() as hosts:
            shutil.copy(tiny.kernel, controller.images / "tiny-vmlinuz")
            shutil.copy(tiny.initrd, controller.images / "tiny-initrd.img")
            with computes_on(controller, root, hosts) as started:
                ids = (started[0][1], started[1][1])
                project = build(controller, ids, tiny)
                try:
                    results = asyncio.run(measure(controller, project, mib, runs, pings))
                finally:
                    controller.api("DELETE", f"/projects/{project}")
    report(results, hosts.isolated, mib, runs, pings)


def report(results: dict[str, Any], isolated: bool, mib: int, runs: int, pings: int) -> None:
    """Print the figures."""
    where = "two namespaces on a veth pair" if isolated else "two loopback addresses"
    print(f"# {runs} turns each: {pings} pings, {mib} MiB over TCP; computes in {where}")
    print(f"# {benchlib.load_note()}")
    rtt = {k: benchlib.median(results[k]["rtt"]) for k in KINDS}
    mbps = {k: benchlib.median(results[k]["mbps"]) for k in KINDS}
    benchlib.figure("rtt_one_compute_ms", rtt["local"], "median of ping averages, one compute", 3)
    benchlib.figure("rtt_two_computes_ms", rtt["remote"], "median of ping averages, across", 3)
    benchlib.figure("rtt_ratio", rtt["remote"] / rtt["local"], "two computes / one compute")
    benchlib.figure("tcp_one_compute_mbps", mbps["local"], "median Mbit/s, one compute", 1)
    benchlib.figure("tcp_two_computes_mbps", mbps["remote"], "median Mbit/s, across", 1)
    benchlib.figure("tcp_ratio", mbps["remote"] / mbps["local"], "two computes / one compute")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=32, help="MiB per transfer (default 32)")
    parser.add_argument("--runs", type=int, default=3, help="turns of each kind (default 3)")
    parser.add_argument("--pings", type=int, default=20, help="echoes per ping (default 20)")
    arguments = parser.parse_args()
    main(arguments.mib, arguments.runs, arguments.pings)
