"""mecha plugin for decoder-only language models: architecture families computed from a file's
header and its config.json (see :mod:`mecha_llm.families`)."""
