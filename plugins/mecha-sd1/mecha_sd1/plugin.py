"""Entry point of the mecha-sd1 plugin: only hook implementations live here."""

MECHA_PLUGIN_API = 1
