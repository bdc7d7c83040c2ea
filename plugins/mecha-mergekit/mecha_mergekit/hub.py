"""Models a mergekit config names by Hugging Face id, found in the local hub cache (never
downloaded): ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``, in the
hub's layout ``models--ORG--NAME/snapshots/REVISION/``."""

from __future__ import annotations

import os


def hub_cache() -> str:
    """The hub cache folder the ``huggingface_hub`` library would use."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def cached_snapshot(model_id: str, revision: str | None = None) -> str | None:
    """The snapshot folder of ``model_id`` (``org/name``) in the hub cache: the revision asked
    for, else the one ``refs/main`` names, else the only one; ``None`` when not cached."""
    if model_id.count("/") != 1 or model_id.startswith((".", "/")):
        return None
    repo = os.path.join(hub_cache(), "models--" + model_id.replace("/", "--"))
    snapshots = os.path.join(repo, "snapshots")
    if not os.path.isdir(snapshots):
        return None
    wanted = revision or "main"
    ref = os.path.join(repo, "refs", wanted)
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as fh:
            wanted = fh.read().strip()
    if os.path.isdir(os.path.join(snapshots, wanted)):
        return os.path.join(snapshots, wanted)
    found = sorted(os.listdir(snapshots))
    if revision is None and len(found) == 1:
        return os.path.join(snapshots, found[0])
    return None
