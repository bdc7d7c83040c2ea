"""mecha-gguf plugin: GGUF weight files, dequantised on read."""
