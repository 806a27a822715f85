"""Training: DPO (BPO) and the SFT baseline on preference pairs.

Pipeline: `batch` encodes pairs (prompt with image tokens, chosen ids, rejected ids) and collates
them; `logprobs` scores both answers with one image+prompt encoding per pair; `losses` turns
summed log-probs into DPO/IPO/hinge (+ RPO) losses; `refs` precomputes the frozen reference's
log-probs; `trainer` is the accelerate loop behind `bpo train`.
"""
