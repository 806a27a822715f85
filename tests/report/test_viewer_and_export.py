"""The pair viewer escapes everything it shows; the TRL export keeps every pair's content."""

from __future__ import annotations

import json

import datasets
import numpy as np
from PIL import Image

from bpo.cli import main
from bpo.data import PairWriter, PreferencePair
from bpo.data.export import trl_record

HOSTILE = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'


def make_store(tmp_path):
    """Two pairs (one with a hostile rejected answer) over one 4x4 image under tmp/images."""
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(root / "a.png")
    store = tmp_path / "pairs"
    pairs = [
        PreferencePair(
            id="s1",
            image="a.png",
            prompt=[{"role": "user", "content": "<image>\nDescribe the image."}],
            chosen="a red circle.",
            rejected=HOSTILE,
            source="weaken",
            meta={"noise_step": 900},
        ),
        PreferencePair(
            id="s2",
            image=None,
            prompt=[{"role": "user", "content": "Say <b>hi</b>"}],
            chosen="hi",
            rejected="bye",
            source="inject",
            meta={"noise_step": 0},
        ),
    ]
    with PairWriter(store, config={"test": True}) as writer:
        for pair in pairs:
            writer.write(pair)
    return store, root, pairs


def test_viewer_escapes_all_text_and_embeds_the_image(tmp_path, capsys):
    store, root, _ = make_store(tmp_path)
    main(["view", str(store), "--image_root", str(root)])
    page = (store / "pairs.html").read_text()
    assert "<script>" not in page and "onerror=alert(1)>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in page
    assert "Say &lt;b&gt;hi&lt;/b&gt;" in page
    assert page.count("data:image/png;base64,") == 1  # s1's image; s2 has none
    assert "&quot;noise_step&quot;: 900" in page


def test_viewer_takes_each_source_and_noise_step_in_turn():
    """A store written group by group (weaken t100 x3, weaken t900 x3, inject x2): a limit of 5
    shows t100, t900, inject, t100, t900 — not the first five pairs, which are one kind."""
    from bpo.report.viewer import spread_pairs

    def pair(i, source, step):
        meta = {"noise_step": step} if step is not None else {}
        return PreferencePair(
            f"p{i}", None, [{"role": "user", "content": "q"}], "a", "b", source=source, meta=meta
        )

    store = [pair(i, "weaken", 100) for i in range(3)]
    store += [pair(i, "weaken", 900) for i in range(3, 6)]
    store += [pair(i, "inject", None) for i in range(6, 8)]
    shown = spread_pairs(store, limit=5)
    assert [p.id for p in shown] == ["p0", "p3", "p6", "p1", "p4"]
    assert [p.id for p in spread_pairs(store, limit=100)] == [
        "p0",
        "p3",
        "p6",
        "p1",
        "p4",
        "p7",
        "p2",
        "p5",
    ]


def test_viewer_reports_an_image_outside_the_root_instead_of_reading_it(tmp_path):
    from bpo.report.viewer import pair_html

    pair = PreferencePair(
        "x", "../secret.png", [{"role": "user", "content": "q"}], "a", "b", "inject"
    )
    text = pair_html(pair, tmp_path)
    assert 'class="error"' in text and "data:image" not in text


def test_trl_record_places_the_image_in_the_first_user_turn(tmp_path):
    _, root, pairs = make_store(tmp_path)
    record = trl_record(pairs[0], root)
    assert record["prompt"] == [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}],
        }
    ]
    assert record["chosen"] == [
        {"role": "assistant", "content": [{"type": "text", "text": "a red circle."}]}
    ]
    assert record["rejected"][0]["content"][0]["text"] == HOSTILE
    assert record["images"] == [str((root / "a.png").resolve())]


def test_export_verb_writes_a_dataset_trl_can_load(tmp_path, capsys):
    store, root, _ = make_store(tmp_path)
    out = tmp_path / "trl"
    main(["export", str(store), str(out), "--image_root", str(root)])
    assert json.loads(capsys.readouterr().out)["rows"] == 2
    dataset = datasets.load_from_disk(str(out))
    assert dataset.column_names == ["id", "prompt", "chosen", "rejected", "images", "source"]
    first = dataset[0]
    assert first["id"] == "s1" and first["source"] == "weaken"
    assert first["images"][0].size == (4, 4)
    assert first["rejected"][0]["content"][0]["text"] == HOSTILE
    assert dataset[1]["images"] == []
