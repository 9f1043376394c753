"""What GNS3 3.0's QEMU features cost: UEFI boot, a TPM, and resuming a saved VM state.

Run from the repository root::

    .venv/bin/python bench/parity.py [--runs 5]

Each figure is a median over ``--runs`` runs, the kinds alternating, of the time from
``node.start()`` until the tiny guest's shell answers Enter on its console:

* ``boot_bios_s`` / ``boot_uefi_s``: a cold boot with SeaBIOS and with OVMF (both 256 MiB,
  which OVMF needs);
* ``start_tpm_ms`` / ``start_plain_ms``: ``node.start()`` alone, with and without a TPM (the
  swtpm start and its socket);
* ``resume_s``: a start that restores the state saved at the previous stop
  (``on_close = "save_vm_state"``), against ``boot_bios_s``; ``save_s``: the stop that saves.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import benchlib

from emu_qemu import qemuimg


async def main(runs: int) -> None:
    with benchlib.lab_directory("parity") as root:
        tiny = benchlib.guest()
        lab = benchlib.session(root, tiny)
        disk = root / "images" / "state.qcow2"
        await qemuimg.run(
            qemuimg.find_qemu_img(), ["create", "-q", "-f", "qcow2", str(disk), "64M"]
        )
        bios = benchlib.guest_node(lab, tiny, "bios", ram=256)
        uefi = benchlib.guest_node(lab, tiny, "uefi", ram=256, uefi=True)
        tpm = benchlib.guest_node(lab, tiny, "tpm", tpm=True)
        plain = benchlib.guest_node(lab, tiny, "plain")
        warm = benchlib.guest_node(
            lab, tiny, "warm", ram=256, hda_disk_image=disk.name, on_close="save_vm_state"
        )
        times: dict[str, list[float]] = {
            key: [] for key in ("bios", "uefi", "tpm", "plain", "resume", "save")
        }
        try:
            await benchlib.shell_answers(warm)  # the first start boots; every later one resumes
            for round_number in range(runs):
                flip = round_number % 2 == 1
                for node, key in [(bios, "bios"), (uefi, "uefi")][:: -1 if flip else 1]:
                    times[key].append(await benchlib.shell_answers(node))
                    await node.stop()
                for node, key in [(tpm, "tpm"), (plain, "plain")][:: -1 if flip else 1]:
                    times[key].append(await benchlib.timed_start(node))
                began = benchlib.now()
                await warm.stop()
                times["save"].append(benchlib.now() - began)
                times["resume"].append(await benchlib.shell_answers(warm))
        finally:
            await lab.close()
    print(f"# {runs} runs each; {benchlib.load_note()}")
    med = {key: benchlib.median(values) for key, values in times.items()}
    benchlib.figure("boot_bios_s", med["bios"], "median, start until the shell answers")
    benchlib.figure("boot_uefi_s", med["uefi"], "median, the same under OVMF")
    benchlib.figure("uefi_ratio", med["uefi"] / med["bios"], "UEFI / BIOS boot")
    benchlib.figure("start_plain_ms", 1000 * med["plain"], "median, node.start()", 1)
    benchlib.figure("start_tpm_ms", 1000 * med["tpm"], "median, node.start() with swtpm", 1)
    benchlib.figure("save_s", med["save"], "median, the stop that saves the state")
    benchlib.figure("resume_s", med["resume"], "median, start until the restored shell answers")
    benchlib.figure("resume_ratio", med["resume"] / med["bios"], "resume / cold boot")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()
    sys.exit(asyncio.run(main(arguments.runs)))
