"""mecha-sd1 plugin."""
