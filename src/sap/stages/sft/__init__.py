"""``sap train-sft`` in parts: paths, checks before training, the LLaMA-Factory arguments, run
state (fingerprint, resume), progress following. :mod:`sap.stages.train_sft` runs them in order."""
