"""Training: DPO (BPO) and the SFT baseline on preference pairs.

Pipeline: `config` is the schema (checked before anything loads); `batch` encodes pairs (prompt
with image tokens, chosen ids, rejected ids) and collates them; `logprobs` scores both answers
with one image+prompt encoding per pair; `losses` turns summed log-probs into DPO/IPO/hinge
(+ RPO) losses; `data` selects, loads and batches the pairs and scores them under the frozen
reference; `fingerprint` and `refs` key and cache those reference log-probs in the pair store;
`model` sets up what trains, `checkpoint` saves and resumes, `distributed` holds the accelerate
glue; `run` is the trainer and `train`, the entry point behind `bpo train`.
"""
