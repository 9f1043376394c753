"""The node's ``options``: extra QEMU arguments, with placeholders, checked for safety.

Options are split like a shell would (``shlex``), placeholders are replaced inside each
argument after splitting (so a name with spaces stays one argument), and options that could
read or write host files or add backends behind emu's back are refused unless the host sets
``HostSettings.allow_unsafe_options``.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from emu_qemu import positions
from emucore import hookimpl
from emucore.errors import ConfigError
from emucore.node import Node
from emucore.records import ArgFragment

EMULATOR = "qemu"

# Options that name host files or create devices' backends (disks, network, sockets, files).
UNSAFE_OPTIONS = frozenset(
    "-drive -blockdev -hda -hdb -hdc -hdd -cdrom -fda -fdb -mtdblock -sd -pflash -snapshot"
    " -netdev -nic -net -fsdev -virtfs -chardev -serial -parallel -monitor -qmp -qmp-pretty"
    " -mon -debugcon -gdb -incoming -loadvm -readconfig -writeconfig -add-fd -object -plugin"
    " -trace -D -pidfile -daemonize -runas -chroot -option-rom -bios -kernel -initrd -dtb"
    " -L -usbdevice -sandbox -spice -vnc -audiodev -tpmdev -compat".split()
)


def placeholders(node: Node) -> dict[str, str]:
    """The values of ``%vm-name%``, ``%vm-id%``, ``%project-id%``, ``%project-path%``,
    ``%console-port%`` (0 while the port is not known yet)."""
    console = node.console.port if node.console else (node.properties.console or 0)
    return {
        "%vm-name%": node.name,
        "%vm-id%": str(node.config.id),
        "%project-id%": str(node.project.id),
        "%project-path%": str(node.project.directory),
        "%console-port%": str(console),
    }


def user_argv(node: Node) -> list[str]:
    """The node's options as argv items, placeholders replaced (not yet safety-checked)."""
    try:
        words = shlex.split(node.properties.options)
    except ValueError as exc:  # the property validator catches this first
        raise ConfigError(f"node {node.name!r}", [f"$.options: {exc}"]) from None
    values = placeholders(node)
    result = []
    for word in words:
        for key, value in values.items():
            word = word.replace(key, value)
        result.append(word)
    return result


def unsafe_options(argv: Sequence[str]) -> list[str]:
    """The unsafe options among ``argv`` (``-drive``, ``--netdev``, ``-chardev=...``)."""
    found = []
    for word in argv:
        if not word.startswith("-"):
            continue
        name = "-" + word.lstrip("-").split("=", 1)[0]
        if name in UNSAFE_OPTIONS:
            found.append(name)
    return found


def check_options(node: Node) -> None:
    """Refuse unsafe options unless the host allows them.

    :raises ConfigError: naming the ``options`` field and each unsafe option.
    """
    if node.settings.allow_unsafe_options:
        return
    unsafe = unsafe_options(user_argv(node))
    if unsafe:
        listed = ", ".join(sorted(set(unsafe)))
        raise ConfigError(
            f"node {node.name!r}",
            [
                f"$.options: {listed} could reach host files or add backends emu does not"
                " manage; use the node's properties instead, or let the host allow unsafe"
                " options (HostSettings.allow_unsafe_options)"
            ],
        )


@hookimpl(trylast=True)
def emu_node_created(node: Node) -> None:
    """Refuse unsafe options as soon as the node is described."""
    check_options(node)


@hookimpl(trylast=True)
def emu_build_args(node: Node) -> Sequence[ArgFragment]:
    """The user's options, last, so they can refine what emu generated."""
    check_options(node)
    return [ArgFragment(positions.USER_OPTIONS, user_argv(node), "qemu.options")]
