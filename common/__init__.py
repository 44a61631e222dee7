"""Code shared by the coordinator (server/) and the institutions (client/)."""
