"""Flower's phone-home features off by default, and Hugging Face's hub off always, before any
Flower or Hugging Face module reads them.

Both read these variables at import time, so every fedtune package imports this module from its
`__init__`. An operator who exports a different Flower value keeps it; the hub stays off whatever
is exported: a model name in a job must never make an institution fetch code or weights.
"""

import logging
import os

FLOWER_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",  # telemetry is on unless disabled
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # every Flower process would query flower.ai
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # the SuperLink would `uv sync` each run
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # silences a Ray FutureWarning at every simulation start
}

# Forced, not defaults: transformers and huggingface_hub read them at import time.
HUB_OFF = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

for _name, _value in FLOWER_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
os.environ.update(HUB_OFF)

# Flower's logger prints through its own handler. Opacus calls logging.basicConfig() when it is
# imported, so a root handler would print every Flower line a second time (timestamped, DEBUG
# included): in a ServerApp's log that `fedtune-server submit`/`follow` stream, every line twice.
logging.getLogger("flwr").propagate = False


def quiet_flower(level: int = logging.ERROR) -> None:
    """Keep Flower's per-round lines out of a progress display; fedtune reports failures itself."""
    logging.getLogger("flwr").setLevel(level)
