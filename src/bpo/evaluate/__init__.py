"""Hallucination metrics and the `bpo eval` stage that runs the benchmarks.

- `chair`: CHAIR scores and COCO ground truth; `pope`: POPE questions, answer parsing, metrics;
- `judges`: the judge prompts, reply parsers and scores of MM-Vet, LLaVA-Bench, judged objects;
- `datasets`: the COCO-based and judged benchmarks' readers (release folders, Hugging Face ids);
- `amber` (+ `amber_match`: noun extraction and similarity): AMBER's generative and
  discriminative tasks; `mmhal`: MMHal-Bench (judge ratings 0-6);
- `shapeworld`: the ShapeWorld benchmarks (readers, CHAIR scorer, `hallucination_metrics`);
- `scores`: the scorers, one skeleton for the judged benchmarks;
- `benchmarks`: `BenchmarkConfig` and the table from a benchmark's name to its reader and scorer;
- `config`: the schema of a run (`EvalConfig`) and `check_config`;
- `answers`: the answers cache (stored answers reused, missing ones generated);
- `run`: `run_eval` (results.json, results.md) and `compare_runs` (`bpo compare`).
"""
