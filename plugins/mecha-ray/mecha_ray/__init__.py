"""mecha-ray: ``mecha merge --executor ray`` runs a merge's keys as Ray tasks (see docs/distributed.md)."""
