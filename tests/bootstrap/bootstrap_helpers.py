"""Helpers the bootstrap-run tests share: a run's config, scripted data and a scripted engine."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from bpo.bootstrap.config import BootstrapConfig, InjectConfig, WeakenConfig
from bpo.models.load import ModelConfig


def config_for(model_dir: Path, data: Path, out: Path, **changes) -> BootstrapConfig:
    config = BootstrapConfig(
        model=ModelConfig(
            str(model_dir), dtype="float32", device="cpu", attn_implementation="eager"
        ),
        data=str(data),
        out=str(out),
        weaken=WeakenConfig(max_new_tokens=8, temperature=1.0, seed=3),
        inject=InjectConfig(kind="lexical", vocabulary="shapeworld", seed=5),
        batch_size=4,
        chunk_size=4,
    )
    return replace(config, **changes)


class ScriptedEngine:
    """A vLLM stand-in that answers each weakened prompt (one with image embeddings) with the
    answer its question is mapped to, and each text-only prompt (a rewrite) with `rewrite`."""

    def __init__(self, tokenizer, weakened: dict[str, str], rewrite: str):
        self.tokenizer, self.weakened, self.rewrite = tokenizer, weakened, rewrite

    def generate(self, prompts, sampling_params, use_tqdm=True):
        outputs = []
        for prompt in prompts:
            if "multi_modal_data" in prompt:
                text = next(a for q, a in self.weakened.items() if q in prompt["prompt"])
            else:
                text = self.rewrite
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.append(self.tokenizer.eos_token_id)
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids)]))
        return outputs


def scripted_data(tmp_path, script):
    """A LLaVA data file whose record r{i} asks script[i]'s question of one red image."""
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "img.png")
    rows = [
        {
            "id": f"r{i}",
            "image": "img.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": gold},
            ],
        }
        for i, (question, gold, _) in enumerate(script)
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    return data
