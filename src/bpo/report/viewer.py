"""`bpo view`: a static HTML page to read preference pairs side by side.

Every piece of text on the page (prompts, answers, meta, ids, error messages) goes through
`html.escape`: pairs hold model output, and model output must never become markup. Images are
embedded as small PNG data URIs so the page is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable
from itertools import islice, zip_longest
from pathlib import Path

from bpo.data.images import ImageError, load_image, resolve_image_path
from bpo.data.records import PreferencePair
from bpo.data.store import read_manifest, read_pairs

STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1200px; }
.pair { border: 1px solid #ccc; border-radius: 6px; padding: 0.8em; margin-bottom: 1em; }
.row { display: flex; gap: 1em; align-items: flex-start; }
.answers { display: flex; gap: 1em; flex: 1; }
.answer { flex: 1; padding: 0.5em; border-radius: 4px; white-space: pre-wrap; }
.chosen { background: #e8f5e9; } .rejected { background: #ffebee; }
.meta { color: #555; font-size: 0.85em; } img { image-rendering: pixelated; width: 160px; }
.error { color: #b71c1c; }
"""


def _image_html(pair: PreferencePair, image_root: Path | None, size: int) -> str:
    if pair.image is None:
        return '<div class="meta">(no image)</div>'
    if image_root is None:
        return f'<div class="meta">{html.escape(pair.image)}</div>'
    try:
        image = load_image(resolve_image_path(image_root, pair.image))
    except ImageError as error:
        return f'<div class="error">{html.escape(str(error))}</div>'
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(pair.image)}" src="data:image/png;base64,{data}">'


def _prompt_html(pair: PreferencePair) -> str:
    turns = [f"<b>{html.escape(m['role'])}:</b> {html.escape(m['content'])}" for m in pair.prompt]
    return "<br>".join(turns)


def pair_html(pair: PreferencePair, image_root: Path | None, size: int = 256) -> str:
    """One pair: image, prompt, chosen and rejected side by side, source and meta."""
    meta = {"source": pair.source, **pair.meta}
    return (
        '<div class="pair">'
        f'<div class="meta">{html.escape(pair.id)} · {html.escape(json.dumps(meta))}</div>'
        f'<div class="row">{_image_html(pair, image_root, size)}<div style="flex:1">'
        f"<p>{_prompt_html(pair)}</p>"
        '<div class="answers">'
        f'<div class="answer chosen"><b>chosen</b><br>{html.escape(pair.chosen)}</div>'
        f'<div class="answer rejected"><b>rejected</b><br>{html.escape(pair.rejected)}</div>'
        "</div></div></div></div>"
    )


def _group(pair: PreferencePair) -> tuple[str, str]:
    """What made the negative: its source and, for weakened ones, the noise step."""
    return pair.source, str(pair.meta.get("noise_step", ""))


def spread_pairs(pairs: Iterable[PreferencePair], limit: int) -> list[PreferencePair]:
    """Up to `limit` pairs taken in turn from each (source, noise step) group, in store order.

    A store is written group by group, so its first pairs are all of one kind; taking them in
    turn shows every source and noise step. Holds at most `limit` pairs per group in memory.
    """
    groups: dict[tuple[str, str], list[PreferencePair]] = {}
    for pair in pairs:
        group = groups.setdefault(_group(pair), [])
        if len(group) < limit:
            group.append(pair)
    rounds = zip_longest(*groups.values())
    return list(islice((p for turn in rounds for p in turn if p is not None), limit))


def write_pair_viewer(
    pairs_dir: str | Path,
    out: str | Path,
    image_root: str | Path | None = None,
    limit: int = 500,
) -> Path:
    """Write an HTML page with up to `limit` pairs of a store, every source and noise step in
    turn (see `spread_pairs`); returns its path."""
    pairs_dir, out = Path(pairs_dir), Path(out)
    root = Path(image_root) if image_root is not None else None
    manifest = read_manifest(pairs_dir)
    counts = manifest.get("counts", {})
    body = "".join(pair_html(p, root) for p in spread_pairs(read_pairs(pairs_dir), limit))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>bpo pairs: {html.escape(str(pairs_dir))}</title><style>{STYLE}</style></head>"
        f"<body><h1>Preference pairs</h1><p class='meta'>{html.escape(str(pairs_dir))} · "
        f"{html.escape(json.dumps(counts))} · up to {limit} shown, each source and noise step in turn</p>{body}</body></html>"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
