"""sd-mecha 0.0.x dict hyperparameters (``sd1_unet_block_in2=0.75 ...``) as mecha block/class maps.

The translation goes through the architecture plugin (aliases, component aliases, blocks and
classes of every key) and is checked key by key; see docs/recipe-format.md.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Callable

import attrs

from mecha_core.errors import RecipeError
from mecha_core.kit import WeightMap, blocks, classes


def era_a_dict(entries: dict[str, Any], host: Any, fail: Callable[[str], RecipeError]) -> WeightMap:
    """An sd-mecha 0.0.x hyperparameter dict as a mecha block/class map.

    sd-mecha gives a key the mean of its matching block and class entries, else its component's
    ``_default``, else 0. mecha maps consult block entries, then class entries, then the map's
    default. The conversion translates names through the architecture (aliases such as ``sd1``,
    component aliases such as ``txt``) and builds ``blocks(...) | classes(...)`` with one
    default, plus a class map carrying the other components' defaults (through the classes only
    they have); then it checks every key of the merged components gets the value sd-mecha's rule
    gives it. Where no such map can, the error names the first key that differs.
    """
    parsed: list[tuple[str, str, str | None, Any]] = []  # (component alias, kind, name, value)
    arch_alias = None
    for key, value in entries.items():
        m = re.fullmatch(r"([A-Za-z0-9]+)_([A-Za-z0-9]+)_(?:(default)|(block|class)_(.+))", key)
        if m is None:
            raise fail(f"dict key {key!r} is not ARCH_COMPONENT_default, ARCH_COMPONENT_block_NAME "
                       f"or ARCH_COMPONENT_class_NAME")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"dict value for {key!r} must be a number, got {value!r}")
        if arch_alias is not None and m.group(1) != arch_alias:
            raise fail(f"dict mixes architectures {arch_alias!r} and {m.group(1)!r}")
        arch_alias = m.group(1)
        kind = None if m.group(3) else m.group(4)
        parsed.append((m.group(2), kind or "default", m.group(5), value))
    if arch_alias is None:
        raise fail("an empty dict is not a hyperparameter value")
    try:
        arch = host.architecture(arch_alias)
    except RecipeError:
        raise fail(f"dict hyperparameters name architecture {arch_alias!r}, which no installed plugin "
                   f"provides (or aliases); `mecha info` lists architectures") from None
    components = set(arch.components)

    def component_of(alias: str) -> str:
        name = arch.component_aliases.get(alias, alias)
        if name not in components:
            raise fail(f"{arch.name} has no component {alias!r} (components: {', '.join(sorted(components))})")
        return name

    by_block: dict[str, set[str]] = {}
    by_class: dict[str, set[str]] = {}
    for spec in arch.keys.values():
        for b in spec.blocks:
            by_block.setdefault(b, set()).add(spec.component)
        if spec.klass:
            by_class.setdefault(spec.klass, set()).add(spec.component)

    block_values: dict[str, Any] = {}
    class_values: dict[tuple[str, str], Any] = {}
    written_class: dict[tuple[str, str], str] = {}  # (component, mecha class) -> sd-mecha's class name
    defaults: dict[str, Any] = {}
    for comp_alias, kind, name, value in parsed:
        comp = component_of(comp_alias)
        if kind == "default":
            defaults[comp] = value
        elif kind == "block":
            block_values[_block_name(fail, arch, by_block, comp, comp_alias, name)] = value
        else:
            klass = _class_name(fail, arch, by_class, comp, comp_alias, name)
            class_values[(comp, klass)] = value
            written_class[(comp, klass)] = name
    every_unet_block = [b for b in block_values if re.fullmatch(r"(IN|OUT)\d+|M00", b)]

    # sd-mecha's value for one key, by sd-mecha's own rules where they differ from the
    # architecture's tables; then the candidate mecha map's value is checked against it
    def wanted(key: str, spec: Any) -> Any:
        if ".time_embed." in key:  # sd-mecha lists time_embed under every in*, mid and out* block
            found = [block_values[b] for b in every_unet_block]
        else:
            found = [block_values[b] for b in spec.blocks if b in block_values]
        entry = (spec.component, spec.klass)
        # sd-mecha's class is the key's whole suffix after its block (transformer_blocks_0_attn1_to_k),
        # which may be narrower than the architecture's class (attn1_to_k)
        if spec.klass and entry in class_values and (written_class[entry] == spec.klass
                                                     or _suffix(key).endswith(written_class[entry])):
            found.append(class_values[entry])
        if found:
            return sum(found) / len(found) if len(found) > 1 else found[0]
        return defaults.get(spec.component, 0)

    merged = set(arch.component_aliases.values()) or components  # the components sd-mecha merges
    checked = [(k, s) for k, s in arch.keys.items() if s.component in merged] or list(arch.keys.items())
    # One default for the map: the component default covering the most keys. Other components'
    # defaults become entries for the classes found only in that component.
    component_default = {c: defaults.get(c, 0) for c in {s.component for _, s in checked}}
    counts = Counter(component_default[s.component] for _, s in checked)
    default = max(sorted(counts, key=repr), key=lambda v: counts[v])
    by_component_class = {}
    for klass, comps in sorted(by_class.items()):
        inside = comps & set(component_default)
        if len(inside) == 1 and component_default[next(iter(inside))] != default:
            by_component_class[klass] = component_default[next(iter(inside))]
    # time_embed sits in the architecture's BASE block, which U-Net block entries never name; its
    # own classes carry sd-mecha's mean of the U-Net block entries
    time_classes = {spec.klass: wanted(key, spec) for key, spec in checked
                    if every_unet_block and ".time_embed." in key and spec.klass}
    chain: list[WeightMap] = []
    if block_values:
        chain.append(blocks(arch.name, **block_values))
    if class_values or time_classes:
        chain.append(classes(arch.name, **{**{n: v for (_, n), v in class_values.items()}, **time_classes}))
    if by_component_class:
        chain.append(classes(arch.name, **by_component_class))
    if not chain:
        chain.append(blocks(arch.name))
    result = chain[0]
    for m in chain[1:]:
        result = result | m
    result = attrs.evolve(result, default=default)
    for key, spec in checked:
        want, got = wanted(key, spec), result.resolve(spec.blocks, spec.klass, None)
        if not math.isclose(want, got, rel_tol=0, abs_tol=1e-12):
            raise fail(f"this dict cannot be written as one mecha block/class map: sd-mecha gives key "
                       f"'{key}' {want}, the closest map gives {got} (per-component defaults, keys "
                       f"matching both a block and a class entry, time_embed under a block entry and "
                       f"classes narrower than the architecture's do not carry over); "
                       f"rewrite it with blocks(...)/classes(...)")
    return result


def _suffix(key: str) -> str:
    """A key as sd-mecha names classes: ``.`` as ``_``, without ``weight``/``bias``."""
    return re.sub(r"\.(weight|bias)$", "", key).replace(".", "_")


def _block_name(fail: Callable[[str], RecipeError], arch: Any, by_block: dict[str, set[str]], comp: str,
                alias: str, name: str) -> str:
    """sd-mecha 0.0.x block names (``in3``, ``mid``, ``out11``) as the architecture's blocks."""
    candidates = [name, name.upper()]
    m = re.fullmatch(r"(in|out)(\d{1,4})", name)
    if m:
        candidates.append(f"{m.group(1).upper()}{int(m.group(2)):02d}")
    if name == "mid":
        candidates.append("M00")
    for cand in candidates:
        if by_block.get(cand) == {comp}:
            return cand
    raise fail(f"sd-mecha block '{alias}_block_{name}' has no counterpart among {arch.name}'s blocks "
               f"for component {comp}")


def _class_name(fail: Callable[[str], RecipeError], arch: Any, by_class: dict[str, set[str]], comp: str,
                alias: str, name: str) -> str:
    """sd-mecha 0.0.x class names (``proj_in``, ``transformer_blocks_0_attn1_to_k``) as classes."""
    parts = name.split("_")
    for i in range(len(parts)):  # the longest suffix that is one of the architecture's classes
        cand = "_".join(parts[i:])
        if cand in by_class and comp in by_class[cand]:
            return cand
    raise fail(f"sd-mecha class '{alias}_class_{name}' has no counterpart among {arch.name}'s classes "
               f"for component {comp}")
