"""The streaming engine: a plan made from headers (plan.py), the graph evaluated per key or
slice (evaluate.py), units scheduled within a byte budget (schedule.py), and the output written
in place (run.py). Internal: plugins use ``mecha_core.kit``."""
