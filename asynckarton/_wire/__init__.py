"""(layer package; see asynckarton/__init__.py)."""
