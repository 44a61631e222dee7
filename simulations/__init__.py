"""fedtune: see README.md."""

import common.flower_env  # noqa: F401  (Flower settings before any Flower import)
