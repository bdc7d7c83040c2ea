"""mecha-lora plugin."""
