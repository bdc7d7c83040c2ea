"""mecha-flux plugin: Flux.1 dev and schnell."""
