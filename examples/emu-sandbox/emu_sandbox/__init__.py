"""Run every QEMU node under QEMU's seccomp sandbox: an example of overriding one QEMU piece.

The plugin wraps one hook, ``emu_build_args``, with a pluggy *wrapper* (``wrapper=True``): it
sees the fragments every other implementation returned (the built-in ``qemu.*`` plugins and
any third party) and appends ``-sandbox`` unless one of them already set it. Module-level
``EMULATOR = "qemu"`` scopes it to QEMU nodes; a VPCS node never reaches it. emu_qemu is not
edited, and ``EMU_BLOCK_PLUGINS=sandbox`` turns the plugin off.

QEMU's sandbox is a seccomp filter QEMU installs on itself before the guest runs:
``obsolete``, ``elevateprivileges``, ``spawn`` and ``resourcecontrol`` deny old system calls,
setuid, fork/exec and priority/affinity changes from inside QEMU (emu renices QEMU from the
host, which the sandbox does not concern).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

from emu_qemu import positions
from emucore import hookimpl
from emucore.node import Node
from emucore.records import ArgFragment

EMULATOR = "qemu"

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# Among the control options (-nodefaults, -qmp, -S), before the boot options.
POSITION = positions.CONTROL + 5

Fragments = list[Sequence[ArgFragment] | None]


@hookimpl(wrapper=True)
def emu_build_args(node: Node) -> Generator[None, Fragments, Fragments]:
    """Append ``-sandbox`` to the node's command line unless a plugin put one there."""
    results = yield
    present = any(
        "-sandbox" in fragment.args for fragments in results if fragments for fragment in fragments
    )
    if present:
        return results
    return [*results, [ArgFragment(POSITION, ("-sandbox", SANDBOX), "sandbox")]]
