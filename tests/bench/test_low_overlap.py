"""bench/lds/low_overlap.py's corpus: the queries ask for facts in words the training never uses
(English paraphrase and French), each query's expected sequence states its fact, and the overlap
measure says so in numbers. Pure Python: no model is loaded."""

from __future__ import annotations

from tests.support.bench_scripts import load_lds_script

low_overlap = load_lds_script("low_overlap")


def template_words(templates) -> set[str]:
    return set().union(*(low_overlap.content_words(t.format(e="", a="", p="", q="", t="")) for t in templates))


def test_query_templates_share_no_content_word_with_any_training_template():
    training = template_words([*low_overlap.STATEMENT.values(), *low_overlap.FILLER])
    for questions in (low_overlap.QUESTION_EN, low_overlap.QUESTION_FR):
        assert template_words(questions.values()) and not template_words(questions.values()) & training


def test_corpus_is_seeded_and_each_expected_sequence_states_its_fact():
    corpus = low_overlap.build_corpus(seed=0)
    assert corpus == low_overlap.build_corpus(seed=0)
    assert corpus != low_overlap.build_corpus(seed=1)
    text = dict(corpus.training)
    assert len(text) == len(corpus.training)  # ids are unique
    languages = {language for *_, language in corpus.queries}
    assert languages == {"en", "fr"}
    for query_id, prompt, completion, _ in corpus.queries:
        fact = corpus.facts[query_id]
        [source] = corpus.expected[query_id]
        assert text[source] == low_overlap.STATEMENT[fact.relation].format(e=fact.person, a=fact.answer)
        assert completion == f" {fact.answer}" and fact.person in prompt
        # the query's wording (its prompt without the person) occurs in no training sequence
        for piece in prompt.split(fact.person):
            assert all(piece.strip() not in training for training in text.values() if len(piece.strip()) > 3)
    # every fact is stated exactly once: one phrasing, one sequence
    middles = [s.split("{e}")[1].split("{a}")[0] for s in low_overlap.STATEMENT.values()]
    statements = [t for t in text.values() if any(middle in t for middle in middles)]
    assert len(statements) == len(set(statements)) == low_overlap.PEOPLE * len(low_overlap.RELATIONS)


def test_word_overlap_counts_only_the_names():
    corpus = low_overlap.build_corpus(seed=0)
    for language in ("en", "fr"):
        overlap = low_overlap.word_overlap(corpus, language)
        assert overlap["fact_sequence_without_names"] == 0.0
        assert 0 < overlap["fact_sequence"] < 1
        assert 0 < overlap["best_other_sequence"] <= 1
