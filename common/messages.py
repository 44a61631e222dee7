"""What the coordinator and the institutions say to each other, in Flower's records.

Both sides import these names, so a key is spelled once. Train replies carry the
institution's updated trainable weights and a `MetricRecord` of what it released.
"""

# Keys of the train reply's MetricRecord.
NUM_EXAMPLES = "num-examples"  # the key Flower's strategies weight by
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

# Record names in a train reply (beside Flower's "arrays" and "metrics").
INFO = "info"  # ConfigRecord with the institution's name and accountant
INSTITUTION = "institution"
ACCOUNTANT = "accountant"

# An institution that declines a round (budget spent) fails it with this marker, its name in
# brackets, and the reason; the coordinator logs it and carries on with the others.
DECLINED = "fedtune-declined"

# Keys of the train instruction's ConfigRecord (beside Flower's own "server-round").
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"

