"""Entry point of the mecha-sdxl plugin: only hook implementations live here."""

MECHA_PLUGIN_API = 1
