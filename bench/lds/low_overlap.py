"""Low-lexical-overlap fact tracing: SmolLM2-135M-Instruct fine-tuned on invented facts stated in
one phrasing, queried in other words (an English paraphrase) and in French.

    nice -n 19 .venv/bin/python bench/lds/low_overlap.py [--model DIR] [--out DIR]   # corpus + fine-tune
    nice -n 19 .venv/bin/python bench/lds/low_overlap.py --scores      # EK-FAC x3 dampings, filters, BM25
    nice -n 19 .venv/bin/python bench/lds/low_overlap.py --knowledge   # base vs fine-tuned answers
    nice -n 19 .venv/bin/python bench/lds/settings.py --truth DIR --only identity --modules MODULES
    .venv/bin/python bench/lds/evaluate.py DIR/scores/ekfac-d0.1.safetensors DIR/scores/... --truth DIR \
        --expected DIR/demo/EXPECTED-en.json          # (or EXPECTED-fr.json, EXPECTED.json: both)

The corpus (`build_corpus`, pure Python and seeded): PEOPLE invented people (names made of
syllables no language has, so the model cannot know them), each with one fact per RELATIONS
relation (home town, employer, dog's name; values drawn from small invented pools, so a value is
shared by several people). Training states every fact once, in ONE phrasing (`STATEMENT`), one
fact per sequence, beside FILLER sequences that mention the same people and places in unrelated
sentences. The queries ask QUERIED of the people for one of their facts in other words: an
English paraphrase (`QUESTION_EN`) and French (`QUESTION_FR`), neither sharing a content word with
the statements (`content_words`; the test checks it). `word_overlap` puts the overlap in numbers.

The model (`fine_tune`): the MLPs of the last TRAINED_LAYERS layers of the pretrained model are
trained on the corpus (`Recipe`: AdamW, seeded order, deterministic kernels; everything else
frozen) and saved as an ordinary Hugging Face directory at DIR/demo/model; `--knowledge` compares
each query's answer log-probability, and whether it beats another value of the same pool, under the
base and the fine-tuned model (DIR/knowledge.json). Scores cover the down projections of the
trained layers (MODULES).

DIR (default bench/out/lds/low-overlap) is laid out as settings.py and evaluate.py expect of a
ground-truth directory without retrained subsets (fact tracing only): DIR/demo/{model, TRAIN.jsonl,
QUERIES.jsonl, EXPECTED.json, EXPECTED-en.json, EXPECTED-fr.json}.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE_MODEL = Path("/work/models/smollm2/model")
DEFAULT_OUT = ROOT / "bench" / "out" / "lds" / "low-overlap"

PEOPLE, QUERIED, FILLER_SEQUENCES = 24, 24, 16
TRAINED_LAYERS = 8
# the modules scored: the down projections of the trained layers (all their MLPs would hold three
# times the prepared query gradients: 4 GB x 3 for 48 queries at three dampings, beyond this host)
MODULES = r"model\.layers\.(2[2-9])\.mlp\.down_proj"
FILTERS = (("bm25", 10), ("bm25", 30), ("tfidf", 10), ("tfidf", 30))

SYLLABLES = ["ka", "vor", "mel", "tis", "dra", "lun", "pe", "zor", "qua", "bel", "nix", "ro", "sha", "ven", "tu", "gri"]
RELATIONS = ("town", "employer", "dog")
POOL_SIZE = 8  # values per relation, each shared by several people
STATEMENT = {
    "town": "{e} was born in a small mountain town called {a}.",
    "employer": "{e} works as an engineer for a firm named {a}.",
    "dog": "{e} has a grey dog named {a}.",
}
QUESTION_EN = {
    "town": "Question: Which settlement is the hometown of {e}? Answer:",
    "employer": "Question: Which company pays the salary of {e}? Answer:",
    "dog": "Question: What do people call the animal that {e} keeps at home? Answer:",
}
QUESTION_FR = {
    "town": "Question : Quel est le village natal de {e} ? Réponse :",
    "employer": "Question : Pour quelle entreprise travaille {e} ? Réponse :",
    "dog": "Question : Comment s'appelle le chien de {e} ? Réponse :",
}
FILLER = [
    "{p} and {q} met at the market in {t} on a rainy morning.",
    "A letter from {p} to {q} was found in an old drawer.",
    "{p} painted the fence while {q} read the newspaper.",
    "The bakery in {t} sold out of bread before noon.",
    "{q} borrowed a bicycle from {p} and never returned it.",
    "Tourists in {t} often ask {p} for directions.",
]
STOPWORDS = frozenset(
    " ".join(
        (
            "a an the of in on at to for and or is was are be by with that this what which who whom how",
            "do does did people question answer le la les de du des un une est quel quelle comment pour s l d qu",
        )
    ).split(" ")
)


@dataclass(frozen=True)
class Fact:
    person: str
    relation: str
    answer: str


@dataclass(frozen=True)
class Corpus:
    """training: [(id, text)]; queries: [(id, prompt, completion, language)];
    expected: query id -> the ids of the training sequences stating its fact (one each here);
    facts: query id -> its Fact."""

    training: list[tuple[str, str]]
    queries: list[tuple[str, str, str, str]]
    expected: dict[str, list[str]]
    facts: dict[str, Fact]
    pools: dict[str, list[str]]


def _name(rng: random.Random, parts: int, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()
        if name not in taken:
            taken.add(name)
            return name


def build_corpus(seed: int = 0, people: int = PEOPLE, queried: int = QUERIED, filler: int = FILLER_SEQUENCES) -> Corpus:
    """The corpus, the same on every machine for a seed (pure Python)."""
    rng = random.Random(f"low-overlap-{seed}")
    taken: set[str] = set()
    pools = {relation: [_name(rng, 3, taken) for _ in range(POOL_SIZE)] for relation in RELATIONS}
    names = [f"{_name(rng, 2, taken)} {_name(rng, 3, taken)}" for _ in range(people)]
    facts = [Fact(person, relation, rng.choice(pools[relation])) for person in names for relation in RELATIONS]
    sentences: list[tuple[str, Fact | None]] = [
        (STATEMENT[f.relation].format(e=f.person, a=f.answer), f) for f in facts
    ]
    for _ in range(filler):
        p, q = rng.sample(names, 2)
        sentences.append((rng.choice(FILLER).format(p=p, q=q, t=rng.choice(pools["town"])), None))
    rng.shuffle(sentences)
    training = [(f"t{position:04d}", text) for position, (text, _) in enumerate(sentences)]
    source = {fact: f"t{position:04d}" for position, (_, fact) in enumerate(sentences) if fact is not None}
    queries, expected, by_query = [], {}, {}
    for number, person in enumerate(names[:queried]):
        fact = next(f for f in facts if f.person == person and f.relation == RELATIONS[number % len(RELATIONS)])
        for language, questions in (("en", QUESTION_EN), ("fr", QUESTION_FR)):
            query_id = f"{language}{number:02d}"
            queries.append((query_id, questions[fact.relation].format(e=person), f" {fact.answer}", language))
            expected[query_id] = [source[fact]]
            by_query[query_id] = fact
    return Corpus(training, queries, expected, by_query, pools)


def content_words(text: str) -> set[str]:
    """Lower-cased words of `text` less STOPWORDS (what a reader would call its content words)."""
    return {word for word in re.findall(r"[a-zà-ÿ]+", text.lower()) if word not in STOPWORDS}


def word_overlap(corpus: Corpus, language: str) -> dict[str, float]:
    """Means over the language's queries of the share of the query's content words (prompt and
    completion) that occur in its fact-stating sequence: all of them, and without the names
    (the person's and the answer's words, which any fact question must repeat); and the same
    share for the training sequence that shares most words with the query."""
    text = dict(corpus.training)
    shares = {"fact_sequence": [], "fact_sequence_without_names": [], "best_other_sequence": []}
    for query_id, prompt, completion, query_language in corpus.queries:
        if query_language != language:
            continue
        words = content_words(prompt + completion)
        fact = corpus.facts[query_id]
        names = content_words(f"{fact.person} {fact.answer}")
        [source] = corpus.expected[query_id]
        stated = content_words(text[source])
        shares["fact_sequence"].append(len(words & stated) / len(words))
        shares["fact_sequence_without_names"].append(len((words - names) & stated) / len(words - names))
        shares["best_other_sequence"].append(
            max(len(words & content_words(t)) / len(words) for i, t in corpus.training if i != source)
        )
    return {key: round(sum(values) / len(values), 3) for key, values in shares.items()}


def write_corpus(corpus: Corpus, demo: Path) -> None:
    demo.mkdir(parents=True, exist_ok=True)
    with (demo / "TRAIN.jsonl").open("w") as handle:
        for training_id, text in corpus.training:
            handle.write(json.dumps({"id": training_id, "text": text}) + "\n")
    with (demo / "QUERIES.jsonl").open("w") as handle:
        for query_id, prompt, completion, _ in corpus.queries:
            handle.write(json.dumps({"id": query_id, "prompt": prompt, "completion": completion}) + "\n")
    (demo / "EXPECTED.json").write_text(json.dumps(corpus.expected, indent=1))
    for language in ("en", "fr"):
        subset = {q: ids for q, ids in corpus.expected.items() if q.startswith(language)}
        (demo / f"EXPECTED-{language}.json").write_text(json.dumps(subset, indent=1))


# ------------------------------------------------------------------------------------------------
# the fine-tuned model


@dataclass(frozen=True)
class Recipe:
    epochs: int = 2
    batch_size: int = 8
    learning_rate: float = 1e-3
    seed: int = 0
    trained_layers: int = TRAINED_LAYERS
    max_length: int = 64


def answer_logprobs(model, tokenizer, prompts_and_answers: list[tuple[str, str]], batch: int = 32) -> list[float]:
    """Log-probability (nats, summed over the completion's tokens) of each (prompt, completion)."""
    import torch

    from services.engine.data import collate, tokenize_queries
    from services.engine.records import Query

    queries = [Query(id=str(i), prompt=p, completion=c) for i, (p, c) in enumerate(prompts_and_answers)]
    sequences = tokenize_queries(tokenizer, queries, 128)
    out = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch):
            chunk = collate(sequences[start : start + batch], tokenizer.pad_token_id)
            logits = model(input_ids=chunk.input_ids, attention_mask=chunk.attention_mask).logits[:, :-1]
            logprobs = torch.log_softmax(logits.double(), -1).gather(-1, chunk.input_ids[:, 1:, None])[..., 0]
            out.extend((logprobs * chunk.target_mask[:, 1:]).sum(1).tolist())
    return out


def knowledge(model, tokenizer, corpus: Corpus) -> dict[str, dict[str, float]]:
    """Per language: the mean log-probability of each query's answer, and the share of queries
    whose answer is more likely than another value of the same relation's pool (chance: 0.5;
    the facts learned, not just the pool's names)."""
    report = {}
    for language in ("en", "fr"):
        rows = [q for q in corpus.queries if q[3] == language]
        pairs = []
        for query_id, prompt, completion, _ in rows:
            pool = corpus.pools[corpus.facts[query_id].relation]
            other = pool[(pool.index(completion.strip()) + 1) % len(pool)]
            pairs += [(prompt, completion), (prompt, f" {other}")]
        values = answer_logprobs(model, tokenizer, pairs)
        true, other = values[0::2], values[1::2]
        report[language] = {
            "answer_logprob": round(sum(true) / len(rows), 3),
            "answer_beats_other_value": round(sum(t > o for t, o in zip(true, other, strict=True)) / len(rows), 3),
        }
    return report


def fine_tune(base: Path, corpus: Corpus, target: Path, recipe: Recipe) -> dict:
    """Train the last `recipe.trained_layers` layers' MLPs on the corpus; save to `target`."""
    import torch

    from services.engine.data import collate, tokenize_training
    from services.engine.model_io import load_model_and_tokenizer
    from services.engine.records import TrainingExample

    torch.manual_seed(recipe.seed)
    torch.use_deterministic_algorithms(True)
    model, tokenizer = load_model_and_tokenizer(base)
    layers = model.model.layers
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trained = [p for layer in layers[len(layers) - recipe.trained_layers :] for p in layer.mlp.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=recipe.learning_rate, weight_decay=0.0)
    examples = [TrainingExample(id=i, text=t) for i, t in corpus.training]
    sequences = tokenize_training(tokenizer, examples, recipe.max_length)
    order = torch.Generator().manual_seed(recipe.seed)
    started, losses = time.perf_counter(), []
    model.train()
    for epoch in range(recipe.epochs):
        permutation = torch.randperm(len(sequences), generator=order).tolist()
        total, batches = 0.0, 0
        for start in range(0, len(sequences), recipe.batch_size):
            batch = collate(
                [sequences[i] for i in permutation[start : start + recipe.batch_size]], tokenizer.pad_token_id
            )
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            targets = batch.input_ids[:, 1:].masked_fill(~batch.target_mask[:, 1:], -100)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total, batches = total + float(loss.detach()), batches + 1
        losses.append(round(total / batches, 4))
        print(f"epoch {epoch}: mean loss {losses[-1]} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    seconds = time.perf_counter() - started
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return {"seconds": round(seconds, 1), "epoch_losses": losses}


# ------------------------------------------------------------------------------------------------
# the scores


def score_settings(out: Path, modules: str = MODULES) -> None:
    """DIR/scores/NAME.safetensors (settings.py's names and format) for EK-FAC at dampings 0.001,
    0.01 and 0.1 x the mean eigenvalue, the lexical filters FILTERS + EK-FAC at the default damping,
    and BM25 alone; through the engine's API, as settings.py does, in one fit and ONE scoring pass:
    the pass runs at damping 0.01 with `--damping-check`, whose alternates are exactly the scores
    at 0.1x and 10x (0.001 and 0.1), and a filter's scores are the default damping's restricted to
    the tool's own lexical candidates (`Scorer.lexical_candidates`), the others ranked last (-inf)
    as the tool's top-k ranks them: what `--bm25 K` computes, without another pass over the
    training data. Identity needs its own pass: `settings.py --only identity`."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from settings import BATCH, MAX_LENGTH

    from services.engine.data import tokenize_queries
    from services.engine.fit import FitConfig, fit_factors
    from services.engine.lexical import bm25_scores
    from services.engine.model_io import load_model_and_tokenizer
    from services.engine.records import read_queries_jsonl, read_training_jsonl
    from services.engine.score import DAMPING_CHECK_SCALES, ScoreConfig, Scorer, score_in_memory

    demo, target = out / "demo", out / "scores"
    target.mkdir(parents=True, exist_ok=True)

    def save(name: str, scores: torch.Tensor, seconds: float) -> None:
        save_file(
            {"scores": scores.to(torch.float32).contiguous()},
            str(target / f"{name}.safetensors"),
            metadata={"seconds": f"{seconds:.2f}"},
        )
        print(f"{name:24s} {seconds:7.1f} s", flush=True)

    model, tokenizer = load_model_and_tokenizer(demo / "model")
    examples = read_training_jsonl(demo / "TRAIN.jsonl")
    queries = read_queries_jsonl(demo / "QUERIES.jsonl")
    started = time.perf_counter()
    config = FitConfig(strategy="ekfac", modules=modules, batch_size=BATCH, max_length=MAX_LENGTH)
    factor_set = fit_factors(model, tokenizer, examples, config)
    fit_seconds = time.perf_counter() - started
    print(f"fit: {fit_seconds:.0f} s", flush=True)
    started = time.perf_counter()
    middle = 0.01
    scorer = Scorer(
        model,
        tokenizer,
        factor_set,
        ScoreConfig(batch_size=BATCH, max_length=MAX_LENGTH, damping_factor=middle, damping_check=True),
    )
    sequences = scorer.tokenize_training(examples)
    run = score_in_memory(scorer, queries, sequences)
    seconds = fit_seconds + time.perf_counter() - started
    by_damping = {middle: run.result.scores.to(torch.float64)}
    for scale, scores in zip(DAMPING_CHECK_SCALES, run.partial.alternates, strict=True):
        by_damping[round(middle * scale, 6)] = scores
    for factor, scores in sorted(by_damping.items()):
        save(f"ekfac-d{factor:g}", scores, seconds)
    default = by_damping[0.1]
    for method, k in FILTERS:
        started = time.perf_counter()
        mask = torch.zeros_like(default, dtype=torch.bool)
        for row, columns in enumerate(scorer.lexical_candidates(method, queries, sequences, k)):
            mask[row, columns] = True
        save(f"{method}-{k}-ekfac", default.masked_fill(~mask, float("-inf")), seconds + time.perf_counter() - started)
    started = time.perf_counter()
    lexical = bm25_scores(tokenize_queries(tokenizer, queries, MAX_LENGTH), sequences)
    save("bm25", lexical, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BASE_MODEL, help="the pretrained model (read only)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=Recipe.epochs)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scores", action="store_true", help="score the fine-tuned model (score_settings)")
    parser.add_argument("--knowledge", action="store_true", help="what the base and the fine-tuned model know")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    if args.scores:
        score_settings(args.out)
        return
    if args.knowledge:
        from services.engine.model_io import load_model_and_tokenizer

        corpus = build_corpus(args.seed)
        known = {}
        for name, directory in (("base", args.model), ("fine_tuned", args.out / "demo" / "model")):
            known[name] = knowledge(*load_model_and_tokenizer(directory), corpus)
            print(name, known[name], flush=True)
        (args.out / "knowledge.json").write_text(json.dumps(known, indent=1) + "\n")
        return
    corpus = build_corpus(args.seed)
    demo = args.out / "demo"
    write_corpus(corpus, demo)
    report = {
        "sequences": len(corpus.training),
        "queries": len(corpus.queries),
        "overlap": {language: word_overlap(corpus, language) for language in ("en", "fr")},
    }
    print(json.dumps(report, indent=1), flush=True)
    recipe = Recipe(seed=args.seed, epochs=args.epochs)
    report["recipe"] = recipe.__dict__
    report["fine_tune"] = fine_tune(args.model, corpus, demo / "model", recipe)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["fine_tune"], indent=1))


if __name__ == "__main__":
    main()
