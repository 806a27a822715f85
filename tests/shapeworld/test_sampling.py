"""The two samplers: unbiased image scenes and prior-biased text scenes."""

import numpy as np

from bpo.shapeworld.world import (
    TYPICAL_COLOUR,
    WorldConfig,
    sample_scene,
    sample_text_scene,
)

SIX = ("circle", "square", "triangle", "diamond", "cross", "ring")
PAIRS = {
    "circle": "square",
    "square": "circle",
    "triangle": "diamond",
    "diamond": "triangle",
    "cross": "ring",
    "ring": "cross",
}


def config(**overrides) -> WorldConfig:
    """Explicit shapes, partners and sizes, so retuned defaults do not move these tests."""
    values = dict(
        grid=3,
        cell_size=4,
        min_objects=2,
        max_objects=5,
        faint_prob=0.5,
        faint_alpha=(0.2, 0.3),
        solid_alpha=(0.7, 0.9),
        shapes=SIX,
        partners=dict(PAIRS),
    )
    return WorldConfig(**{**values, **overrides})


def test_sample_scene_objects_obey_the_config():
    """500 scenes on a 3x3 grid with 2..5 objects: shapes distinct, cells distinct and on the
    grid, count in [2, 5] (each value seen), colours from cfg.colours, alpha in the faint range
    [0.2, 0.3] or the solid range [0.7, 0.9] (both seen, faint_prob = 0.5), objects in
    (shape order, row, col) order, scene.grid = 3."""
    cfg = config()
    rng = np.random.default_rng(7)
    counts, faint, solid = set(), 0, 0
    for _ in range(500):
        scene = sample_scene(rng, cfg)
        objects = scene.objects
        counts.add(len(objects))
        assert scene.grid == 3
        assert len({o.shape for o in objects}) == len(objects)
        assert len({(o.row, o.col) for o in objects}) == len(objects)
        assert all(0 <= o.row < 3 and 0 <= o.col < 3 for o in objects)
        assert all(o.colour in cfg.colours for o in objects)
        assert [SIX.index(o.shape) for o in objects] == sorted(SIX.index(o.shape) for o in objects)
        for o in objects:
            assert 0.2 <= o.alpha <= 0.3 or 0.7 <= o.alpha <= 0.9, o
            faint += o.alpha <= 0.3
            solid += o.alpha >= 0.7
    assert counts == {2, 3, 4, 5}
    assert faint > 0 and solid > 0


def test_sample_scene_is_deterministic_given_the_rng_seed():
    cfg = config()
    first = [sample_scene(np.random.default_rng(3), cfg) for _ in range(2)]
    again = [sample_scene(np.random.default_rng(3), cfg) for _ in range(2)]
    assert first == again
    assert sample_scene(np.random.default_rng(4), cfg) != first[0]


def test_text_scene_with_full_prior_is_always_a_pair_of_partners():
    """min = max = 2, prior_strength = 1: one shape is drawn and its partner always follows, so
    every text scene is exactly {s, partner(s)}. With max = 1 there is no room for the partner:
    the scene stays a single shape (never more than max_objects)."""
    cfg = config(min_objects=2, max_objects=2, prior_strength=1.0)
    rng = np.random.default_rng(11)
    for _ in range(300):
        scene = sample_text_scene(rng, cfg)
        assert len(scene.objects) == 2
        first = scene.objects[0].shape
        assert scene.shapes == {first, PAIRS[first]}
    single = config(min_objects=1, max_objects=1, prior_strength=1.0)
    assert all(len(sample_text_scene(rng, single).objects) == 1 for _ in range(100))


def test_text_scene_with_full_prior_has_every_partner_present():
    """prior_strength = 1, 2..4 objects: shapes arrive in partner pairs while there is room, so
    n = 1 or 2 gives 2 objects and n = 3 or 4 gives 4 (max_objects = 4 leaves room for every
    partner). Every present shape's partner is present."""
    cfg = config(min_objects=1, max_objects=4, prior_strength=1.0)
    rng = np.random.default_rng(12)
    counts = set()
    for _ in range(1000):
        scene = sample_text_scene(rng, cfg)
        counts.add(len(scene.objects))
        assert all(PAIRS[s] in scene.shapes for s in scene.shapes), scene
        assert [SIX.index(o.shape) for o in scene.objects] == sorted(
            SIX.index(s) for s in scene.shapes
        )
    assert counts == {2, 4}


def test_text_scene_without_prior_has_partners_at_the_independent_rate():
    """prior_strength = 0: the text scene is a uniform n-subset of the K = 6 shapes, n uniform on
    1..4. Given a present shape, its partner is one of the other n - 1 present shapes out of K - 1,
    so the rate (partners present / shapes present) tends to
        E[n(n-1)] / ((K-1) E[n]) = ((0 + 2 + 6 + 12) / 4) / (5 * 2.5) = 5 / 12.5 = 0.4.
    3000 scenes hold ~7500 shapes; the binomial standard error is sqrt(0.4 * 0.6 / 7500) ~ 0.006,
    and pairs within a scene are correlated, so the tolerance is a generous 0.03 (~5 SE). The
    default prior (0.95) would give a rate near 1, far outside it. No partner ever overflows:
    counts stay within 1..4."""
    cfg = config(min_objects=1, max_objects=4, prior_strength=0.0)
    rng = np.random.default_rng(2024)
    present = with_partner = 0
    for _ in range(3000):
        scene = sample_text_scene(rng, cfg)
        assert 1 <= len(scene.objects) <= 4
        present += len(scene.objects)
        with_partner += sum(PAIRS[s] in scene.shapes for s in scene.shapes)
    assert abs(with_partner / present - 0.4) < 0.03


def test_text_scene_with_full_colour_prior_uses_typical_colours():
    """colour_prior = 1: every object gets its shape's typical colour; objects sit in distinct
    cells of the grid (for grid descriptions) with alpha 1 (text has no pixels)."""
    cfg = config(colour_prior=1.0)
    rng = np.random.default_rng(5)
    for _ in range(200):
        scene = sample_text_scene(rng, cfg)
        cells = [(o.row, o.col) for o in scene.objects]
        assert len(set(cells)) == len(cells)
        for o in scene.objects:
            assert o.colour == TYPICAL_COLOUR[o.shape]
            assert 0 <= o.row < cfg.grid and 0 <= o.col < cfg.grid and o.alpha == 1.0
