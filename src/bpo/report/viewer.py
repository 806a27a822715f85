"""`bpo view`: a static HTML page to read preference pairs side by side.

Every piece of text on the page (prompts, answers, meta, ids, error messages) goes through
`html.escape`: pairs hold model output, and model output must never become markup. Images are
embedded as small PNG data URIs so the page is one self-contained file; each is resolved under
the image root (the one given, else the one the store records) and decoded within
`max_image_pixels` first, and one that cannot be shown is named on the page and counted.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import islice, zip_longest
from pathlib import Path

from bpo.data.images import ImageError, check_image, load_image
from bpo.data.records import PreferencePair
from bpo.data.store import image_root_for, open_store, read_pairs

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


def _thumbnail(pair: PreferencePair, image_root: Path, size: int) -> str:
    """The pair's image as an <img> (a PNG data URI); ImageError when it cannot be shown."""
    # check_image first: its messages name the path as written and the root to fix.
    image = load_image(check_image(image_root, pair.image, decode=False))
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(pair.image)}" src="data:image/png;base64,{data}">'


def _image_cell(
    pair: PreferencePair, image_root: Path | None, size: int
) -> tuple[str, ImageError | None]:
    """The pair's image cell, and the error when its image cannot be shown."""
    if pair.image is None:
        return '<div class="meta">(no image)</div>', None
    if image_root is None:
        return f'<div class="meta">{html.escape(pair.image)}</div>', None
    try:
        return _thumbnail(pair, image_root, size), None
    except ImageError as error:
        return f'<div class="error">{html.escape(str(error))}</div>', error


def _prompt_html(pair: PreferencePair) -> str:
    turns = [f"<b>{html.escape(m['role'])}:</b> {html.escape(m['content'])}" for m in pair.prompt]
    return "<br>".join(turns)


def _card(pair: PreferencePair, image_cell: str) -> str:
    meta = {"source": pair.source, **pair.meta}
    return (
        '<div class="pair">'
        f'<div class="meta">{html.escape(pair.id)} · {html.escape(json.dumps(meta))}</div>'
        f'<div class="row">{image_cell}<div style="flex:1">'
        f"<p>{_prompt_html(pair)}</p>"
        '<div class="answers">'
        f'<div class="answer chosen"><b>chosen</b><br>{html.escape(pair.chosen)}</div>'
        f'<div class="answer rejected"><b>rejected</b><br>{html.escape(pair.rejected)}</div>'
        "</div></div></div></div>"
    )


def pair_html(pair: PreferencePair, image_root: Path | None, size: int = 256) -> str:
    """One pair: image, prompt, chosen and rejected side by side, source and meta.

    With `image_root` None the image's path is shown as text; nothing is read.
    """
    return _card(pair, _image_cell(pair, image_root, size)[0])


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


def _cards(
    pairs: list[PreferencePair], image_root: Path | None, log: Callable[[str], None]
) -> tuple[str, Counter[str]]:
    """The pairs' HTML, and the reasons of the images that cannot be shown (each `log`ged)."""
    cards, bad = [], Counter()
    for pair in pairs:
        cell, error = _image_cell(pair, image_root, 256)
        if error is not None:
            bad[error.reason] += 1
            log(f"pair {pair.key}: {error}")
        cards.append(_card(pair, cell))
    return "".join(cards), bad


def write_pair_viewer(
    pairs_dir: str | Path,
    out: str | Path,
    image_root: str | Path | None = None,
    limit: int = 500,
    allow_incomplete: bool = False,
    log: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """Write an HTML page with up to `limit` pairs of a store, every source and noise step in
    turn (see `spread_pairs`); returns its path.

    Args:
        image_root: the folder the pairs' image paths are relative to; None: the one the store
            records (its bootstrap's image_root, or its data file's folder).
        allow_incomplete: show a store whose run did not finish.
        log: told the message of each image that cannot be shown (the page counts them).
    """
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}: it is how many pairs to show")
    pairs_dir, out = Path(pairs_dir), Path(out)
    manifest = open_store(pairs_dir, allow_incomplete)
    shown = spread_pairs(read_pairs(pairs_dir), limit)
    # The root is needed only when a pair shown has an image: a text-only store needs none.
    root = None
    if any(p.image is not None for p in shown):
        root = image_root_for(pairs_dir, manifest, image_root)
    body, bad = _cards(shown, root, log)
    unusable = ""
    if bad:
        unusable = f" · {sum(bad.values())} of {len(shown)} pairs shown have an unusable image"
        unusable += f" ({html.escape(json.dumps(dict(bad)))})"
    counts = manifest.get("counts", {})
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>bpo pairs: {html.escape(str(pairs_dir))}</title><style>{STYLE}</style></head>"
        f"<body><h1>Preference pairs</h1><p class='meta'>{html.escape(str(pairs_dir))} · "
        f"{html.escape(json.dumps(counts))} · up to {limit} shown, each source and noise step in "
        f"turn{unusable}</p>{body}</body></html>"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
