"""mecha-methods: the standard merge-method library, a mecha plugin like any other."""
