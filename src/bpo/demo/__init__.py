"""`bpo demo`: the ShapeWorld experiment, end to end through the product's own stages.

- `config`: the schema; `base`, `pretrain`: the base model and its training recipes;
- `stages`: bootstrap, train and eval, each the product's stage configured from the demo;
- `arms`: the SFT and BPO arms as `bpo train` configs; `claim`: what is checked;
- `run`: the run; `report`, `summary`: its report.
"""
