"""The names of the files in a coordinator's run folder: written by server/report.py and the
ServerApp, read by the console (server/console/) and `fedtune-sim`. No imports, so readers stay light."""

METRICS_FILE = "metrics.json"  # the finished job's numbers; its presence means the job ended
LIVE_FILE = "live.json"  # metrics.json's shape, rewritten after every round while the job runs
PRIVACY_FILE = "privacy.json"
PROGRESS_FILE = "progress.jsonl"  # simulation only: the institutions' step events
