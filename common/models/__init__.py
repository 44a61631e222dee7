"""The models every party shares, one module per job, the way peft splits its tuners.

- `kinds`: which module implements a job's `model.task` (a new model kind is a new module there).
- `encoder`: BERT-family sentence encoder + LoRA + linear head (`task = "classification"`).
- `decoder`: causal language model + LoRA, loss on response tokens (`task = "causal_lm"`).
- `features`: the frozen lower part of a model, run once per party and cached on disk.
- `transport`: the trainable weights as they travel between parties.
- `export`: the final model as a portable peft folder.
- `loading`, `device`: model folders, tokenizers, devices.

Every kind module offers `build_model`, `encode`, `UpperStack` (per-record loss on cached
features), `evaluate` and `samples`, so the trainer, the round and the coordinator never branch on the kind.
"""
