"""emu's pytest plugin and test helpers: fixtures for plugin authors, a tiny bootable guest."""
