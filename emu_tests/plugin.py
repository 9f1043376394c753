"""The ``emu`` pytest plugin (entry point ``pytest11``); fixtures arrive with later work."""
