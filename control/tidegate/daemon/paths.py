"""Where the agent keeps its state unless told otherwise: read by the
options and, before any of the agent's imports, by early.py (so this
module imports nothing)."""

DEFAULT_STATE_DIR = "/var/lib/tidegate"
