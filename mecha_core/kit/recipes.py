"""Building recipe graphs from another recipe format (the ``mecha_recipe_formats`` hook).

A recipe format's reader turns text into the nodes mecha's own ``.mecha`` reader builds; these
are the constructors and value maps it needs, and the stand-in host for readers given none:

- nodes: ``Node`` (every node), ``ModelNode`` (a model file; ``LayerView``: only some of its
  layers, renumbered, for layer stacking), ``CallNode`` (a method call:
  ``.method.name``, ``.args``, ``.kwargs``), ``Location`` (file, line, column of what a node was
  read from, for errors found later);
- ``call(method, args, kwargs, where=...)`` builds a checked CallNode; ``parameter(name, where=...)``
  a template's hole;
- ``WeightMap``, ``blocks(arch, **values)``, ``classes(arch, **values)``: block-wise and
  class-wise hyperparameter maps (``|`` joins them);
- ``CoreOnly``: the host with only the core's operators; ``RecipeHost``: what a host offers.
"""

from __future__ import annotations

from ..recipe.host import CoreOnly, RecipeHost
from ..recipe.nodes import CallNode, LayerView, Location, ModelNode, Node, call, parameter
from ..recipe.values import WeightMap, blocks, classes

__all__ = ["CallNode", "CoreOnly", "LayerView", "Location", "ModelNode", "Node", "RecipeHost", "WeightMap", "blocks",
           "call", "classes", "parameter"]
