"""Entry point of the mecha-lora plugin: only hook implementations live here."""

MECHA_PLUGIN_API = 1
