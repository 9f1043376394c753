"""Where each VPCS plugin puts its fragment of the command line (``ArgFragment.position``).

A third-party plugin adding options picks a number between these; the startup script is a
positional argument and must stay last.
"""

PROGRAM = 0  # vpcs.binary: the binary itself
INSTANCES = 10  # vpcs.process: -i 1 (one VPC, in the foreground)
MAC = 20  # vpcs.mac: -m
NETWORK = 30  # vpcs.network: -s, -c, -t
STARTUP_SCRIPT = 100  # vpcs.startup: the script file, always last
