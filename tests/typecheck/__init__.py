"""Files that only ``mypy --strict`` runs (pyproject's ``files``): typing promises."""
