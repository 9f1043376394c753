"""The QEMU emulator plugin: one small plugin per concern, composed through emucore's hooks.

Each module below is registered as its own plugin (entry point group ``emucore.plugins``),
so any one can be blocked (``EMU_BLOCK_PLUGINS=qemu.console``) and replaced:

========================  ==========================  ==========================================
plugin name               module                      concern
========================  ==========================  ==========================================
``qemu``                  ``emu_qemu.emulator``       the ``qemu`` kind, properties, settings
``qemu.binary``           ``emu_qemu.binary``         QEMU binary, platform, version
``qemu.accel``            ``emu_qemu.kvm``            KVM probe, ``-accel``
``qemu.machine``          ``emu_qemu.machine``        name, uuid, memory, CPUs, no defaults
``qemu.boot``             ``emu_qemu.boot``           boot order, BIOS, kernel, initrd
``qemu.disks``            ``emu_qemu.disks``          drives, linked clones
``qemu.network``          ``emu_qemu.network``        NICs, NIOs, link state
``qemu.console``          ``emu_qemu.console``        console and auxiliary console: telnet /
                                                      VNC / SPICE
``qemu.process``          ``emu_qemu.process``        launch, QMP, stop, suspend, resume, reload
``qemu.priority``         ``emu_qemu.priority``       process priority
``qemu.throttle``         ``emu_qemu.throttle``       CPU quota by cgroup, or cpulimit
``qemu.capture``          ``emu_qemu.capture``        pcap capture with filter-dump
``qemu.options``          ``emu_qemu.options``        the user's extra options
``qemu.uefi``             ``emu_qemu.uefi``           OVMF firmware, the node's UEFI variables
``qemu.tpm``              ``emu_qemu.tpm``            swtpm, the guest's TPM
``qemu.savestate``        ``emu_qemu.savestate``      save the VM's state at stop, restore it
``qemu.diskimages``       ``emu_qemu.diskimages``     create, resize, delete node disk images
``qemu.checksums``        ``emu_qemu.checksums``      md5 of the node's images (node info)
========================  ==========================  ==========================================

Helper modules that register no hooks: :mod:`emu_qemu.contract` (what the pieces share),
``qemuopts``, ``qemuimg``, ``images``, ``chain``, ``userargs``, ``guestcid``,
``optionpolicy``, ``properties``, ``positions``, ``qmp``, ``qemubinary``, ``cpulimit``.
"""
