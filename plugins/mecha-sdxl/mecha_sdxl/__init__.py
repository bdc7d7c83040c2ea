"""mecha-sdxl plugin."""
