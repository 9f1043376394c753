"""Hook specifications: the manual for plugin authors.

A plugin is a module (or object) with functions named like the specs below, decorated with
``emucore.hookimpl``. It is registered through the ``emucore.plugins`` entry point group under
a name; ``HostSettings.blocked_plugins`` or the ``EMU_BLOCK_PLUGINS`` environment variable
(comma-separated names) keeps a plugin from loading, so a replacement can take its place.

**Emulator scope.** A plugin module that sets ``EMULATOR = "qemu"`` is only called for nodes of
that emulator kind; a plugin without ``EMULATOR`` is called for every node (check
``node.emulator`` if that matters). Two emulators loaded at once never see each other's nodes.

**Sync and async.** pluggy calls hooks synchronously. Specs marked *sync* must return plain
values. Specs marked *may be async* (decorated with :func:`~emucore.hooks.may_be_async`, the
one source of truth) accept a plain value or an awaitable (an ``async def`` implementation
returns a coroutine): the core calls the implementations one at a time, each through
pluggy's hook execution (so tracing and monitoring see it), and awaits each result before
calling the next, so an implementation may rely on the earlier ones having finished. Such
hooks collect results and are never ``firstresult``: a coroutine is not ``None``, so "first
non-``None`` wins" would stop at the first async implementation without running it.

**Order.** pluggy calls ``tryfirst`` implementations first and ``trylast`` ones last;
within the ``tryfirst`` and plain groups the most recently registered runs first, within the
``trylast`` group it runs last. Built-in implementations are ``trylast=True``, so a
third-party implementation runs before them by default. To act after a built-in, use the
next hook of the sequence (``emu_started`` runs after every ``emu_start`` returned).
Wrappers (``wrapper=True``, ``result = yield``) work on *sync* hooks (``emu_build_args``
above all: a wrapper can add, remove or reorder fragments); on *may be async* hooks they
are refused with a ``PluginError`` when the plugin registers — use ``tryfirst`` or
``trylast`` to act before or after the others.

**Errors.** Raise an :class:`emucore.errors.EmuError` subclass whose message names the node
and the field, file or adapter concerned. Anything else is wrapped in a ``NodeError``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emucore import hookspec
from emucore.hooks import may_be_async

if TYPE_CHECKING:
    import argparse

    from emucore.lab import LabSpec
    from emucore.models import HostSettings, Nio
    from emucore.node import Node
    from emucore.records import ArgFragment, CheckResult, EmulatorInfo, LabImage, SavedState
    from emucore.runner import LabRunner


@hookspec
def emu_emulators() -> Sequence[EmulatorInfo]:
    """Declare the emulator kinds this plugin provides.

    :return: the emulator kinds (usually one). Two plugins declaring the same name is an
        error when the first node is created.

    Results of all implementations are collected. Sync.
    """
    raise NotImplementedError


@may_be_async
@hookspec
def emu_check(settings: HostSettings) -> Sequence[CheckResult] | Awaitable[Sequence[CheckResult]]:
    """Report whether what the plugin needs on this host is present (``emu check``).

    :param settings: the host's settings.
    :return: one :class:`~emucore.records.CheckResult` per thing checked.

    Results of all implementations are collected. May be async.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def emu_lab_image(
    image: str, node: str, table: Mapping[str, Any], settings: HostSettings
) -> LabImage | None:
    """Say what a lab's ``image = NAME`` stands for (``emu run`` asks before creating nodes).

    An image plugin turns a short name into a whole node description, so a lab can write
    ``image = "tiny"`` instead of a kernel, an initrd and a command line. It may read keys
    of its own from the table (the tiny guest's ``ip``, ``ips``, ``gateway``) and must
    remove them from the description it returns.

    :param image: the name the lab gives.
    :param node: the node's name (for messages, or a host name for the guest).
    :param table: the node's table in the lab file, ``image`` included.
    :param settings: the host's settings.
    :return: a :class:`~emucore.records.LabImage`, or ``None`` when this plugin does not
        provide ``image``.
    :raises ConfigError: a key of the table is wrong for this image; each problem starts
        with ``$.`` followed by the key, the runner puts the node's path in front.

    The first non-``None`` result wins. Sync.
    """


@hookspec
def emu_node_created(node: Node) -> None:
    """A node was created from its description; refuse it here if it cannot work.

    Called once, before any other node hook, with the node stopped. Use it to check
    properties against the host or other nodes (e.g. an image used by two nodes that may
    not share it) and to set up per-node state in ``node.stash``.

    :param node: the new node.
    :return: nothing; raise an ``EmuError`` to refuse the node.

    Results are collected (and ignored). Sync.
    """


@may_be_async
@hookspec
def emu_prepare(node: Node) -> Awaitable[None] | None:
    """Find and probe what the command line depends on: binaries, accelerators.

    Called at every start before ``emu_prepare_disks`` and ``emu_build_args``, and by dry
    runs (``emu argv``). Slow work (probing KVM) belongs here, not in the synchronous
    ``emu_build_args``; store results in ``node.stash`` and emit a warning event when a
    fallback was taken.

    :param node: the node; stopped or starting.
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_prepare_disks(node: Node) -> Awaitable[None] | None:
    """Make the node's disks ready: create linked clones, check them, record their paths.

    Called at every start after ``emu_prepare`` and before ``emu_build_args``, and whenever
    the host asks for it (``Node.prepare_disks``), e.g. right after creating a node so the
    first start does not wait. Must be idempotent and must never write to a base image.

    :param node: the node; stopped or starting.
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@hookspec
def emu_build_args(node: Node) -> Sequence[ArgFragment] | None:
    """Contribute to the emulator's command line.

    The core sorts all fragments by position and joins them into one argv list, whose
    first item is the program. Every value placed inside a comma-separated option must be
    escaped by the implementation (for QEMU: ``emu_qemu.qemuopts``). Must not start
    processes or touch the network: ``emu argv`` calls it for a dry run.

    :param node: the node about to start (status ``starting``), or a stopped node (dry run).
    :return: fragments to add, or ``None``.

    Results of all implementations are collected. Sync.
    """


@may_be_async
@hookspec
def emu_start(node: Node, argv: Sequence[str]) -> Awaitable[None] | None:
    """Launch the emulator with ``argv`` and wait until it runs and can be controlled.

    Exactly one implementation (the emulator's process module) launches; others may prepare
    things the process needs. If the emulator exits or fails to come up, raise an
    :class:`~emucore.errors.EmulatorExitedError` with its exit code and log tail; the core
    then calls ``emu_stop`` to clean up and leaves the node stopped.

    When the process later exits on its own, the implementation must call
    ``node.emulator_exited(returncode, log_tail)`` at once (from a process-wait task, not
    by polling).

    :param node: the node (status ``starting``).
    :param argv: the joined ``emu_build_args`` result.
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_started(node: Node) -> Awaitable[None] | None:
    """The emulator runs: attach helpers to it (priority, CPU limit, console discovery).

    Set ``node.console`` here if the plugin owns the console. The node becomes ``started``
    after every implementation returned.

    :param node: the node (status ``starting``, emulator process alive).
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_stop(node: Node) -> Awaitable[None] | None:
    """Stop the emulator and everything started with it; release what start acquired.

    Also called after a failed start and after the emulator died on its own, so an
    implementation must tolerate a process that is already gone or was never started.
    Every wait must be bounded; end with a kill, never leave a process behind.

    :param node: the node (status ``stopping``).
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_stopped(node: Node) -> Awaitable[None] | None:
    """The emulator is gone: release the helpers attached to it in ``emu_started``.

    Called after every ``emu_stop`` implementation returned (after a stop, a failed start or
    a crash), when the emulator's process no longer exists: what it wrote last (to a console,
    a pipe) can still be read to its end here.

    :param node: the node (status ``stopping``).
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_suspend(node: Node) -> Awaitable[None] | None:
    """Pause the running node (its CPUs stop; the process stays).

    :param node: the node (status ``started``).
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_resume(node: Node) -> Awaitable[None] | None:
    """Let a suspended node run again.

    :param node: the node (status ``suspended``).
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_reload(node: Node) -> Awaitable[None] | None:
    """Reset the node as a power cycle would, without restarting the process.

    A suspended node runs again afterwards.

    :param node: the node (status ``started`` or ``suspended``).
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_attach_nio(node: Node, adapter: int, nio: Nio) -> Awaitable[None] | None:
    """Connect an adapter of a running node that has no NIO to ``nio``.

    On a stopped node the core only records the NIO; ``emu_build_args`` reads it from
    ``node.adapters`` at the next start.

    :param node: the node (status ``started`` or ``suspended``).
    :param adapter: the adapter number, already checked against the adapter count.
    :param nio: what to connect to.
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_update_nio(node: Node, adapter: int, old: Nio, new: Nio) -> Awaitable[None] | None:
    """Replace the NIO of a connected adapter of a running node (a live relink).

    The guest keeps its NIC. An emulator that cannot change it live restarts itself here
    and says so in its documentation.

    :param node: the node (status ``started`` or ``suspended``).
    :param adapter: the adapter number.
    :param old: the NIO being replaced.
    :param new: the NIO to use from now on.
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_detach_nio(node: Node, adapter: int, nio: Nio) -> Awaitable[None] | None:
    """Disconnect an adapter of a running node; the guest keeps its NIC, link down.

    :param node: the node (status ``started`` or ``suspended``).
    :param adapter: the adapter number.
    :param nio: the NIO being removed.
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_set_link(node: Node, adapter: int, up: bool) -> Awaitable[None] | None:
    """Set an adapter's link state as the guest sees it, keeping its NIO.

    :param node: the node (status ``started`` or ``suspended``).
    :param adapter: the adapter number.
    :param up: ``True`` for link up.
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_capture(node: Node, adapter: int, path: Path) -> bool | Awaitable[bool] | None:
    """Start writing the frames crossing an adapter to a pcap file, without a restart.

    :param node: the node (status ``started`` or ``suspended``); the core already refused
        a second capture on the same adapter.
    :param adapter: the adapter number.
    :param path: the pcap file to (over)write.
    :return: ``True`` if this implementation captures; when none does, the core captures
        in its relay for UDP links or refuses with an error.

    Results are collected; the core awaits each. May be async.
    """


@may_be_async
@hookspec
def emu_stop_capture(node: Node, adapter: int) -> Awaitable[None] | None:
    """Stop the capture this plugin started on ``adapter``; the file stays.

    :param node: the node.
    :param adapter: the adapter number.
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_close(node: Node) -> Awaitable[None] | None:
    """The node is being deleted from the host's view: release what creation acquired.

    Called after the node stopped. The node's directory and its disks stay.

    :param node: the node (status ``stopped``).
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@hookspec
def emu_live_properties(node: Node) -> Collection[str]:
    """Name the properties this plugin can change while the node runs.

    A change of a running node's description (``Session.update_node``) is refused, before
    anything is applied, unless every property it changes is named by some implementation;
    the error names the others. The answer may depend on the node (a property that can
    change only while some device exists).

    :param node: the node (status ``started`` or ``suspended``).
    :return: property names (fields of the emulator's properties class).

    Results of all implementations are collected. Sync.
    """
    raise NotImplementedError


@may_be_async
@hookspec
def emu_update_running(
    node: Node, previous: Any, changed: frozenset[str]
) -> Awaitable[None] | None:
    """Apply changed properties to the running node (swap a medium, change a CPU quota).

    Called after every changed property was claimed through ``emu_live_properties``;
    ``node.properties`` holds the new values already. Apply only what your plugin named
    there; raise to refuse a value (the core then puts the previous description back, so
    leave the node as it was).

    :param node: the node (status ``started`` or ``suspended``).
    :param previous: the properties before the change (the emulator's properties class).
    :param changed: the names of the properties whose values differ.
    :return: nothing.

    Results are collected (and ignored). May be async.
    """


@may_be_async
@hookspec
def emu_node_info(node: Node) -> Mapping[str, Any] | Awaitable[Mapping[str, Any]] | None:
    """Report facts about the node that are not its properties, for front ends to show.

    Checksums of the images it uses, the port of a second console, what it was started
    with: whatever a front end may want to put beside the properties. Keys are the
    plugin's; an emulator whose properties carry another tool's names should use that
    tool's names for these too. Must be cheap or cached: hosts ask whenever they render
    a node, without taking the node's lock (a start may be running).

    :param node: the node, in any status.
    :return: a mapping of names to JSON-compatible values, or ``None``; where two
        implementations give the same key, the first one called wins (a third party's
        plain implementation runs before the built-ins).

    Results of all implementations are collected and merged. May be async.
    """


@may_be_async
@hookspec
def emu_create_disk_image(
    node: Node, name: str, options: Mapping[str, Any]
) -> bool | Awaitable[bool] | None:
    """Create a new, empty disk image in the node's directory.

    The core has checked that ``name`` is a plain file name (no directory part, no leading
    dot). Check everything else yourself: ``options`` comes as the user sent it.

    :param node: the node, in any status.
    :param name: the file name inside ``node.directory``.
    :param options: the image's format, size and format options, unchecked.
    :return: ``True`` when this implementation created the image (the later ones are not
        called then); when none does, the core refuses the request.
    :raises EmuError: the name or an option is refused, the file exists, or the tool failed.

    Results are collected up to the first ``True``; the core awaits each. May be async.
    """


@may_be_async
@hookspec
def emu_resize_disk_image(node: Node, name: str, extend: int) -> bool | Awaitable[bool] | None:
    """Make a disk image in the node's directory larger.

    :param node: the node (status ``stopped``: the core refuses a running node).
    :param name: the file name inside ``node.directory`` (a plain name, checked).
    :param extend: how much to add, in MiB (at least 1, checked).
    :return: ``True`` when this implementation resized it (the later ones are not called
        then); when none does, the core refuses the request.

    Results are collected up to the first ``True``; the core awaits each. May be async.
    """


@may_be_async
@hookspec
def emu_delete_disk_image(node: Node, name: str) -> bool | Awaitable[bool] | None:
    """Delete a disk image in the node's directory.

    :param node: the node (status ``stopped``: the core refuses a running node).
    :param name: the file name inside ``node.directory`` (a plain name, checked).
    :return: ``True`` when this implementation deleted it (the later ones are not called
        then); when none does, the core refuses the request.

    Results are collected up to the first ``True``; the core awaits each. May be async.
    """


@may_be_async
@hookspec
def emu_save_state(node: Node, name: str) -> bool | Awaitable[bool] | None:
    """Save the running node's whole state (machine and disks) under ``name``.

    A later start may resume from it (``emu_restore_state``) instead of booting. A state of
    the same name is replaced. The node is left as it was found: running, or suspended
    (a host saving several nodes at one moment suspends them all first). Never write a base
    image: the state goes into the node's own files (its directory, its linked clones).

    :param node: the node (status ``started`` or ``suspended``).
    :param name: the state's name, checked by the core (1-64 letters, digits, ``_ . -``,
        starting with a letter or digit: never a path).
    :return: ``True`` when this implementation saved the state (the later ones are not
        called then); when none does, the core raises
        :class:`~emucore.errors.StateUnsupportedError` (the emulator cannot save states).
    :raises EmuError: the node cannot hold a state (say why and what to do), or saving
        failed.

    Results are collected up to the first ``True``; the core awaits each. May be async.
    """


@may_be_async
@hookspec
def emu_restore_state(node: Node, name: str) -> bool | Awaitable[bool] | None:
    """Make this start resume from the state saved under ``name`` instead of booting.

    Called by ``Node.start(state=name)`` after ``emu_prepare`` and before
    ``emu_prepare_disks``: check the state exists and fits the node before anything
    touches its disks, and arrange for the emulator to load it before the guest runs (in
    the command line, or while its CPUs are paused in ``emu_start``). The guest then goes
    on where it was saved: its uptime, its memory, its disks as they were; its network
    adapters are connected as the node's adapters are now (links are the host's).

    :param node: the node (status ``starting``).
    :param name: the state's name (checked by the core).
    :return: ``True`` when this implementation restores it (the later ones are not called
        then); when none does, the start fails with
        :class:`~emucore.errors.StateUnsupportedError`.
    :raises EmuError: there is no such state, or it does not fit the node (name the
        property that changed since it was saved).

    Results are collected up to the first ``True``; the core awaits each. May be async.
    """


@may_be_async
@hookspec
def emu_list_states(node: Node) -> Sequence[SavedState] | Awaitable[Sequence[SavedState]] | None:
    """List the states saved for this node (``emu_save_state``).

    :param node: the node, in any status.
    :return: the states (an empty list when this plugin handles states but none is saved),
        or ``None`` when this plugin handles no states for the node. When every
        implementation returns ``None`` the core raises
        :class:`~emucore.errors.StateUnsupportedError`.

    Results of all implementations are collected and concatenated. May be async.
    """


@may_be_async
@hookspec
def emu_delete_state(node: Node, name: str) -> bool | Awaitable[bool] | None:
    """Delete the state saved under ``name`` and free the space it took.

    :param node: the node (status ``stopped``: the core refuses a running node).
    :param name: the state's name (checked by the core).
    :return: ``True`` when this implementation deleted it (the later ones are not called
        then); when none does, the core raises
        :class:`~emucore.errors.StateUnsupportedError`.
    :raises EmuError: there is no state of that name (list the ones there are).

    Results are collected up to the first ``True``; the core awaits each. May be async.
    """


@hookspec
def emu_add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add subcommands to the ``emu`` command (a front end such as ``emu serve``).

    Called once while ``emu`` builds its argument parser. Add a parser with
    ``subparsers.add_parser(NAME, help=...)`` and give it ``set_defaults(func=FUNCTION)``;
    ``emu`` calls ``FUNCTION(args)`` with the parsed arguments and exits with the integer it
    returns. Import heavy modules inside ``FUNCTION``, not at load time: every ``emu`` command
    builds the parser. Names must not clash with the built-in commands or other plugins'.

    :param subparsers: the ``emu`` parser's subparsers (``argparse``).
    :return: nothing.

    Results are collected (and ignored). Sync.
    """


@hookspec(firstresult=True)
def emu_lab_runner(
    lab: LabSpec, lab_file: Path, settings: HostSettings, options: argparse.Namespace
) -> LabRunner | None:
    """Take over ``emu run``: return the runner that runs this lab elsewhere (e.g. on a
    cluster), or ``None`` to leave it to the local :class:`~emucore.runner.LabRunner`.

    A plugin adds the options that ask for it to ``emu run`` in ``emu_add_commands``
    (``subparsers.choices["run"].add_argument(...)``) and reads them here. The runner it
    returns is a ``LabRunner`` (usually a subclass overriding ``start``, ``stop`` and
    ``state``): ``emu run`` drives it exactly as a local one, so progress, ``--json``,
    ``--check`` and the exit codes stay the same.

    :param lab: the validated lab file.
    :param lab_file: its path.
    :param settings: the host's settings (``--settings``).
    :param options: the parsed ``emu run`` options (``project_dir``, ``jobs``, and the
        plugin's own).
    :return: a runner, or ``None``.

    The first non-``None`` result wins. Sync.
    """
