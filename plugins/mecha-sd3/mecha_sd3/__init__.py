"""mecha-sd3 plugin."""
