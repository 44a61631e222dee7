"""Flower's phone-home features off by default, before any Flower module reads them.

Flower reads these variables at import time, so every fedtune package imports this module
from its `__init__`. An operator who exports a different value keeps it.
"""

import logging
import os

FLOWER_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",  # telemetry is on unless disabled
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # every Flower process would query flower.ai
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # the SuperLink would `uv sync` each run
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # silences a Ray FutureWarning at every simulation start
}

for _name, _value in FLOWER_DEFAULTS.items():
    os.environ.setdefault(_name, _value)


def quiet_flower(level: int = logging.ERROR) -> None:
    """Keep Flower's per-round lines out of a progress display; fedtune reports failures itself."""
    logging.getLogger("flwr").setLevel(level)
