"""The placement rule, proven on this CPU-only machine with fake CUDA tensors.

Every kernel of the engine (the functions that do the arithmetic) runs here on fake `cuda`
captures (torch's FakeTensorMode: tensors with a device, shape and dtype but no values; a fake
CUDA tensor meeting a CPU tensor raises FakeTensorDeviceMismatchError) and on its other inputs in
the form production loads them: factors, eigenbases, prepared queries, index queries and blocks
as the store returns them (CPU tensors, through their serialised form), moved by the engine's one
placement step (`engine.device.to_device`, as the steps do) and nothing else. Each kernel's
result must be on cuda; a few controls show that without the placement the same call fails with
the error the issue found.

Which functions are kernels: every public function or method of services/engine that takes a
tensor (or a container of them: a capture, prepared queries, factors, ...) is found by an AST scan
of the engine's modules (`engine_tensor_functions`) and must be listed below, once, as one of
    KERNEL_CASES   a kernel, with its fake-CUDA case
    VALUE_READING  code that reads values (finiteness checks, counts, top-k, damping): it cannot
                   run on fake tensors, stays outside kernels, and is covered by a CPU run of its stage
    STEPS          a step's entry point: places what it is handed (`to_device`), then calls kernels
                   and value-reading code; covered by the CPU runs of the stages
    HOST           host-side by contract (serialisation, float64 sums, eigh, bookkeeping) or the
                   model pass itself (autograd on fake CUDA aborts the process), covered by CPU runs
so a new engine function that takes tensors fails this test until someone decides which it is
(and a kernel until it has a case). The scan is robust where a registry is not: nothing has to
remember to register. Its rule ("public, in services/engine, a parameter annotated with a tensor
type") is checked to see the engine's known kernels, so a change of annotations cannot hide them.

This CPU torch build cannot run `Tensor.to("cuda")`, indexing, item assignment or `contiguous` on
fake CUDA tensors (their Python bindings ask for a CUDA device guard before dispatch), so
`fake_cuda()` supplies those bindings from shapes (computed on the meta device): the transfers,
views and copies production code makes, with the devices real torch would give them.
"""

from __future__ import annotations

import ast
import contextlib
import re
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
from torch.overrides import TorchFunctionMode

from services.engine import capture as capture_module
from services.engine.capture import ModuleCapture, inverse_cdf, log_likelihood_gradient, sample_from, sample_labels
from services.engine.correction import CorrectionAccumulator, correction_update, sequence_tokens
from services.engine.covariance import CovarianceAccumulator, Eigenbases, covariance_update, gram
from services.engine.data import collate
from services.engine.device import exact_arithmetic, tf32_settings, to_device
from services.engine.factor_io import from_artifact, to_artifact
from services.engine.finite import all_finite
from services.engine.fit import FitConfig, FitModel, FittedModel, fit_factors
from services.engine.index import Indexer, IndexSpec, ModuleIndexer, randomized_svd
from services.engine.index_scan import (
    module_index_scores,
    module_part,
    queries_from_tensors,
    queries_to_tensors,
    score_block,
)
from services.engine.precondition import (
    Damping,
    divided,
    low_rank,
    precondition,
    preconditioner,
    self_influence_terms,
)
from services.engine.quantize import loaded as loaded_tensor
from services.engine.quantize import stored as stored_tensor
from services.engine.rotation import ROTATION_ORDERS, rotate, rotate_in_order, rotated_per_sequence_gradients
from services.engine.score import PreparedQueries, QueryFactors, ScoreConfig, Scorer, mean_length
from services.engine.scoring import module_scores, module_token_scores, plan_module_queries
from services.engine.sums import RunningSums, accumulate
from services.storage.tensors import tensors_from_bytes, tensors_to_bytes
from tests.support import ROOT
from tests.support.reference import IntTokenizer
from tests.support.tiny import random_examples, random_queries, tiny_model

ENGINE = ROOT / "services" / "engine"
CUDA = torch.device("cuda", 0)
BATCH, TOKENS = 3, 5
STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


# -- fake CUDA ------------------------------------------------------------------------------------


def _meta(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, tuple | list):
        return type(value)(_meta(item) for item in value)
    return value


def _on_cuda(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cuda"


def _destination(args, kwargs) -> tuple[torch.device | None, torch.dtype | None]:
    device = dtype = None
    for argument in (*args, *kwargs.values()):
        if isinstance(argument, torch.Tensor):
            device, dtype = argument.device, argument.dtype
        elif isinstance(argument, str | torch.device):
            device = torch.device(argument)
        elif isinstance(argument, torch.dtype):
            dtype = argument
    return device, dtype


class _CudaBindings(TorchFunctionMode):
    """The Python bindings this CPU build cannot run on fake CUDA tensors, from shapes: a transfer
    to cuda, indexing, item assignment and `contiguous` of a cuda tensor, tensors made from data on cuda."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            source, *rest = args
            device, dtype = _destination(rest, kwargs)
            if device is not None and device.type == "cuda" and source.device.type != "cuda":
                return torch.empty(source.shape, dtype=dtype or source.dtype, device=CUDA)
        if func is torch.Tensor.contiguous and _on_cuda(args[0]):
            return torch.empty(args[0].shape, dtype=args[0].dtype, device=CUDA)
        if func is torch.Tensor.__getitem__ and _on_cuda(args[0]):
            source, index = args
            view = _meta(source)[_meta(index)]
            return torch.empty_strided(view.shape, view.stride(), dtype=view.dtype, device=CUDA)
        if func is torch.Tensor.__setitem__ and _on_cuda(args[0]):
            target, index, value = args
            _meta(target)[_meta(index)] = _meta(value) if isinstance(value, torch.Tensor) else value  # shapes fit
            return None
        if func in (torch.tensor, torch.as_tensor) and torch.device(kwargs.get("device") or "cpu").type == "cuda":
            made = func(*args, **{**kwargs, "device": "cpu"})
            return torch.empty(made.shape, dtype=made.dtype, device=CUDA)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda():
    """Fake tensors (cuda ones among them) for the block; no autograd (which would need a real device)."""
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), _CudaBindings():
        yield


def cuda_capture(d_in: int, d_out: int, batch: int = BATCH, tokens: int = TOKENS) -> ModuleCapture:
    """A module's capture as the model pass makes it on a GPU (call inside `fake_cuda`)."""
    return ModuleCapture(
        a=torch.empty(batch, tokens, d_in, device=CUDA),
        s=torch.empty(batch, tokens, d_out, device=CUDA),
        token_mask=torch.ones(batch, tokens, dtype=torch.bool, device=CUDA),
        calls=1,
    )


def assert_on_cuda(value, what: str) -> None:
    tensors = [value] if isinstance(value, torch.Tensor) else list(_tensors(value))
    assert tensors, what
    for tensor in tensors:
        assert tensor.device.type == "cuda", f"{what}: a result on {tensor.device}"


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)
    elif hasattr(value, "__dataclass_fields__"):
        yield from _tensors(vars(value))


def stored(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` as a worker reads them back from the store: safetensors bytes, decoded on the CPU."""
    return tensors_from_bytes(tensors_to_bytes(to_device(tensors, "cpu")))


# -- production-form inputs (real, on the CPU) ----------------------------------------------------


class Loaded:
    """What the stages read from the store, made by real CPU runs of the engine: factor sets of
    every strategy (through the factor file format), eigenbases, prepared queries (full rank and
    rank 1, through the prepared file), index queries and blocks of every projection."""

    def __init__(self):
        model, tokenizer = tiny_model("gpt2", d_model=8), IntTokenizer()
        examples, queries = random_examples(9, seed=5), random_queries(2, seed=6)
        self.factors = {}
        for strategy in STRATEGIES:
            fitted = fit_factors(model, tokenizer, examples, FitConfig(strategy=strategy, batch_size=4))
            metadata, files = to_artifact(fitted)
            self.factors[strategy] = from_artifact(metadata, lambda name, files=files: stored(files[name]))
        ekfac = self.factors["ekfac"]
        self.names = list(ekfac.modules)
        # each module's preconditioner as a Scorer prepares it on the host (reading λ), before placing it
        self.curvature = {
            strategy: {
                name: preconditioner(factors.factors[name], strategy, Damping(), torch.float32) for name in self.names
            }
            for strategy, factors in self.factors.items()
        }
        self.tracked = ekfac.modules
        eigen = Eigenbases({name: f for name, f in ekfac.factors.items()}, n_tokens=1)
        self.eigen = Eigenbases.from_tensors(stored(eigen.to_tensors(torch.float32)), self.names)
        self.prepared, self.prepared_files = {}, {}
        for rank in (None, 1):
            scorer = Scorer(model, tokenizer, ekfac, ScoreConfig(query_rank=rank, batch_size=4))
            sequences = scorer.tokenize_training(examples)
            prepared = scorer.prepare(queries, mean_length(sequences) * 50)  # long sequences: rank 1 contracts
            self.prepared_files[rank] = stored(prepared.to_tensors())  # the prepared file, read back
            self.prepared[rank] = PreparedQueries.from_tensors(self.prepared_files[rank], self.names)
        self.sequences = sequences
        assert {m.kernel for m in self.prepared[None].modules.values()} == {"materialise"}
        assert {m.kernel for m in self.prepared[1].modules.values()} == {"contract"}
        self.index_queries, self.blocks, self.specs = {}, {}, {}
        for projection in ("none", "svd", "eigen", "random"):
            spec = IndexSpec(projection=projection, rank=2, dim=3, query_rank=2)
            indexer = Indexer(model, tokenizer, ekfac, spec, ScoreConfig(batch_size=4))
            self.specs[projection] = spec
            self.index_queries[projection] = queries_from_tensors(
                stored(queries_to_tensors(indexer.queries(queries))), self.names
            )
            self.blocks[projection] = stored(next(iter(indexer.blocks(sequences))))
        self.batch = collate(sequences[:BATCH], tokenizer.pad_token_id)  # on the CPU, as a pass makes it
        self.vocab = model.config.vocab_size

    def shape(self, name: str) -> tuple[int, int]:
        """(d_in_full, d_out) of a tracked module."""
        return self.tracked[name].d_in_full, self.tracked[name].d_out


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    return Loaded()


# -- the kernels, each with its fake-CUDA case -----------------------------------------------------


def case_module_scores(loaded: Loaded) -> None:
    """Both kernels (materialise: full rank; contract: rank 1) over the prepared queries reloaded
    from the store, as the score stage, two_stage's exact rescoring and merge's token scores get them."""
    for rank, prepared in loaded.prepared.items():
        placed = to_device(prepared, CUDA)  # Scorer.score / token_scores / attach_token_scores
        for name in loaded.names:
            scores = module_scores(cuda_capture(*loaded.shape(name)), placed.modules[name])
            assert_on_cuda(scores, f"module_scores rank {rank}")
            assert scores.shape == (prepared.n_queries, BATCH)


def case_module_token_scores(loaded: Loaded) -> None:
    for rank, prepared in loaded.prepared.items():
        placed = to_device(prepared, CUDA)
        for name in loaded.names:
            row = module_token_scores(cuda_capture(*loaded.shape(name)), 1, placed.modules[name], 1)
            assert_on_cuda(row, f"module_token_scores rank {rank}")
            assert row.shape == (TOKENS,)


def case_per_sequence_gradients(loaded: Loaded) -> None:
    name = loaded.names[0]
    assert_on_cuda(cuda_capture(*loaded.shape(name)).per_sequence_gradients(), "per_sequence_gradients")


def case_precondition(loaded: Loaded) -> None:
    """Every strategy's preconditioner, prepared on the host from the loaded factors and placed
    (Scorer.preconditioners), applied to query gradients on cuda (the query pass's output)."""
    for strategy in STRATEGIES:
        for name in loaded.names:
            d_in, d_out = loaded.shape(name)
            curvature = to_device(loaded.curvature[strategy][name], CUDA)
            result = precondition(torch.empty(2, d_out, d_in, device=CUDA), curvature, torch.float32)
            assert_on_cuda(result, f"precondition {strategy}")


def case_divided(loaded: Loaded) -> None:
    for strategy in STRATEGIES:
        name = loaded.names[0]
        d_in, d_out = loaded.shape(name)
        curvature = to_device(loaded.curvature[strategy][name], CUDA)
        result = divided(torch.empty(2, d_out, d_in, device=CUDA), curvature, torch.float32)
        assert_on_cuda(result, f"divided {strategy}")


def case_query_factors(loaded: Loaded) -> None:
    """The queries' per-token factors as the query pass leaves them (captures on cuda, batch
    positions on cuda: Scorer.query_factors), rotated by the placed bases, or materialised."""
    name = loaded.names[0]
    d_in, d_out = loaded.shape(name)
    factors = QueryFactors(4, [(torch.tensor([0, 2, 3], device=CUDA), cuda_capture(d_in, d_out))])
    curvature = to_device(loaded.curvature["ekfac"][name], CUDA)
    assert_on_cuda(factors.rotated(curvature.gradient_basis, curvature.activation_basis), "QueryFactors.rotated")
    assert_on_cuda(factors.gradients(), "QueryFactors.gradients")


def case_randomized_svd(loaded: Loaded) -> None:
    d_in, d_out = loaded.shape(loaded.names[0])
    test_matrix = torch.randn(d_in, 2 + 8).to(CUDA)  # drawn on the host, placed (ModuleIndexer)
    assert_on_cuda(randomized_svd(torch.empty(2, d_out, d_in, device=CUDA), 2, test_matrix), "randomized_svd")


def case_loaded_tensor(loaded: Loaded) -> None:
    """int8 rows with their scales, as read from the store and placed, back to float32."""
    part = to_device(stored_tensor("u", torch.randn(3, 5), "int8"), CUDA)
    assert_on_cuda(loaded_tensor(part, "u"), "quantize.loaded")


def case_low_rank(loaded: Loaded) -> None:
    d_in, d_out = loaded.shape(loaded.names[0])
    assert_on_cuda(low_rank(torch.empty(2, d_out, d_in, device=CUDA), 2), "low_rank")


def case_plan_module_queries(loaded: Loaded) -> None:
    """The preparation of queries on cuda (Scorer.prepare_module: divided, low rank, plan),
    and its reload: what the prepare stage writes lies on the host; read back (its shapes are values:
    the real stored queries here), placed as Scorer.score places them, it scores on cuda."""
    name = loaded.names[0]
    d_in, d_out = loaded.shape(name)
    curvature = to_device(loaded.curvature["ekfac"][name], CUDA)
    preconditioned = precondition(torch.empty(2, d_out, d_in, device=CUDA), curvature, torch.float32)
    for factor_pair, tokens in ((None, 4.0), (low_rank(preconditioned, 1), 400.0), (low_rank(preconditioned, 1), 1.0)):
        planned = plan_module_queries(preconditioned, factor_pair, tokens, torch.float32)
        assert_on_cuda(planned, f"plan_module_queries {planned.kernel}")
        written = to_device(PreparedQueries({name: planned}).to_tensors(), "cpu")  # query_svc _put_prepared
        assert {tensor.device.type for tensor in written.values()} == {"cpu"}
    for rank, file in loaded.prepared_files.items():
        reloaded = PreparedQueries.from_tensors(file, loaded.names)
        scores = module_scores(cuda_capture(d_in, d_out), to_device(reloaded, CUDA).modules[name])
        assert_on_cuda(scores, f"reloaded rank {rank}")


def case_rotate(loaded: Loaded) -> None:
    d_in, d_out = loaded.shape(loaded.names[0])
    left, right = torch.empty(d_out, d_out, device=CUDA), torch.empty(d_in, d_in, device=CUDA)
    assert_on_cuda(rotate(torch.empty(2, d_out, d_in, device=CUDA), left, right), "rotate")


def case_rotate_in_order(loaded: Loaded) -> None:
    name = loaded.names[0]
    d_in, d_out = loaded.shape(name)
    q_s, q_a = to_device(loaded.eigen.bases()[name], CUDA)
    capture = cuda_capture(d_in, d_out)
    for order in ROTATION_ORDERS:
        assert_on_cuda(rotate_in_order(capture.s, capture.a, q_s, q_a, order), f"rotate_in_order {order}")


def case_rotated_per_sequence_gradients(loaded: Loaded) -> None:
    for name in loaded.names:
        capture = cuda_capture(*loaded.shape(name))
        bases = to_device(loaded.eigen.bases()[name], CUDA)  # FitModel.correction, Scorer.preconditioners
        assert_on_cuda(rotated_per_sequence_gradients(capture, *bases), "rotated (basis)")
        assert_on_cuda(rotated_per_sequence_gradients(capture, None, None), "rotated (no basis)")


def case_self_influence_terms(loaded: Loaded) -> None:
    for strategy in STRATEGIES:
        for name in loaded.names:
            d_in, d_out = loaded.shape(name)
            curvature = to_device(loaded.curvature[strategy][name], CUDA)
            rotated = rotated_per_sequence_gradients(
                cuda_capture(d_in, d_out), curvature.gradient_basis, curvature.activation_basis
            )
            assert_on_cuda(self_influence_terms(rotated, curvature), f"self_influence_terms {strategy}")


@contextlib.contextmanager
def gpu_of_capability(capability: tuple[int, int]):
    """torch.cuda answers as a GPU of `capability` would (this CPU build has none to ask)."""
    with mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: capability):
        yield


def case_accumulate(loaded: Loaded) -> None:
    """A device value into a device sum: float64, and float32 with its compensation (sums.py)."""
    for dtype, compensation in ((torch.float64, None), (torch.float32, torch.zeros(4, 4, device=CUDA))):
        total = torch.zeros(4, 4, dtype=dtype, device=CUDA)
        total, compensation = accumulate(total, torch.empty(4, 4, device=CUDA), compensation)
        assert_on_cuda([total] + ([compensation] if compensation is not None else []), f"{dtype} sum")


def case_running_sums_add(loaded: Loaded) -> None:
    """A pass's running sums live on the device, float64 on a full-rate GPU, float32 compensated
    on others; only `to_host` (once per task) moves them."""
    for capability, dtype in (((9, 0), torch.float64), ((8, 9), torch.float32)):
        with gpu_of_capability(capability):
            sums = RunningSums({"m": (4, 4)}, CUDA)
        sums.add("m", torch.empty(4, 4, device=CUDA))
        assert sums.totals["m"].dtype == dtype
        assert_on_cuda(sums.totals["m"], f"running sum on capability {capability}")


def case_gram(loaded: Loaded) -> None:
    for d in (7, 300):  # one GEMM, and the blocked upper triangle
        assert_on_cuda(gram(torch.empty(11, d, device=CUDA)), f"gram {d}")


def case_covariance_update(loaded: Loaded) -> None:
    name = loaded.names[0]
    d_in, d_out = loaded.shape(name)
    sums = RunningSums({f"{name}/activation": (d_in, d_in), f"{name}/gradient": (d_out, d_out)}, CUDA, False)
    covariance_update(sums, name, cuda_capture(d_in, d_out))
    assert_on_cuda(sums.totals, "covariance sums")


def case_covariance_accumulator_add(loaded: Loaded) -> None:
    """Adding a batch: the sums and the token counts stay on the device (nothing read per batch)."""
    with gpu_of_capability((8, 0)):
        accumulator = CovarianceAccumulator(loaded.tracked, CUDA)
    accumulator.add({name: cuda_capture(*loaded.shape(name)) for name in loaded.names}, BATCH)
    assert_on_cuda(accumulator._running.totals, "covariance sums")
    assert_on_cuda(accumulator._tokens, "token counts")


def case_correction_update(loaded: Loaded) -> None:
    """The correction pass's update in the eigenbases as the eigen stage stores them, placed by
    FitModel.correction (and with no basis: the diagonal strategy)."""
    bases = to_device(loaded.eigen.bases(), CUDA)
    for name in loaded.names:
        d_in, d_out = loaded.shape(name)
        for basis in (bases[name], None):
            sums = RunningSums({name: (d_out, d_in)}, CUDA, compensated=True)
            correction_update(sums, name, cuda_capture(d_in, d_out), basis)
            assert_on_cuda(sums.totals, "correction sums")


def case_correction_accumulator_add(loaded: Loaded) -> None:
    with gpu_of_capability((8, 6)):
        accumulator = CorrectionAccumulator(loaded.tracked, to_device(loaded.eigen.bases(), CUDA), CUDA)
    accumulator.add({name: cuda_capture(*loaded.shape(name)) for name in loaded.names}, BATCH)
    assert_on_cuda(accumulator._running.totals, "correction sums")
    assert_on_cuda(accumulator._tokens, "token count")


def case_all_finite(loaded: Loaded) -> None:
    """A GPU pass's per-batch finiteness check: a device flag, read once per pass (passes.py)."""
    capture = cuda_capture(3, 2)
    assert_on_cuda(all_finite([capture.a, capture.s]), "finiteness flag")


def case_sequence_tokens(loaded: Loaded) -> None:
    assert_on_cuda(sequence_tokens({"m": cuda_capture(3, 2)}), "token count")


def _module_indexer(loaded: Loaded, projection: str, name: str, strategy: str = "ekfac") -> ModuleIndexer:
    """As Indexer builds one: the module's preconditioner placed (Scorer.preconditioners), the rest
    placed by the ModuleIndexer itself."""
    factors = loaded.factors[strategy]
    curvature = to_device(loaded.curvature[strategy][name], CUDA)
    return ModuleIndexer(factors.modules[name], factors.factors[name], curvature, loaded.specs[projection], CUDA)


def case_module_indexer(loaded: Loaded) -> None:
    for projection in loaded.specs:
        for strategy in STRATEGIES:
            indexer = _module_indexer(loaded, projection, loaded.names[0], strategy)
            held = (indexer.rows, indexer.columns, indexer.project_s, indexer.project_a, indexer.test_matrix)
            for tensor in (*held, indexer.scale):
                if tensor is not None:
                    assert_on_cuda(tensor, f"ModuleIndexer {projection} {strategy}")


def case_compress(loaded: Loaded) -> None:
    for projection in loaded.specs:
        for strategy in STRATEGIES:
            for name in loaded.names:
                indexer = _module_indexer(loaded, projection, name, strategy)
                assert_on_cuda(indexer.compress(cuda_capture(*loaded.shape(name))), f"compress {projection} {strategy}")


def case_queries(loaded: Loaded) -> None:
    for projection in loaded.specs:
        for strategy in STRATEGIES:
            for name in loaded.names:
                d_in, d_out = loaded.shape(name)
                index_queries = _module_indexer(loaded, projection, name, strategy).queries(
                    torch.empty(2, d_out, d_in, device=CUDA)
                )
                assert_on_cuda(index_queries, f"index queries {projection} {strategy}")


def case_module_index_scores(loaded: Loaded) -> None:
    """Index scores of the stored queries against a stored block, both placed on one device."""
    for projection, queries in loaded.index_queries.items():
        block = loaded.blocks[projection]
        for name in loaded.names:
            scores = module_index_scores(to_device(queries[name], CUDA), to_device(module_part(block, name), CUDA))
            assert_on_cuda(scores, f"index scores {projection}")


def case_score_block(loaded: Loaded) -> None:
    for projection, queries in loaded.index_queries.items():
        scores = score_block(to_device(queries, CUDA), to_device(loaded.blocks[projection], CUDA))
        assert_on_cuda(scores, f"score_block {projection}")


def case_inverse_cdf(loaded: Loaded) -> None:
    for vocab in (loaded.vocab, 130):  # whole blocks, and a partial last block
        weights = torch.empty(BATCH, TOKENS, vocab, device=CUDA)
        uniforms = torch.rand(BATCH, TOKENS).to(CUDA)  # drawn on the host (capture.sequence_uniforms)
        assert_on_cuda(inverse_cdf(weights, uniforms), f"inverse_cdf {vocab}")


def case_sample_from(loaded: Loaded) -> None:
    """Labels on cuda from the sequences' CPU generators (indices stay on the host)."""
    probabilities = torch.empty(BATCH, TOKENS, loaded.vocab, device=CUDA)
    assert_on_cuda(sample_from(probabilities, loaded.batch.indices, seed=3), "sample_from")


def case_sample_labels(loaded: Loaded) -> None:
    logits = torch.empty(BATCH, TOKENS, loaded.vocab, device=CUDA)
    assert_on_cuda(sample_labels(logits, loaded.batch.indices, seed=3), "sample_labels")


def case_log_likelihood_gradient(loaded: Loaded) -> None:
    batch = loaded.batch.to(CUDA)  # captured_batches moves each batch so
    length = batch.input_ids.shape[1]
    logits = torch.empty(BATCH, length, loaded.vocab, device=CUDA)
    for objective in ("true", "sampled"):
        assert_on_cuda(log_likelihood_gradient(logits, batch, objective, seed=3), f"log-likelihood {objective}")


KERNEL_CASES = {
    "scoring.module_scores": case_module_scores,
    "scoring.module_token_scores": case_module_token_scores,
    "scoring.plan_module_queries": case_plan_module_queries,
    "capture.ModuleCapture.per_sequence_gradients": case_per_sequence_gradients,
    "precondition.precondition": case_precondition,
    "precondition.self_influence_terms": case_self_influence_terms,
    "precondition.low_rank": case_low_rank,
    "precondition.divided": case_divided,
    "score.QueryFactors.rotated": case_query_factors,
    "score.QueryFactors.gradients": case_query_factors,
    "index.randomized_svd": case_randomized_svd,
    "quantize.loaded": case_loaded_tensor,
    "rotation.rotate": case_rotate,
    "rotation.rotate_in_order": case_rotate_in_order,
    "rotation.rotated_per_sequence_gradients": case_rotated_per_sequence_gradients,
    "sums.accumulate": case_accumulate,
    "sums.RunningSums.add": case_running_sums_add,
    "covariance.CovarianceAccumulator.add": case_covariance_accumulator_add,
    "correction.CorrectionAccumulator.add": case_correction_accumulator_add,
    "correction.sequence_tokens": case_sequence_tokens,
    "finite.all_finite": case_all_finite,
    "covariance.gram": case_gram,
    "covariance.covariance_update": case_covariance_update,
    "correction.correction_update": case_correction_update,
    "index.ModuleIndexer.__init__": case_module_indexer,
    "index.ModuleIndexer.compress": case_compress,
    "index.ModuleIndexer.queries": case_queries,
    "index_scan.module_index_scores": case_module_index_scores,
    "index_scan.score_block": case_score_block,
    "capture.inverse_cdf": case_inverse_cdf,
    "capture.sample_from": case_sample_from,
    "capture.sample_labels": case_sample_labels,
    "capture.log_likelihood_gradient": case_log_likelihood_gradient,
}

# Reads values: cannot run on fake tensors; kept outside the kernels; covered by CPU runs.
VALUE_READING = {
    "finite.is_finite": "bool(isfinite().all()): every check of finite.py (tests/services/cli/test_non_finite.py)",
    "finite.require_finite": "raises naming what it checked (tests/services/cli/test_non_finite.py)",
    "finite.first_non_finite": "which sequence or module is non-finite (tests/services/cli/test_non_finite.py)",
    "precondition.Damping.value": "λ = factor × mean Λ, read on the host when a Preconditioner is prepared",
    "precondition.preconditioner": "λ and the singular check on the host, before placement (test_engine_exact)",
    "score.top_k_entries": "topk and .tolist() of host scores (test_engine_invariance)",
    "score.merge": "the shards' host scores: sum, mask, top-k (test_engine_invariance, test_system)",
    "score.damping_overlap": "argsort and .tolist() of the merged host scores (tests/engine/test_damping_check.py)",
    "score.concatenate": "torch.equal of the shards' indices (test_engine_invariance)",
    "two_stage.two_stage": "the union of candidates (lists), then Scorer.settle and Scorer.score (test_index_engine)",
    "two_stage.top_candidates": "topk(...).tolist() of host index scores (test_index_engine)",
    "index.packed": "the kept pairs by boolean mask (a shape from values), to the host (test_index_compact)",
    "index.pack_batch": "select_ranks then packed per module (test_index_compact)",
    "index_scan.sub_part": "int(sum of counts): how many pairs are gathered, from values (test_index_compact cascade)",
    "index_scan.cascade_block": "coarse scores, topk, then sub_part per query and module (test_index_compact cascade)",
    "capture.sequence_uniforms": "indices.tolist(): each sequence's CPU generator (test_device_placement CPU draws)",
    "lexical.Bm25Index.build": "bm25s over token ids on the host, its sparse matrix as host tensors (test_lexical)",
    "lexical.Bm25Index.scores": "host BM25 scores from bm25s (numpy), float64 (test_lexical)",
    "lexical.Bm25Index.candidates": "argsort of host BM25 scores, .tolist() (test_lexical)",
}

# A step's entry: places what it is handed, then calls the kernels above; covered by the CPU runs
# of the stages that call it (tests/services/system/test_system.py, test_index.py, test_engine_*.py).
STEPS = {
    "score.Scorer.__init__": "the model's device; the factors placed as preconditioners (once)",
    "score.Scorer.prepare_module": "QueryFactors.rotated, divided, require_finite, low_rank, plan_module_queries",
    "score.Scorer.settle": "to_device(prepared) then rotate per module",
    "index_scan.score_index_shard": "score_block per block as it is given",
    "index_scan.score_index_shards": "score_block per block and batch as it is given (test_index_coalesce)",
    "index_scan.module_part": "a block's keys for one module (views; format 1 reshaped): case_score_block",
    "score.Scorer.score": "to_device(prepared) then module_scores per batch",
    "score.Scorer.token_scores": "to_device(prepared) then module_token_scores",
    "score.Scorer.attach_token_scores": "to_device(prepared) once, then token_scores per sequence",
    "index.Indexer.write_blocks": "blocks (host tensors) handed to the caller's writer, the pass under within_memory",
    "fit.FitModel.correction": "to_device(eigen bases, replayed captures) then CorrectionAccumulator.add",
    "fit.CaptureCache.offer": "copies a pass's captures to the host arena (a transfer, by design)",
    "score.compute_scores": "the in-process API: Scorer and score_in_memory",
    "score.compute_self_influence": "the in-process API: Scorer.self_influence",
    "data.Batch.to": "places a batch's ids and masks on the model's device (captured_batches); indices stay",
    "device.host_to_device": "the one host-to-GPU copy (pinned, not blocking): batches, label uniforms, columns",
}

# Host-side by contract, or the model pass itself.
HOST = {
    "capture.capture": "the model's forward and backward (fake-CUDA autograd aborts the process): CPU runs",
    "modules.ExpertLinear.forward": "one expert inside the model's forward, on the model's device: CPU runs "
    "(tests/engine/test_moe.py)",
    "score.require_fingerprint": "the factors' recorded fingerprint against a computed one (no tensor is read)",
    "model_io._StoredTensor.values": "sampled values of a checkpoint file, read on the host for the CLI's "
    "fingerprint check (tests/services/cli/test_cli_checks.py)",
    "arena.HostArena.copy": "a contiguous host copy",
    "correction.CorrectionAccumulator.__init__": "holds the host sums and the bases its caller placed",
    "correction.CorrectionAccumulator.merge": "host float64 sums",
    "correction.CorrectionAccumulator.merge_modules": "host float64 sums of another module group",
    "covariance.Eigenbases.merged": "host bases of another module group",
    "correction.CorrectionAccumulator.from_state": "from the store",
    "covariance.CovarianceAccumulator.merge": "host float64 sums",
    "covariance.CovarianceAccumulator.from_state": "from the store",
    "covariance.Eigenbases.from_tensors": "from the store",
    "covariance.Eigenbases.to_tensors": "for the store",
    "covariance.Eigenbases.bases": "(Q_S, Q_A) where they lie: FitModel.correction places them",
    "factors.ModuleFactors.diagonal": "Λ in float64 on the host (kfac: λ_S λ_Aᵀ), read when preparing a Preconditioner",
    "factors.ModuleFactors.tensors": "bookkeeping",
    "score.PreparedQueries.to_tensors": "for the store (query_svc moves them to the host first)",
    "scoring.ModuleQueries.to_tensors": "for the store",
    "score.ShardScores.to_tensors": "for the store",
    "covariance.upper_triangle": "packing host sums for the store",
    "covariance.symmetric_from_upper": "unpacking them",
    "covariance.symmetric_eigh": "float64 eigh of the host sums (on the GPU when the worker has one)",
    "data.unpack_sequences": "token shards from the store",
    "factor_io.to_artifact": "factor files",
    "factor_io.module_factors": "factor files",
    "factor_io.from_artifact": "factor files",
    "factor_io.check_files": "factor files",
    "factor_io.storage_dtype_for": "metadata",
    "factors.ModuleFactors.stored_by": "bookkeeping",
    "fit.finalize": "host sums into a factor set (no model)",
    "fit.combine": "host sums into a factor set",
    "fit.eigendecompose": "float64 eigh of the host sums",
    "index_scan.queries_to_tensors": "for the store",
    "index_scan.queries_from_tensors": "from the store",
    "index.block_bytes": "sizes of host block tensors",
    "index.joined": "host block tensors concatenated",
    "quantize.stored": "for the store: cast or quantised, on the host",
    "modules.weight_gradient_layout": "views for StreamBlocks' host blocks",
    "score.PreparedQueries.from_tensors": "from the store (case_plan_module_queries reloads and places them)",
    "score.ShardScores.from_tensors": "from the store",
    "score.merge_self_influence": "host scores",
    "score.joined": "host scores: a shard's module groups' rows side by side",
    "scoring.ModuleQueries.from_tensors": "from the store (see PreparedQueries.from_tensors)",
}

TENSOR_TYPES = re.compile(
    r"\b(Tensor|ModuleCapture|ModuleQueries|PreparedQueries|ModuleFactors|FactorSet|Eigenbases|Preconditioner"
    r"|ShardScores|CovarianceAccumulator|CorrectionAccumulator|Batch)\b"
)


def engine_tensor_functions() -> set[str]:
    """ "module.function" / "module.Class.method" of every public function of services/engine with
    a parameter annotated with a tensor type (every __init__ that takes one included), and every
    public method (not a property) of a class whose fields are annotated with one."""
    found = set()
    for path in sorted(ENGINE.glob("*.py")):

        def visit(node, prefix: str, holds_tensors: bool = False, module: str = path.stem) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef):
                    fields = [ast.unparse(s.annotation) for s in child.body if isinstance(s, ast.AnnAssign)]
                    visit(child, f"{prefix}{child.name}.", any(TENSOR_TYPES.search(f) for f in fields))
                elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    if child.name.startswith("_") and child.name != "__init__":
                        continue
                    decorators = {ast.unparse(d) for d in child.decorator_list}
                    arguments = [*child.args.posonlyargs, *child.args.args, *child.args.kwonlyargs]
                    annotations = [ast.unparse(a.annotation) for a in arguments if a.annotation is not None]
                    takes = any(TENSOR_TYPES.search(annotation) for annotation in annotations)
                    method = (
                        holds_tensors and child.name != "__init__" and not decorators & {"property", "staticmethod"}
                    )
                    if takes or method:
                        found.add(f"{module}.{prefix}{child.name}")

        visit(ast.parse(path.read_text()), "")
    return found


def test_every_engine_function_that_takes_tensors_is_classified_and_every_kernel_has_a_case():
    lists = {"KERNEL_CASES": KERNEL_CASES, "VALUE_READING": VALUE_READING, "STEPS": STEPS, "HOST": HOST}
    listed = [name for entries in lists.values() for name in entries]
    assert len(listed) == len(set(listed)), "a function is listed twice"
    found = engine_tensor_functions()
    unclassified = sorted(found - set(listed))
    assert not unclassified, (
        f"new engine functions take tensors: {unclassified}. A kernel (arithmetic on tensors of one device) "
        "needs a fake-CUDA case in KERNEL_CASES; code that reads values, a step's entry or host-side code is "
        "listed in VALUE_READING, STEPS or HOST with the CPU test that covers it"
    )
    stale = sorted(set(listed) - found)
    assert not stale, f"listed but not found by the scan (renamed or removed?): {stale}"
    # the scan sees what the issue names as kernels
    for kernel in (
        "scoring.module_scores",
        "precondition.precondition",
        "index.ModuleIndexer.compress",
        "sums.accumulate",
        "correction.correction_update",
        "precondition.self_influence_terms",
    ):
        assert kernel in found and kernel in KERNEL_CASES, kernel


@pytest.mark.parametrize("kernel", sorted(KERNEL_CASES))
def test_the_kernel_runs_on_fake_cuda_with_its_inputs_placed_as_loaded(kernel, loaded):
    with fake_cuda():
        KERNEL_CASES[kernel](loaded)


def test_without_the_placement_step_the_loaded_inputs_meet_cuda_on_the_cpu(loaded):
    """The controls: the same calls with the inputs as read from the store (not placed) fail, as the
    issue found (`module_scores` with reloaded queries and CUDA captures, the index's query side
    with CPU factors, the correction with CPU bases); so the cases above prove the placement."""
    name = loaded.names[0]
    d_in, d_out = loaded.shape(name)
    factors = loaded.factors["ekfac"].factors[name]
    host_curvature = loaded.curvature["ekfac"][name]
    with fake_cuda():
        unplaced = [
            lambda: module_scores(cuda_capture(d_in, d_out), loaded.prepared[None].modules[name]),
            lambda: module_scores(cuda_capture(d_in, d_out), loaded.prepared[1].modules[name]),
            lambda: precondition(torch.empty(2, d_out, d_in, device=CUDA), host_curvature, torch.float32),
            lambda: correction_update(
                RunningSums({name: (d_out, d_in)}, CUDA, compensated=True),
                name,
                cuda_capture(d_in, d_out),
                loaded.eigen.bases()[name],
            ),
            lambda: ModuleIndexer(loaded.tracked[name], factors, host_curvature, loaded.specs["none"]).queries(
                torch.empty(2, d_out, d_in, device=CUDA)
            ),
            lambda: score_block(to_device(loaded.index_queries["svd"], CUDA), loaded.blocks["svd"]),
        ]
        for number, call in enumerate(unplaced):
            with pytest.raises(FakeTensorDeviceMismatchError):
                call()
                raise AssertionError(f"control {number} ran without its inputs placed")


def test_sampled_labels_are_drawn_on_the_host_whatever_the_device():
    """A GPU fit draws the CPU reference's labels: each sequence's uniforms come from its own CPU
    generator, independent of the batch and the device (the draws the CPU always made)."""
    indices = torch.tensor([4, 0, 7])
    uniforms = capture_module.sequence_uniforms(indices, 6, seed=11)
    assert uniforms.device.type == "cpu" and uniforms.shape == (3, 6)
    alone = capture_module.sequence_uniforms(torch.tensor([0]), 6, seed=11)
    assert torch.equal(uniforms[1], alone[0])
    reference = torch.rand(6, generator=torch.Generator(device="cpu").manual_seed(11 * 1_000_003 + 7 * 7919 + 17))
    assert torch.equal(uniforms[2], reference)


def test_tf32_is_off_inside_every_step_and_the_settings_come_back_after():
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        with exact_arithmetic():
            with exact_arithmetic():  # nested (a step inside a step), or another worker thread's step
                pass
            assert tf32_settings() == {
                "matmul_tf32": False,
                "cudnn_tf32": False,
                "float32_matmul_precision": "highest",
                "tf32_forced_by_environment": False,
            }
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        seen = {}
        model, tokenizer = tiny_model("gpt2", d_model=8), IntTokenizer()

        class Spy(torch.nn.Module):  # records the settings while the fit's pass runs the model
            def forward(self, x):
                seen.update(tf32_settings())
                return x

        model.transformer.h[0].mlp.register_module("spy", Spy())
        model.transformer.h[0].mlp.register_forward_pre_hook(lambda module, args: module.spy(args[0]))
        factors = fit_factors(model, tokenizer, random_examples(4, seed=1), FitConfig(batch_size=2))
        assert seen["matmul_tf32"] is False and seen["float32_matmul_precision"] == "highest"
        assert torch.backends.cuda.matmul.allow_tf32, "restored once the fit ended"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
    provenance = to_artifact(factors)[0]["provenance"]
    assert provenance["device"] == "cpu" and provenance["tf32"] is False
    assert provenance["torch_version"] == torch.__version__ and provenance["model_dtype"] == "float64"
    assert "cuda_version" in provenance and "gpu" not in provenance


def test_the_fitted_model_travels_as_json_for_the_model_free_stages():
    model, tokenizer = tiny_model("gpt2", d_model=8), IntTokenizer()
    fitted = FitModel(model, tokenizer, FitConfig()).fitted
    again = FittedModel.from_json(fitted.to_json())
    assert again == fitted and list(again.modules) == list(fitted.modules)  # model order kept
    assert again.arithmetic["device"] == "cpu" and again.storage_dtype == torch.float64  # a float64 model
