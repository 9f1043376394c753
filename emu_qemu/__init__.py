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
``qemu.console``          ``emu_qemu.console``        telnet / VNC / SPICE console
``qemu.process``          ``emu_qemu.process``        launch, QMP, stop, suspend, resume, reload
``qemu.priority``         ``emu_qemu.priority``       process priority
``qemu.throttle``         ``emu_qemu.throttle``       CPU quota by cgroup, or cpulimit
``qemu.capture``          ``emu_qemu.capture``        pcap capture with filter-dump
``qemu.options``          ``emu_qemu.options``        the user's extra options
========================  ==========================  ==========================================
"""
