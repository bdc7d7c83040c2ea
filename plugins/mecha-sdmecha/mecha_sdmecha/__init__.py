"""mecha-sdmecha: reads sd-mecha's ``.mecha`` recipes (1.x and 0.0.x) and provides sd-mecha's own
merge methods where mecha's differ, so such a recipe merges to what sd-mecha gives."""
