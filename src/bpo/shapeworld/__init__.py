"""ShapeWorld, the dataset: scenes with exact ground truth, their export, their metrics.

- `world`: scenes, rendering, captions, questions and the text prior;
- `export`: a LLaVA-format dataset (images, data.json) with the scenes beside it;
- `metrics`: how much of a hallucination the text prior explains (the partner share).
"""
