"""Hallucination metrics and benchmark runners.

- `chair`: CHAIR scores and COCO object extraction (synonyms, plurals, phrases, special rules);
- `pope`: POPE question construction, answer parsing and metrics;
- `judge`: an OpenAI-compatible judge client; MM-Vet grading and LLaVA-Bench reviews;
- `datasets`: benchmark readers (local release folders, Hugging Face ids);
- `runner`: `bpo eval` (answers, scores, results.json, results.md) and `bpo compare`.
"""
