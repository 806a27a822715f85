"""`bpo --help` and every verb's `--help` import no heavy library: the CLI starts fast.

Every verb's schema is built for `bpo --help`, so one config module that imports torch at its top
costs every invocation several seconds. Each check runs in a fresh interpreter (a test process has
torch loaded already) and reads `sys.modules` after the help is printed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bpo.cli import _verbs

HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate", "trl", "vllm", "ray")

PROBE = """
import json, sys
from bpo.cli import main
try:
    main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def _help_imports(*args: str) -> dict:
    source = f"HEAVY = {HEAVY!r}\n{PROBE}"
    result = subprocess.run(
        [sys.executable, "-c", source, *args], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_top_level_help_imports_nothing_heavy():
    probe = _help_imports("--help")
    assert probe == {"code": 0, "heavy": []}


@pytest.mark.parametrize("verb", sorted(_verbs()))
def test_each_verbs_help_imports_nothing_heavy(verb):
    probe = _help_imports(verb, "--help")
    assert probe == {"code": 0, "heavy": []}


def test_the_lazy_package_exports_still_resolve():
    """`from bpo.models import ...` resolves on first use, to the defining module's object."""
    import bpo.data
    import bpo.generate
    import bpo.models
    from bpo.generate.load import load_generator
    from bpo.models.load import load_model_and_processor

    assert bpo.models.load_model_and_processor is load_model_and_processor
    assert bpo.generate.load_generator is load_generator
    for package in (bpo.data, bpo.generate, bpo.models):
        assert set(package.__all__) <= set(dir(package))
        for name in package.__all__:
            assert getattr(package, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        bpo.models.nonexistent  # noqa: B018
