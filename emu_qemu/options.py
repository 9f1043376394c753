"""The node's ``options``: extra QEMU arguments, with placeholders, checked for safety.

Options are split like a shell would (``shlex``), placeholders are replaced inside each
argument after splitting (so a name with spaces stays one argument), and only then checked
against :mod:`emu_qemu.optionpolicy` (an allow-list of options, read the way QEMU reads
them): anything that could reach host files, devices or sockets is refused unless the host
sets ``HostSettings.allow_unsafe_options``.
"""

from __future__ import annotations

from collections.abc import Sequence

from emu_qemu import positions
from emu_qemu.contract import QemuNode
from emu_qemu.guestcid import claimed_cid
from emu_qemu.optionpolicy import unsafe_options
from emu_qemu.userargs import user_argv
from emucore import hookimpl
from emucore.errors import ConfigError
from emucore.records import ArgFragment

EMULATOR = "qemu"


def check_options(node: QemuNode, argv: Sequence[str] | None = None) -> None:
    """Refuse unsafe options unless the host allows them.

    :param argv: the node's :func:`user_argv`, when the caller has it already.
    :raises ConfigError: naming the ``options`` field and each unsafe option.
    """
    if node.settings.allow_unsafe_options:
        return
    unsafe = unsafe_options(user_argv(node) if argv is None else argv, claimed_cid(node))
    if unsafe:
        listed = ", ".join(dict.fromkeys(unsafe))
        raise ConfigError(
            f"node {node.name!r}",
            [
                f"$.options: {listed} could reach host files, devices or sockets, or are not"
                " among the options a node may set (see the QEMU node reference); use the"
                " node's properties instead, or let the host allow unsafe options"
                " (HostSettings.allow_unsafe_options)"
            ],
        )


@hookimpl(trylast=True)
def emu_node_created(node: QemuNode) -> None:
    """Refuse misplaced placeholders and unsafe options as soon as the node is described."""
    check_options(node, user_argv(node))


@hookimpl(trylast=True)
def emu_build_args(node: QemuNode) -> Sequence[ArgFragment]:
    """The user's options, last, so they can refine what emu generated."""
    argv = user_argv(node)
    check_options(node, argv)
    return [ArgFragment(positions.USER_OPTIONS, argv, "qemu.options")]
