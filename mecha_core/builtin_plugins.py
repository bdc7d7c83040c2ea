"""What each builtin plugin distribution provides, so that a name the user wrote which no
installed plugin knows can say which distribution to install (tests/test_first_contact.py checks
this table against what the installed builtins really provide, so it cannot drift)."""

from __future__ import annotations

#: distribution -> kind -> names (architectures with their aliases, and architecture families). subtract, add, scale and
#: fallback are left out: they are moving into the core, which serves ``a - b`` on its own.
BUILTIN_PROVIDERS: dict[str, dict[str, frozenset[str]]] = {
    "mecha-methods": {"merge method": frozenset({
        "weighted_sum", "n_average", "add_difference", "slerp", "multislerp", "karcher",
        "task_arithmetic", "model_stock", "geometric_median", "ties", "dare_linear", "dare_ties",
        "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "add_cosine_a", "add_cosine_b",
        "train_difference", "add_perpendicular", "crossover", "rotate", "clamp", "pick_component",
        "omit_component", "cast"})},
    "mecha-sd1": {"architecture": frozenset({
        "sd1-ldm", "sd1", "sd1.5", "sd15", "sd1-diffusers", "sd1-kohya", "sd1-diffusers-unet"})},
    "mecha-sdxl": {"architecture": frozenset({
        "sdxl-sgm", "sdxl", "sdxl-kohya", "sdxl-diffusers", "sdxl-diffusers-unet"})},
    "mecha-sd3": {"architecture": frozenset({"sd3-comfyui", "sd3", "sd3-sgm", "sd3.5-medium", "sd35-medium",
                                             "sd3.5m", "sd3.5-large", "sd35-large", "sd3.5l"})},
    "mecha-flux": {"architecture": frozenset({
        "flux-dev", "flux", "flux-1-dev", "flux_dev", "flux-schnell", "flux-1-schnell", "flux_schnell",
        "flux-dev-diffusers", "flux-schnell-diffusers", "flux_family"})},
    "mecha-gguf": {},  # a file format (.gguf), which a recipe never names
    "mecha-lora": {"merge method": frozenset({"apply_lora"}),
                   "model type": frozenset({"kohya-lora", "peft-lora"})},
    # architecture families: recipes name them where they name architectures (maps, arch=)
    "mecha-llm": {"architecture": frozenset({
        "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "decoder"})},
    "mecha-sdmecha": {"recipe format": frozenset({"sd-mecha"}), "merge method": frozenset({
        "sdmecha_train_difference_mask", "sdmecha_add_opposite_mask", "sdmecha_add_strict_opposite_mask",
        "sdmecha_add_difference_masked", "sdmecha_perpendicular_component", "sdmecha_geometric_sum",
        "sdmecha_multiply_quotient", "sdmecha_scale", "sdmecha_model_stock", "sdmecha_ties_sum_extended",
        "sdmecha_ties_sum_with_dropout", "sdmecha_dropout", "sdmecha_crossover", "sdmecha_tensor_sum",
        "sdmecha_top_k_tensor_sum", "sdmecha_rotate"})},
    "mecha-mergekit": {"recipe format": frozenset({"mergekit"}), "merge method": frozenset({
        "mergekit_task_arithmetic", "mergekit_ties", "mergekit_dare_ties", "mergekit_dare_linear",
        "mergekit_breadcrumbs", "mergekit_breadcrumbs_ties", "mergekit_della", "mergekit_della_linear",
        "mergekit_linear", "mergekit_slerp", "mergekit_nuslerp", "mergekit_nearswap", "mergekit_model_stock",
        "mergekit_passthrough", "mergekit_multislerp", "mergekit_karcher", "mergekit_sce", "mergekit_arcee_fusion"})},
    "mecha-ray": {"executor": frozenset({"ray"})},
}

#: the kinds of names the table knows
KINDS = ("merge method", "architecture", "model type", "recipe format", "executor")


def provider_of(kind: str, name: str) -> str | None:
    """The builtin distribution that provides ``name`` (a ``kind`` in :data:`KINDS`), if any."""
    for distribution, provides in BUILTIN_PROVIDERS.items():
        if name in provides.get(kind, ()):
            return distribution
    return None


def install_hint(kind: str, name: str) -> str:
    """``: it is in mecha-methods: pip install mecha-methods`` when a builtin distribution that
    is not installed provides ``name``; else "" (an installed one that was disabled or failed to
    load is reported by the plugin host instead)."""
    from importlib.metadata import PackageNotFoundError, distribution

    provider = provider_of(kind, name)
    if provider is None:
        return ""
    try:
        distribution(provider)
    except PackageNotFoundError:
        return f": it is in {provider}: pip install {provider}"
    return ""
