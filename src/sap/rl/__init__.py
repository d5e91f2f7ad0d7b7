"""sap's VeRL plugin: code that runs *inside* VeRL's processes (``.venv-rl``).

- :mod:`sap.rl.agent_loop` — the Search-R1 multi-turn agent loop (``sap_search``), registered
  with VeRL's ``verl.experimental.agent_loop`` and configured by ``ppo/agent_loop.yaml``.
- :mod:`sap.rl.reward` — the reward function (exact match of the last ``<answer>``; Search-R1's
  format-aware variant as an option) and the per-trajectory search metrics.
- :mod:`sap.rl.compose` — composes and validates the full VeRL config with VeRL's own Hydra
  files and checks (called by ``sap train-ppo`` as a subprocess in the RL environment).

Only :mod:`sap.rules`, the retriever client and VeRL are imported here. This ``__init__``
imports nothing heavy, so ``pkg://sap.rl.reward`` loads without VeRL.
"""
