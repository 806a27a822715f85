"""How `bpo` rewrites its arguments before jsonargparse reads them: a recipe's sections as
`--config`, and list positionals (`compare RUN RUN...`, `merge OUT SHARD...`) as JSON lists."""

from __future__ import annotations

import json
from pathlib import Path

from bpo.rounds.config import recipe_config


def _compare_args(args: list[str]) -> list[str]:
    """`compare RUN RUN...` and `merge OUT SHARD...` as jsonargparse reads a list positional."""
    verb, rest = args[:1], args[1:]
    if verb == ["compare"] and rest and not any(a.startswith(("-", "[")) for a in rest):
        return ["compare", json.dumps(rest)]
    if verb == ["merge"]:
        positional, flags, i = [], [], 0
        while i < len(rest):
            if rest[i].startswith("-"):
                # A flag's value ("--overwrite true") stays with the flag.
                takes_value = "=" not in rest[i] and rest[i + 1 : i + 2] in (["true"], ["false"])
                flags += rest[i : i + 1 + takes_value]
                i += 1 + takes_value
            else:
                positional.append(rest[i])
                i += 1
        if len(positional) >= 2 and not positional[1].startswith("["):
            return ["merge", *flags, positional[0], json.dumps(positional[1:])]
    return args


# The section of a recipe (configs/llava-1.5-*-bpo.yaml) each verb reads.
RECIPE_SECTIONS = {
    "bootstrap": "bootstrap",
    "refs": "train",
    "train": "train",
    "eval": "eval",
    "iterate": "rounds",  # with the bootstrap, train and eval sections (`_recipe_config`)
}


def _recipe_args(args: list[str]) -> list[str]:
    """`VERB --recipe FILE` as `VERB --config SECTION`: the recipe's section for VERB, as JSON.

    Each section is exactly what the verb's `--config` reads, so flags after `--recipe` override
    it the same way, and `--print_config` shows the stage's resolved config.
    """
    if not args or args[0] not in RECIPE_SECTIONS:
        return args
    verb, section, out, i = args[0], RECIPE_SECTIONS[args[0]], [args[0]], 1
    while i < len(args):
        arg = args[i]
        if arg.startswith("--recipe="):
            path, i = arg.partition("=")[2], i + 1
        elif arg == "--recipe":
            path, i = " ".join(args[i + 1 : i + 2]), i + 2
        else:
            out.append(arg)
            i += 1
            continue
        out += ["--config", json.dumps(_recipe_config(Path(path), verb, section))]
    return out


def _recipe_config(path: Path, verb: str, section: str) -> dict:
    """The verb's section; for `iterate`, every stage's section and `rounds:` as one config."""
    if verb != "iterate":
        return _recipe_section(path, verb, section)
    names = ("bootstrap", "train", "eval", section)
    return recipe_config({name: _recipe_section(path, verb, name) for name in names})


def _recipe_section(path: Path, verb: str, section: str) -> dict:
    import yaml

    if not path.is_file():
        raise SystemExit(
            f"bpo {verb}: --recipe {str(path)!r} is not a file; pass a recipe such as configs/llava-1.5-7b-bpo.yaml"
        )
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))  # anchors (&pairs, *pairs) resolved
    if not isinstance(recipe, dict) or not isinstance(recipe.get(section), dict):
        sections = ", ".join(recipe) if isinstance(recipe, dict) else "none"
        raise SystemExit(
            f"bpo {verb}: recipe {path} has no `{section}:` section (it has: {sections}); "
            f"`bpo {verb}` reads the `{section}:` section"
        )
    return recipe[section]
