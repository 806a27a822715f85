"""Bootstrapping negatives from the model itself, into a resumable pair store.

- `config`: the `bpo bootstrap` schema (weaken, inject, sharding, backend), checked up front;
- `weaken`: the model's answers from its noised image (the diffusion forward process is
  `bpo.models.noise`; generation goes through `bpo.generate`);
- `inject`: error-injected rewrites of the gold answer (validation, lexical, rewriters);
- `run`: the stage, `run_bootstrap`, and the merge of sharded runs; `stats`: its summaries.
"""
