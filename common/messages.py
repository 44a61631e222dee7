"""What the coordinator and the institutions say to each other, in Flower's records.

Both sides import these names, so a key is spelled once. Rounds run on Flower's legacy
fit workflow (the only one SecAgg+ works with): a train instruction is a `FitIns` (global weights
+ config), a train reply a `FitRes` whose metrics say what the institution released. Weights
travel as the ordered list of trainable tensors (`common.model.trainable_state`).
"""

# Keys of the train reply's metrics.
INSTITUTION = "institution"
ACCOUNTANT = "accountant"
RECORDS = "records"  # the institution's training records (its FedAvg weight, up to max-weight)
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"  # spent by this job, over all its rounds so far
DATASET_EPSILON = "dataset-epsilon"  # spent on the data set by every job so far, this one included
BUDGET_EPSILON = "budget-epsilon"  # the institution's budget for the data set
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"  # local DP-SGD steps taken in this round
TOTAL_STEPS = "total-steps"  # local DP-SGD steps taken in the whole job so far
MAX_GRAD_NORM = "max-grad-norm"
TRAIN_SECONDS = "train-seconds"
CLIPPED_TO = "update-clipped-to"  # institution-level DP: the L2 bound the update was clipped to

# The legacy records a FitRes travels in (flwr.compat recorddict_compat).
FIT_METRICS = "fitres.metrics"

# An institution that declines a round (budget spent) fails it with this marker, its name in
# brackets, and the reason; the coordinator logs it and carries on with the others.
DECLINED = "fedtune-declined"

# Keys of the train instruction's config.
SERVER_ROUND = "server-round"
MAX_WEIGHT = "max-weight"
PROXIMAL_MU = "proximal_mu"  # Flower's legacy FedProx spelling
