"""Code shared by the coordinator (server/) and the institutions (client/)."""

from common import flower_env  # noqa: F401  (Flower's and Hugging Face's environment, before they load)
