"""The names of the files in a coordinator's run folder: written by server/report.py and the
ServerApp, read by the console (server/console/) and `fedtune-sim`. No imports, so readers stay light."""

METRICS_FILE = "metrics.json"  # the finished job's numbers; its presence means the job ended
LIVE_FILE = "live.json"  # metrics.json's shape, rewritten after every round while the job runs
PRIVACY_FILE = "privacy.json"
PROGRESS_FILE = "progress.jsonl"  # simulation only: the institutions' step events
TENSORBOARD_DIR = "tensorboard"  # event files, when the job asks for them (server/tracking.py)
CHECKPOINT_DIR = "checkpoints"  # server/checkpoint.py: one file per completed round, the newest two kept
JOB_FILE = "job.json"  # whose folder this is: the job id, its sessions (started, resumed), written first
SIMULATION_FILE = "simulation.json"  # fedtune-sim only: where its institutions keep their ledgers, for --resume
IN_FLIGHT_FILE = "in_flight.json"  # the round being exchanged and who was asked (server/checkpoint.py)
