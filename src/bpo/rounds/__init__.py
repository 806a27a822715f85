"""On-policy BPO rounds (`bpo iterate`): bootstrap from the last policy, train, evaluate, repeat.

- `config`: the schema (`RoundsSettings`, `IterateConfig`) and its checks, importable without
  torch;
- `stages`: each round's bootstrap, train and eval configs, derived from the stage sections;
- `pairs`: a round's pair store when it joins its weakened pairs with round 1's injected ones;
- `select`: the metric lookup in results.json and the choice of the best round;
- `run`: `run_rounds`, the resumable loop behind `bpo iterate`.
"""
