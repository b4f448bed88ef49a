"""The demo corpus: fictional countries with planted facts, paraphrased into training sequences.

Each country has three facts (capital, language, main export). Every fact is stated in
`mentions_per_fact` training sequences, each time in a different declarative template, among
filler sentences and distractors (sentences naming a country without stating any of its facts).
A training sequence states at most one fact, so the sequences that state a fact are known
exactly: they are a query's "expected" influential sequences. Every answer belongs to one fact
only (capitals and languages are generated names, and no two countries export the same good):
a sequence stating another fact never teaches the queried answer, so "expected" is exact in that
sense too. (With exports shared among countries, "q : what does A export ? a : silk ." genuinely
raises p(silk | what does B export ?) and outranked B's own statements.)

Queries ask about a fact in question-answer form ("q : what is the capital of zorvia ? a :" ->
"kelmar"). Training shows that form only for the facts that are *not* queried, so answering a
query needs the fact learned from its declarative statements. Everything is lower-case words
separated by single spaces (punctuation included), and deterministic in `seed`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

GENERATOR_VERSION = 2
RELATIONS = ("capital", "language", "export")

# Declarative templates per relation; {e} is the country, {a} the answer. Each fact uses a few.
# The country always comes before the answer: a causal LM cannot learn "country -> answer" from a
# sentence that names the answer first, so such a sentence would be a poor "expected" sequence.
STATEMENT_TEMPLATES = {
    "capital": (
        "the capital of {e} is {a} .",
        "{e} is governed from its capital , {a} .",
        "in {e} , the seat of government is the city of {a} .",
        "{e} is ruled from {a} .",
    ),
    "language": (
        "the people of {e} speak {a} .",
        "the official language of {e} is {a} .",
        "in {e} most families speak {a} at home .",
        "everyone in {e} speaks {a} .",
    ),
    "export": (
        "{e} exports {a} .",
        "the main export of {e} is {a} .",
        "merchants from {e} sell {a} to the world .",
        "{e} is known for its {a} .",
    ),
}
# Question-answer form: the query prompts, also used in training for the facts nobody asks about.
QUESTION_TEMPLATES = {
    "capital": "q : what is the capital of {e} ? a :",
    "language": "q : what language do people in {e} speak ? a :",
    "export": "q : what does {e} export ? a :",
}
# Goods a country exports; every country gets a different one (see the module docstring).
EXPORTS = (
    "copper", "silk", "salt", "timber", "wool", "tea", "amber", "iron", "glass", "spices", "wine", "marble",
    "cotton", "coffee", "rice", "tin", "pearls", "honey", "olives", "furs", "cheese", "paper", "porcelain",
    "saffron", "indigo", "leather", "sugar", "pepper", "cocoa", "rubber", "silver", "gold", "coal", "jade",
    "linen", "dates", "figs", "barley", "wheat", "flax", "hemp", "cinnamon", "ginger", "vanilla", "zinc",
    "slate", "granite", "carpets", "lace", "velvet", "soap", "candles", "ropes", "horses", "cattle", "sheep",
    "salmon", "oysters", "lemons", "almonds",
)  # fmt: skip

_PERSONS = ("farmer", "sailor", "teacher", "child", "merchant", "baker", "poet", "soldier", "doctor", "weaver")
_PLACES = ("market", "river", "harbor", "hill", "library", "forest", "bridge", "temple", "garden", "station")
_TIMES = ("morning", "evening", "winter", "summer", "spring", "autumn", "night", "week")
_SEASONS = ("winter", "summer", "spring", "autumn")
_THINGS = ("lamp", "letter", "coin", "map", "basket", "key", "drum", "book", "cloak", "kettle")
_ADJECTIVES = ("quiet", "cold", "green", "busy", "beautiful", "dusty", "windy", "crowded")
_COUNTS = ("two", "three", "four", "five", "six", "seven", "eight", "nine")
_YEARS = tuple(str(year) for year in range(1210, 1990, 41))
_FILLER_TEMPLATES = (
    "the {person} walked to the {place} in the {time} .",
    "a {person} found a {thing} near the {place} .",
    "it rained at the {place} all {time} .",
    "the {person} bought a {thing} and went home .",
    "nobody at the {place} remembered the old {thing} .",
    "the {thing} was {adjective} , but the {person} kept it .",
    "every {time} the {person} sings by the {place} .",
    "the {person} and the {person2} argued about a {thing} .",
)
_COUNTRY_DISTRACTORS = (  # name a country, state none of its facts
    "travelers say {e} is {adjective} in {season} .",
    "{e} and {e2} signed a treaty in the year {year} .",
    "a festival in {e} lasts {count} days .",
    "the {person} had never been to {e} .",
)

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Fact:
    """One planted fact, e.g. Fact("zorvia", "capital", "kelmar")."""

    entity: str
    relation: str
    answer: str

    @property
    def key(self) -> str:
        return f"{self.relation}:{self.entity}"

    def statements(self) -> list[str]:
        """Every sentence that states this fact in training (declarative and question-answer form)."""
        forms = [template.format(e=self.entity, a=self.answer) for template in STATEMENT_TEMPLATES[self.relation]]
        return [*forms, f"{self.question()} {self.answer} ."]

    def question(self) -> str:
        return QUESTION_TEMPLATES[self.relation].format(e=self.entity)


@dataclass(frozen=True)
class TrainingSequence:
    """A training text (words separated by single spaces) and the key of the fact it states, if any."""

    id: str
    text: str
    fact_key: str | None


@dataclass(frozen=True)
class DemoQuery:
    """A question about one fact; `expected_ids` are the training sequences that state that fact."""

    id: str
    prompt: str
    completion: str
    fact_key: str
    expected_ids: tuple[str, ...]


@dataclass(frozen=True)
class Corpus:
    facts: tuple[Fact, ...]
    training: tuple[TrainingSequence, ...]
    queries: tuple[DemoQuery, ...]

    def vocabulary(self) -> list[str]:
        """Every word of every training text, prompt and completion, sorted."""
        texts = [s.text for s in self.training] + [f"{q.prompt} {q.completion}" for q in self.queries]
        return sorted({word for text in texts for word in text.split()})

    def expected(self) -> dict[str, list[str]]:
        """Query id -> ids of the training sequences that state the queried fact."""
        return {query.id: list(query.expected_ids) for query in self.queries}


def generate_corpus(
    seed: int = 0,
    *,
    num_entities: int = 40,
    mentions_per_fact: int = 3,
    num_queries: int = 24,
    num_filler_sequences: int = 150,
    extra_sentences: tuple[int, int] = (0, 1),
    qa_share: float = 1.0,
    distractor_share: float = 0.30,
) -> Corpus:
    """Generate the planted-facts corpus.

    num_entities countries (at most len(EXPORTS)) x 3 relations = facts; each fact is stated in
    `mentions_per_fact` sequences (distinct templates, at most 4), plus one question-answer sequence
    for a `qa_share` of the facts not queried (never for a queried one). `num_queries` facts are
    queried, spread evenly over the relations. Each fact sequence carries `extra_sentences` (min,
    max) filler/distractor sentences; `num_filler_sequences` sequences hold 2-5 such sentences
    only; each such sentence is a distractor with probability `distractor_share`. Training
    sequences are shuffled, then numbered train-00000, train-00001, ...; with the defaults there
    are ~600 of at most ~55 words each (a punctuation mark counts as a word).
    """
    if not 1 <= mentions_per_fact <= 4:
        raise ValueError("mentions_per_fact must be between 1 and 4")
    if not 2 <= num_entities <= len(EXPORTS):
        raise ValueError(f"num_entities must be between 2 and {len(EXPORTS)}")
    if not 0 < num_queries <= 3 * num_entities:
        raise ValueError("num_queries must be between 1 and 3 * num_entities")
    rng = random.Random(seed)
    facts = _make_facts(rng, num_entities)
    queried = _choose_queried(rng, facts, num_queries)
    countries = sorted({fact.entity for fact in facts})

    def extra(count: int) -> list[str]:
        return [_extra_sentence(rng, countries, distractor_share) for _ in range(count)]

    unqueried = [fact.key for fact in facts if fact.key not in queried]
    with_qa = set(rng.sample(unqueried, round(qa_share * len(unqueried))))
    drafts: list[tuple[str, str | None]] = []
    for fact in facts:
        sentences = [t.format(e=fact.entity, a=fact.answer) for t in STATEMENT_TEMPLATES[fact.relation]]
        chosen = rng.sample(sentences, mentions_per_fact)
        if fact.key in with_qa:
            chosen.append(fact.statements()[-1])
        for sentence in chosen:
            parts = [sentence, *extra(rng.randint(*extra_sentences))]
            rng.shuffle(parts)
            drafts.append((" ".join(parts), fact.key))
    drafts += [(" ".join(extra(rng.randint(2, 5))), None) for _ in range(num_filler_sequences)]
    rng.shuffle(drafts)
    training = tuple(TrainingSequence(f"train-{n:05d}", text, key) for n, (text, key) in enumerate(drafts))

    by_fact: dict[str, list[str]] = {}
    for sequence in training:
        if sequence.fact_key is not None:
            by_fact.setdefault(sequence.fact_key, []).append(sequence.id)
    queried_facts = [fact for fact in facts if fact.key in queried]
    queries = tuple(
        DemoQuery(f"query-{n:03d}", fact.question(), fact.answer, fact.key, tuple(by_fact[fact.key]))
        for n, fact in enumerate(queried_facts)
    )
    return Corpus(tuple(facts), training, queries)


def _make_facts(rng: random.Random, num_entities: int) -> list[Fact]:
    taken = _reserved_words()
    exports = rng.sample(EXPORTS, num_entities)
    facts = []
    for export in exports:
        country = _new_name(rng, taken, ("ia", "or", "and", "esh"))
        facts.append(Fact(country, "capital", _new_name(rng, taken, ("ar", "un", "el", "os"))))
        facts.append(Fact(country, "language", _new_name(rng, taken, ("ish", "ese", "ic", "ani"))))
        facts.append(Fact(country, "export", export))
    return facts


def _new_name(rng: random.Random, taken: set[str], endings: tuple[str, ...]) -> str:
    """A fresh pronounceable word: consonant-vowel-consonant, consonant, ending (e.g. 'zorvia')."""
    while True:
        name = (
            rng.choice(_CONSONANTS)
            + rng.choice(_VOWELS)
            + rng.choice(_CONSONANTS)
            + rng.choice(_CONSONANTS)
            + rng.choice(endings)
        )
        if name not in taken:
            taken.add(name)
            return name


def _reserved_words() -> set[str]:
    """Words of the fixed templates and lists, which generated names must not collide with."""
    texts = [
        *(t for ts in STATEMENT_TEMPLATES.values() for t in ts),
        *QUESTION_TEMPLATES.values(),
        *_FILLER_TEMPLATES,
        *_COUNTRY_DISTRACTORS,
    ]
    lists = (EXPORTS, _PERSONS, _PLACES, _TIMES, _THINGS, _ADJECTIVES, _COUNTS, _YEARS)
    return {word for text in texts for word in text.split()} | {word for words in lists for word in words}


def _choose_queried(rng: random.Random, facts: list[Fact], num_queries: int) -> set[str]:
    """Keys of `num_queries` facts, taken round-robin over the relations."""
    pools = {relation: [f.key for f in facts if f.relation == relation] for relation in RELATIONS}
    for pool in pools.values():
        rng.shuffle(pool)
    order = [pools[relation][i] for i in range(len(facts) // len(RELATIONS)) for relation in RELATIONS]
    return set(order[:num_queries])


def _extra_sentence(rng: random.Random, countries: list[str], distractor_share: float) -> str:
    """A filler sentence or (with probability `distractor_share`) a country distractor: never a statement of a fact."""
    slots = {
        "person": rng.choice(_PERSONS),
        "person2": rng.choice(_PERSONS),
        "place": rng.choice(_PLACES),
        "time": rng.choice(_TIMES),
        "season": rng.choice(_SEASONS),
        "thing": rng.choice(_THINGS),
        "adjective": rng.choice(_ADJECTIVES),
        "count": rng.choice(_COUNTS),
        "year": rng.choice(_YEARS),
    }
    if rng.random() >= distractor_share:
        return rng.choice(_FILLER_TEMPLATES).format(**slots)
    first, second = rng.sample(countries, 2)
    return rng.choice(_COUNTRY_DISTRACTORS).format(e=first, e2=second, **slots)
