"""AMBER: the release read in its layout, the generative and discriminative metrics worked by hand.

The fixture (tests/evaluate/fixtures/amber) is a tiny release in AMBER's own formats: 3 images
described (ids 1-3) and 8 yes/no questions (ids 4-11), with relation.json's associations
dog->puppy, sofa->couch, person->man/woman, grass->ground, car->vehicle, the safe word "sign",
and a vector table where only kitten~cat (cosine 0.949) passes the 0.8 threshold
(kitten~puppy 0.587, cat~puppy 0.301, every other pair 0).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bpo.evaluate import amber
from bpo.evaluate.amber_match import (
    Matcher,
    MatcherUnavailableError,
    NounExtractor,
    build_matcher,
    check_available,
    doc_similarity,
    nltk_extractor,
    vocabulary_lemma,
)

FIXTURES = Path(__file__).parent / "fixtures" / "amber"
DATA = FIXTURES / "data"
VECTORS = f"vectors:{FIXTURES / 'vectors.json'}"
DESCRIPTIONS = {
    "1": "A man and his puppy rest on a couch. A kitten sleeps near the sign, and two frisbees "
    "lie on the floor.",
    "2": "Trees stand on the ground. A vehicle is parked by the bench.",
    "3": "A kitten naps.",
}
YES_NO = {
    "4": "Yes",
    "5": "No.",
    "6": "Yes, there is.",
    "7": "no",
    "8": "No",
    "9": "I think so",
    "10": "Yes",
    "11": "No",
}


def vocabulary() -> amber.AmberVocabulary:
    return amber.read_vocabulary(DATA)


def test_the_release_is_read_in_its_layout(tmp_path):
    """The repository root or its data/ folder; ids, queries, images under the image root."""
    generative = amber.read_generative(str(DATA), image_root=str(tmp_path))
    assert [(i.question_id, i.prompt) for i in generative] == [
        ("1", "Describe this image."),
        ("2", "Describe this image."),
        ("3", "Describe this image."),
    ]
    assert generative[1].image == (tmp_path / "AMBER_2.jpg").resolve()
    assert generative[0].fields == {
        "truth": ["dog", "sofa", "person"],
        "hallu": ["cat", "frisbee", "bird"],
    }
    asked = amber.read_discriminative(str(FIXTURES))  # the root: data/ is found below it
    assert [i.question_id for i in asked] == [str(n) for n in range(4, 12)]
    assert [(i.fields["dimension"], i.fields["part"]) for i in asked[2:8]] == [
        ("existence", None),
        ("attribute", "state"),
        ("attribute", "number"),
        ("attribute", "action"),
        ("relation", None),
        ("relation", None),  # the release's type "relation", counted as relation like the reference
    ]
    only = amber.read_discriminative(str(DATA), dimensions=["relation"])
    assert [i.question_id for i in only] == ["10", "11"]


def test_an_image_outside_the_image_root_is_refused(tmp_path):
    release = tmp_path / "data"
    shutil.copytree(DATA, release)
    queries = release / "query" / "query_generative.json"
    bad = json.loads(queries.read_text())
    bad[1]["image"] = "../secret.jpg"
    queries.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"query_generative\.json item 1: .*outside --image-root"):
        amber.read_generative(str(release), image_root=str(tmp_path / "images"))


def test_a_folder_without_the_release_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no AMBER annotations\.json in"):
        amber.read_generative(str(tmp_path))


def test_the_vocabulary_lemmatizer_keeps_case_and_vocabulary_forms():
    """WordNet's noun rules, shortest known form: frisbees -> frisbee, benches -> bench; a form
    outside the vocabulary stays as it is ("Trees": case is kept, as WordNet keeps it)."""
    words = {"frisbee", "bench", "glass", "man", "tree"}
    assert [vocabulary_lemma(w, words) for w in ("frisbees", "benches", "glasses", "men")] == [
        "frisbee",
        "bench",
        "glass",
        "man",
    ]
    assert vocabulary_lemma("Trees", words) == "Trees"
    assert vocabulary_lemma("floors", words) == "floors"


def test_doc_similarity_follows_spacys_rules():
    """Same tokens 1.0; else the cosine of mean vectors (missing tokens are zeros); no vector 0.
    ["cat", "hat"] with only cat=[1, 0] has mean [0.5, 0]: cosine with dog=[1, 1] is 1/sqrt(2)."""
    table = {"cat": [1.0, 0.0], "dog": [1.0, 1.0]}
    assert doc_similarity(["hat"], ["hat"], table.get) == 1.0
    assert doc_similarity(["hat"], ["cat"], table.get) == 0.0
    assert doc_similarity(["cat", "hat"], ["dog"], table.get) == pytest.approx(2**-0.5)


def score_all(similarity: str) -> tuple[dict, list[dict]]:
    items = amber.read_generative(str(DATA))
    return amber.score_generative(items, DESCRIPTIONS, "vocabulary", similarity, 0.8, str(DATA))


def test_generative_metrics_with_near_synonyms():
    """Worked by hand with the vector table.

    1 truth dog sofa person, hallu cat frisbee bird: mentions man puppy couch kitten sign frisbee
      (floor, rest: not AMBER words). man, puppy, couch cover person, dog, sofa; sign is safe;
      kitten ~ cat marks cat and is hallucinated (like no annotated object); frisbee equals a
      candidate: marked, hallucinated. -> 6 mentions, 2 hallucinated, 3/3 covered, 2/3 marked.
    2 truth grass tree, hallu car bench bird: "Trees" keeps its case and is no AMBER word;
      ground covers grass; vehicle (car's word) and bench are marked and hallucinated.
      -> 3 mentions, 2 hallucinated, 1/2 covered, 2/3 marked.
    3 truth cat, hallu kitten: kitten equals the candidate (marked) but is similar to cat, so
      as in the reference it covers cat and is no hallucination. -> 1, 0, 1/1, 1/1.
    CHAIR 4/10 = 40%, Cover 5/6 = 83.3%, Hal 2/3 = 66.7%, Cog 5/7 = 71.4%."""
    metrics, records = score_all(VECTORS)
    assert metrics["chair"] == pytest.approx(40.0)
    assert metrics["cover"] == pytest.approx(100 * 5 / 6)
    assert metrics["hal"] == pytest.approx(100 * 2 / 3)
    assert metrics["cog"] == pytest.approx(100 * 5 / 7)
    assert (metrics["descriptions"], metrics["mentions"], metrics["hallucinated"]) == (3, 10, 4)
    assert records[0]["mentions"] == ["man", "puppy", "couch", "kitten", "sign", "frisbee"]
    assert records[0]["hallucinated"] == ["kitten", "frisbee"]
    assert records[0]["covered"] == ["dog", "sofa", "person"]
    assert records[0]["recognized"] == ["cat", "frisbee"]
    assert (records[2]["hallucinated"], records[2]["covered"]) == ([], ["cat"])
    assert metrics["matcher"]["similarity"].startswith("vectors ")
    assert metrics["matcher"]["nouns"].startswith("vocabulary")
    assert metrics["matcher"]["threshold"] == 0.8


def test_generative_metrics_without_near_synonyms():
    """The same answers with `exact`: kitten matches nothing in 1 (not marked, hallucinated);
    in 3 it equals the candidate (marked) and, like no annotated object, is hallucinated.
    -> hallucinated 2 + 2 + 1 = 5 of 10: CHAIR 50%; covered 3 + 1 + 0 = 4/6; Hal 3/3;
    marked 1 + 2 + 1 = 4/7."""
    metrics, _ = score_all("exact")
    assert metrics["chair"] == pytest.approx(50.0)
    assert metrics["cover"] == pytest.approx(100 * 4 / 6)
    assert metrics["hal"] == pytest.approx(100.0)
    assert metrics["cog"] == pytest.approx(100 * 4 / 7)
    assert metrics["matcher"]["similarity"] == "exact (no near-synonyms)"


def test_an_injected_tagger_decides_what_is_a_noun():
    """Only NN* tokens count: with "orange" tagged JJ, "an orange cat" mentions cat alone."""
    tags = {"orange": "JJ", "cat": "NN", "oranges": "NNS"}
    nouns = NounExtractor(
        tokenize=str.split,
        tag=lambda tokens: [(t, tags.get(t, "DT")) for t in tokens],
        lemmatize=lambda w: w.rstrip("s"),
        name="injected",
    )
    matcher = Matcher(nouns, lambda a, b: float(a == b), 0.8, "exact")
    vocab = amber.AmberVocabulary(
        {"cat": [], "orange": []}, frozenset(), frozenset({"cat", "orange"})
    )
    score = amber.score_description(nouns("an orange cat"), ["cat"], ["orange"], vocab, matcher)
    assert (score.mentions, score.hallucinated, score.covered) == (["cat"], [], [0])
    score = amber.score_description(nouns("two oranges"), ["cat"], ["orange"], vocab, matcher)
    assert (score.mentions, score.hallucinated, score.recognized) == (["orange"], ["orange"], [0])


def test_discriminative_metrics_with_no_as_the_positive_class():
    """Answers parse by their first word: 4 yes, 5 no, 6 yes, 7 no, 8 no, 9 none, 10 yes, 11 no
    against truths yes no no yes no no yes no.

    all: correct 4 5 8 10 11 -> accuracy 5/8; said no 5 7 8 11, of them truly no 5 8 11 ->
      precision 3/4; truly no 5 6 8 9 11 -> recall 3/5; F1 2 * .75 * .6 / 1.35 = 2/3.
    existence 4-6: accuracy 2/3, precision 1/1, recall 1/2, F1 2/3.
    attribute 7-9: accuracy 1/3, precision 1/2, recall 1/2, F1 1/2; state (7): all 0 (no
      question truly no); number (8): all 100; action (9): unanswered, all 0.
    relation 10-11: all 100."""
    items = amber.read_discriminative(str(DATA))
    metrics, records = amber.score_discriminative(items, YES_NO)
    expected = {
        "all": (62.5, 75.0, 60.0, 200 / 3, 8, 1),
        "existence": (200 / 3, 100.0, 50.0, 200 / 3, 3, 0),
        "attribute": (100 / 3, 50.0, 50.0, 50.0, 3, 1),
        "attribute_state": (0.0, 0.0, 0.0, 0.0, 1, 0),
        "attribute_number": (100.0, 100.0, 100.0, 100.0, 1, 0),
        "attribute_action": (0.0, 0.0, 0.0, 0.0, 1, 1),
        "relation": (100.0, 100.0, 100.0, 100.0, 2, 0),
    }
    assert list(metrics) == list(expected)
    for group, values in expected.items():
        m = metrics[group]
        got = (m["accuracy"], m["precision"], m["recall"], m["f1"], m["questions"], m["unanswered"])
        assert got == pytest.approx(values), group
    assert [r["prediction"] for r in records] == ["yes", "no", "yes", "no", "no", None, "yes", "no"]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("Yes", "yes"), (" no.", "no"), ("NO, it is not", "no"), ('"Yes"', "yes"), ("Nope", None)],
)
def test_yes_no_answers_parse_by_their_first_word(text, parsed):
    assert amber.parse_answer(text) == parsed


def test_missing_nltk_data_is_named_with_the_command_that_installs_it(tmp_path, monkeypatch):
    """With nltk installed but none of its data found, the error lists what is missing."""
    import nltk  # in the dev extra; its data is not

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(
        MatcherUnavailableError,
        match=r"needs NLTK data that is not installed: "
        r"punkt_tab, averaged_perceptron_tagger_eng, wordnet\. Install it with "
        r"`python -m nltk\.downloader punkt_tab",
    ):
        nltk_extractor()


def test_an_unavailable_matcher_is_named_before_any_answer_is_generated(monkeypatch):
    """Without nltk (or spaCy) importable, the check names the install command and the fallback."""
    import builtins

    real_import = builtins.__import__

    def no_nlp(name, *args, **kwargs):
        if name.split(".")[0] in ("nltk", "spacy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nlp)
    with pytest.raises(
        MatcherUnavailableError,
        match=r"needs nltk: `pip install nltk && .*"
        r"amber_nouns: vocabulary",
    ):
        check_available("nltk", "exact")
    with pytest.raises(MatcherUnavailableError, match=r"python -m spacy download en_core_web_lg"):
        check_available("vocabulary", "spacy:en_core_web_lg")
    with pytest.raises(FileNotFoundError, match=r"vector table /no/such\.json not found"):
        check_available("vocabulary", "vectors:/no/such.json")
    check_available("vocabulary", VECTORS)  # an existing table needs nothing installed


def test_a_matcher_is_built_from_its_settings():
    matcher = build_matcher("vocabulary", VECTORS, 0.9, vocabulary().objects)
    assert matcher.synonyms("kitten", "cat")  # 0.949 > 0.9
    assert not build_matcher("vocabulary", VECTORS, 0.95, vocabulary().objects).synonyms(
        "kitten", "cat"
    )
    assert matcher.nouns("Two Dogs and a puppy") == ["Two", "Dogs", "and", "a", "puppy"]


def test_an_annotation_object_missing_from_relation_json_is_named():
    vocab = amber.AmberVocabulary({"cat": []}, frozenset(), frozenset({"cat"}))
    matcher = Matcher(
        NounExtractor(str.split, lambda t: [], str, "none"), lambda a, b: 0.0, 0.8, "x"
    )
    with pytest.raises(ValueError, match=r"objects \['dog'\] of the annotation have no entry"):
        amber.score_description([], ["cat"], ["dog"], vocab, matcher)


# --- `bpo eval` end to end ----------------------------------------------------------------------


def answers_file(path: Path, answers: dict[str, str]) -> Path:
    path.write_text(
        "".join(json.dumps({"question_id": q, "answer": a}) + "\n" for q, a in answers.items())
    )
    return path


def amber_yaml(tmp_path: Path, out: Path, similarity: str, name: str) -> Path:
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        f"out: {out}\n"
        "run:\n"
        f"  name: {name}\n"
        "  benchmarks:\n"
        "  - name: amber_generative\n"
        f"    data: {FIXTURES}\n"
        f"    answers: {answers_file(tmp_path / 'descriptions.jsonl', DESCRIPTIONS)}\n"
        "    amber_nouns: vocabulary\n"
        f"    amber_similarity: {similarity}\n"
        "  - name: amber_discriminative\n"
        f"    data: {DATA}\n"
        f"    answers: {answers_file(tmp_path / 'yes_no.jsonl', YES_NO)}\n"
    )
    return config


def test_bpo_eval_scores_amber_and_compare_sets_runs_side_by_side(tmp_path, capsys):
    """`bpo eval --config` on answer files: the hand-worked numbers above, the matcher in
    results.json; `bpo compare` of the vector-table run and the exact run shows both columns."""
    from bpo.cli import main

    main(["eval", "--config", str(amber_yaml(tmp_path, tmp_path / "vec", VECTORS, "vectors"))])
    main(["eval", "--config", str(amber_yaml(tmp_path, tmp_path / "exact", "exact", "exact"))])
    results = json.loads((tmp_path / "vec" / "results.json").read_text())["benchmarks"]
    assert results["amber_generative"]["chair"] == pytest.approx(40.0)
    assert results["amber_generative"]["matcher"]["similarity"].startswith("vectors ")
    assert results["amber_discriminative"]["all"]["f1"] == pytest.approx(200 / 3)
    records = [
        json.loads(line)
        for line in (tmp_path / "vec" / "amber_generative" / "judgments.jsonl").open()
    ]
    assert records[1]["hallucinated"] == ["vehicle", "bench"]
    capsys.readouterr()
    main(["compare", str(tmp_path / "vec"), str(tmp_path / "exact")])
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| benchmark | metric | vectors | exact |"
    assert "| amber_generative | chair | 40.00 | 50.00 |" in table
    assert "| amber_discriminative | all/accuracy | 62.50 | 62.50 |" in table


def test_a_config_with_an_unknown_similarity_is_refused_before_any_work(tmp_path):
    from bpo.evaluate.config import BenchmarkConfig, EvalConfig, check_config

    bench = BenchmarkConfig(
        name="amber_generative", data=str(DATA), answers="a.jsonl", amber_similarity="glove"
    )
    with pytest.raises(ValueError, match="amber_similarity 'glove': use spacy:MODEL"):
        check_config(EvalConfig(benchmarks=[bench]))
    wrong = BenchmarkConfig(
        name="amber_discriminative", data=str(DATA), answers="a.jsonl", amber_nouns="vocabulary"
    )
    with pytest.raises(ValueError, match="amber_discriminative does not read amber_nouns"):
        check_config(EvalConfig(benchmarks=[wrong]))


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_tiny_model_answers_amber_and_its_answers_are_scored(tiny_llava_folder, tmp_path):
    """Generated answers (one per question, the discriminative ones asked with POPE's one-word
    suffix) are scored exactly as the same answers handed in as a file are."""
    from PIL import Image

    from bpo.evaluate.config import BenchmarkConfig, EvalConfig
    from bpo.evaluate.run import run_eval
    from bpo.models.load import ModelConfig

    images = tmp_path / "images"
    images.mkdir()
    for n in (1, 2, 3):
        Image.new("RGB", (16, 16), (80 * n, 40, 200)).save(images / f"AMBER_{n}.jpg")
    benches = [
        BenchmarkConfig(
            name="amber_generative",
            data=str(DATA),
            image_root=str(images),
            amber_nouns="vocabulary",
            amber_similarity=VECTORS,
            max_new_tokens=8,
        ),
        BenchmarkConfig(name="amber_discriminative", data=str(DATA), image_root=str(images)),
    ]
    model = ModelConfig(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )
    generated = run_eval(
        EvalConfig(benchmarks=benches, model=model), tmp_path / "gen", log=lambda _: None
    )
    for bench in benches:
        stored = tmp_path / "gen" / bench.name / "answers.jsonl"
        assert len(stored.read_text().splitlines()) == {"amber_generative": 3}.get(bench.name, 8)
        bench.answers = str(stored)
    meta = json.loads((tmp_path / "gen" / "amber_discriminative" / "answers.meta.json").read_text())
    assert "single word" in json.dumps(meta)
    rescored = run_eval(EvalConfig(benchmarks=benches), tmp_path / "file", log=lambda _: None)
    assert rescored["benchmarks"] == generated["benchmarks"]
