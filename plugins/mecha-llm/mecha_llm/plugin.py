"""Entry point of the mecha-llm plugin: only hook implementations live here.

Provides the architecture families llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, mixtral
(from config.json's ``model_type``) and ``decoder`` (any ``model.layers.N.`` layout none of them
claims); see :mod:`mecha_llm.families` for their blocks and classes.
"""

from mecha_core import hookimpl

from . import families

MECHA_PLUGIN_API = 1


@hookimpl
def mecha_architecture_families():
    return families.families()
