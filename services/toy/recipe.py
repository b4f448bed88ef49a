"""The demo's recipe: corpus, model and training sizes (`DemoSettings`), the corpus they make, and
training the demo model on it. `train_demo` runs `train_and_save` in a child process with pinned
numerics; `demo_data` builds and caches the demo's directory.

`RECIPES` names the models trained this way: the demo, and bench/bench_index.py's toy Llama and
GPT-2 (a larger planted-facts corpus, four layers), so bench/lds can retrain any of them on
subsets with the recipe of the model being explained."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .corpus import Corpus, generate_corpus
from .models import build_tiny_model, save_model_dir
from .tokenizer import build_word_tokenizer
from .train import TrainConfig, score_completions, train_causal_lm


@dataclass(frozen=True)
class DemoSettings:
    """The demo's recipe: corpus, model and training sizes.

    The defaults were chosen with bench/demo_robustness.py (see BENCHMARKS.md): every fact stated
    in all 4 declarative templates, and 20 epochs, after which the model answers the queries
    (mean log-prob ≈ -0.5 nats) without being saturated (at 100 epochs it was, ≈ -0.04 nats, and
    the tiny, noisy query gradients let the ranking move with the CPU). The pinned training child
    takes ~45 s on 2 cores.
    """

    num_entities: int = 40
    num_queries: int = 24
    mentions_per_fact: int = 4
    qa_share: float = 1.0
    distractor_share: float = 0.30
    num_filler_sequences: int = 100
    max_extra_sentences: int = 1
    architecture: str = "gpt2"  # services.toy.models.ARCHITECTURES
    n_layer: int = 2
    d_model: int = 96
    n_head: int = 4
    d_ff: int | None = None  # feed-forward width; None: 4 * d_model
    epochs: int = 20
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 0.01


_BENCH_INDEX_CORPUS = dict(num_entities=60, num_queries=48, num_filler_sequences=300, epochs=30)
RECIPES = {
    "demo": DemoSettings(),
    # bench/bench_index.py's workloads: ~1,150 sequences of ~32 tokens, 48 planted-fact queries
    "toy-llama": DemoSettings(**_BENCH_INDEX_CORPUS, architecture="llama", n_layer=4, d_model=64, n_head=4, d_ff=256),
    "toy-gpt2": DemoSettings(**_BENCH_INDEX_CORPUS, architecture="gpt2", n_layer=4, d_model=96, n_head=4),
    # the toy Llama's widths on the demo's corpus size and epochs (652 sequences, 48 queries): the
    # second model of bench/lds, whose retrained halves cost ~2.6x less than the toy Llama's
    "small-llama": DemoSettings(num_queries=48, architecture="llama", n_layer=4, d_model=64, n_head=4, d_ff=256),
}


def build_corpus(config: DemoSettings, seed: int) -> Corpus:
    """The demo corpus for these settings (pure Python: the same on every machine)."""
    return generate_corpus(
        seed,
        num_entities=config.num_entities,
        num_queries=config.num_queries,
        mentions_per_fact=config.mentions_per_fact,
        num_filler_sequences=config.num_filler_sequences,
        extra_sentences=(0, config.max_extra_sentences),
        qa_share=config.qa_share,
        distractor_share=config.distractor_share,
    )


def train_and_save(
    corpus: Corpus,
    config: DemoSettings,
    seed: int,
    model_dir: Path | None,
    progress: bool,
    keep: Sequence[int] | None = None,
) -> dict:
    """Train the settings' architecture on the corpus, save it with its tokenizer; returns time (s) and query accuracy.

    `keep`: train on just these training sequences (positions in corpus.training), with the same
    tokenizer, model shape, seed and recipe (bench/lds retrains on random subsets this way);
    `model_dir` None: save nothing. The report's `query_logprobs` are the queries' completion
    log-probabilities (nats, summed over completion tokens) unrounded, in query order.
    """
    tokenizer = build_word_tokenizer(corpus.vocabulary())
    longest = max(len(tokenizer(s.text)["input_ids"]) for s in corpus.training)
    model = build_tiny_model(
        config.architecture,
        len(tokenizer),
        n_layer=config.n_layer,
        d_model=config.d_model,
        n_head=config.n_head,
        d_ff=config.d_ff,
        max_positions=max(64, 2 * longest),
        seed=seed,
    )
    train_config = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        seed=seed,
    )
    started = time.perf_counter()
    texts = [s.text for s in corpus.training]
    if keep is not None:
        texts = [texts[position] for position in keep]
    losses = train_causal_lm(model, tokenizer, texts, train_config, progress=progress)
    seconds = time.perf_counter() - started
    scores = score_completions(model, tokenizer, [(q.prompt, q.completion) for q in corpus.queries])
    if model_dir is not None:
        save_model_dir(model, tokenizer, model_dir)
    report = {
        "seconds": round(seconds, 1),
        "final_loss": round(losses[-1], 4),
        "query_accuracy": sum(s.correct for s in scores) / len(scores),
        "query_mean_logprob": round(sum(s.logprob for s in scores) / len(scores), 4),
        "query_logprobs": [s.logprob for s in scores],
        "per_query": {
            q.id: {"logprob": round(s.logprob, 4), "correct": s.correct}
            for q, s in zip(corpus.queries, scores, strict=True)
        },
    }
    if progress:
        print(
            f"demo model trained in {seconds:.0f} s: {sum(s.correct for s in scores)}/{len(scores)} query "
            f"completions predicted, mean log-prob {report['query_mean_logprob']:.2f} nats",
            file=sys.stderr,
        )
    return report
