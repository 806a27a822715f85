"""Tiny models of every family for tests: the text their tokenizers learn, built once per run."""

from __future__ import annotations

import itertools
from pathlib import Path

from bpo.models.tiny_families import build_tiny_family
from bpo.models.tiny_families.common import save_family

COLOURS = ["red", "blue", "green", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle"]
PROMPTS = ["Describe the image.", "What is in the image?", "How many shapes are there?"]
# ~50 short captions plus the prompts: enough text for a 512-token BPE vocabulary.
TEXTS = [
    f"a {c1} {s1} and a {c2} {s2} ."
    for (c1, s1), (c2, s2) in itertools.islice(
        itertools.combinations(itertools.product(COLOURS, SHAPES), 2), 50
    )
] + PROMPTS


class TinyFamilyFolders:
    """`folders(name)` -> the folder of family `name`'s tiny model (`bpo.models.tiny_families`),
    built from TEXTS (seed 0) and saved on first use; `folders.built[name]` is (model, processor)
    as built, before saving."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[str, tuple] = {}
        self._folders: dict[str, Path] = {}

    def __call__(self, name: str) -> Path:
        if name not in self._folders:
            model, processor = build_tiny_family(name, TEXTS, seed=0)
            self.built[name] = (model, processor)
            self._folders[name] = save_family(model, processor, self.root / name)
        return self._folders[name]
