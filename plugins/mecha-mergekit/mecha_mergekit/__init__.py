"""mecha-mergekit: mergekit YAML configs read as mecha recipes, merged with mergekit's semantics."""
