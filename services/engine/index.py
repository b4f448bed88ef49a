"""Compressed training gradients (the index): scoring a query batch without a pass over the corpus.

For a tracked module with factors (Q_S, Q_A, Λ) and damping λ, the EK-FAC score of query q on
training sequence m is, in the eigenbasis,

    score(q, m) = Σ_ij G̃_q[i, j] G̃_m[i, j] / (Λ[i, j] + λ),      G̃ = Q_Sᵀ DW Q_A
                = ⟨W_q, W_m⟩,                                     W = G̃ ⊘ sqrt(Λ + λ)   (whitened)

so an index stores each sequence's whitened gradient W_m (or a compression of it) once, and a
query batch costs one inner product per (query, sequence) pair. Compressions (`--projection`):

    none     W_m itself [d_out, d_in]: exact (tests, small models)
    svd      W_m ≈ U_m V_mᵀ, its rank-R truncated SVD (singular values folded into V): U [d_out, R],
             V [d_in, R]. The truncation is optimal for the whitened inner product, the one that
             scores. Computed by a randomized SVD (one power iteration) in ≈ 4·d_out·d_in·(R+8)
             multiply-adds per sequence.
    eigen    W_m restricted to the K output and K input eigendirections that carry the most
             curvature (largest row / column sums of Λ): [K, K].
    random   Kronecker-structured Gaussian projections (LoGra-style) of the raw gradient:
             R_S DW_m R_Aᵀ [k, k], R ~ N(0, 1/k). The query side is the full EK-FAC IHVP projected the
             same way, so each score is an unbiased (Johnson-Lindenstrauss) estimate of the exact
             one; no curvature is fitted in the projected space (LoGra does, at the cost of another
             pass over the data).
The query side: none/eigen/svd whiten the query gradient the same way (svd then keeps the query's
rank-R_q truncation, so a pair costs R·R_q·(d_out + d_in) instead of d_out·d_in); random projects
the preconditioned query. Scores of a compressed index are approximations: two-stage retrieval
rescores an index's top candidates exactly.

Layout of a block (one safetensors file; n sequences): per module "{module}/w" [n, a, b] (none,
eigen, random) or "{module}/u" [n, d_out, R] and "{module}/v" [n, d_in, R] (svd), in the storage
dtype, and "index" [n] (global sequence indices).

Placement (device.py): a ModuleIndexer prepares its whitening, rows and columns, projections and
test matrix on the host (from the factors as loaded, and CPU generators: the same on every
device) and places them on the model's device once; `compress` and `queries` then read only
tensors there. `score_block` takes index-space queries and a block on one device (the index_score
stage: both as read from the store, on the host).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import InputError
from ..options import DIM, PROJECTION, RANK, SEED, STORAGE_DTYPE
from .capture import ModuleCapture
from .device import exact_arithmetic, to_device
from .factors import ModuleFactors
from .model_io import parse_dtype
from .modules import TrackedModule
from .passes import captured_batches
from .precondition import Preconditioner, low_rank, precondition
from .rotation import rotated_per_sequence_gradients
from .score import Scorer, ScoreResult, TopEntry, top_k_entries

PROJECTIONS = ("none", "svd", "eigen", "random")
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
_OVERSAMPLE = 8  # extra columns of the randomized SVD's test matrix


@dataclass(frozen=True)
class IndexSpec:
    """How an index compresses each sequence's gradient (see the module docstring)."""

    projection: str = PROJECTION.default
    rank: int = RANK.default  # svd: R per sequence
    dim: int = DIM.default  # eigen, random: K (or k) per side
    seed: int = SEED.default  # random projections and the randomized SVD's test matrices
    storage_dtype: str = STORAGE_DTYPE.default
    query_rank: int | None = 16  # svd: the query side's rank in index space (None: full)

    def validate(self) -> None:
        if self.projection not in PROJECTIONS:
            raise InputError(f"unknown projection '{self.projection}' (choose from {', '.join(PROJECTIONS)})")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise InputError(f"--storage-dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        if self.rank < 1 or self.dim < 1:
            raise InputError(f"--rank and --dim must be >= 1, got {self.rank} and {self.dim}")
        if self.query_rank is not None and self.query_rank < 1:
            raise InputError(f"the index query rank must be >= 1, got {self.query_rank}")

    def to_dict(self) -> dict:
        return asdict(self)

    def bytes_per_sequence(self, modules: dict) -> int:
        """Stored bytes of one sequence's compressed gradient over `modules` (TrackedModule)."""
        element = torch.tensor([], dtype=parse_dtype(self.storage_dtype)).element_size()
        total = 0
        for module in modules.values():
            d_out, d_in = module.d_out, module.d_in_full
            if self.projection == "none":
                total += d_out * d_in
            elif self.projection == "svd":
                total += min(self.rank, d_out, d_in) * (d_out + d_in)
            else:
                total += min(self.dim, d_out) * min(self.dim, d_in)
        return total * element


def _generator(seed: int, name: str, salt: int) -> torch.Generator:
    digest = sum((index + 1) * ord(character) for index, character in enumerate(name))
    return torch.Generator().manual_seed((seed * 1_000_003 + digest * 7919 + salt) % (2**63 - 1))


class ModuleIndexer:
    """One module's compression and its query side, from the factors and the build's damping.

    Tensors: s [B, N, d_out], a [B, N, d_in] (a capture); query gradients [Q, d_out, d_in]; all on
    `curvature`'s device (the model's), where everything this holds is placed once, when built."""

    def __init__(
        self,
        tracked: TrackedModule,
        factors: ModuleFactors,
        curvature: Preconditioner,
        spec: IndexSpec,
        device: torch.device | str = "cpu",
    ):
        """`factors`: the module's factors as loaded (on the host: the eigen rows and columns are
        read from Λ there); `curvature`: its preconditioner, already on `device` (Scorer.preconditioners)."""
        name = tracked.name
        self.name, self.spec, self.curvature = name, spec, curvature
        self.damping_value = curvature.damping
        self.has_basis = curvature.gradient_basis is not None
        d_out, d_in = tracked.d_out, tracked.d_in_full
        host: dict[str, torch.Tensor] = {}
        if spec.projection == "eigen":
            marginal = factors.diagonal() if curvature.denominator is not None else None
            host["rows"] = self._top(marginal.sum(1) if marginal is not None else None, d_out, spec.dim)
            host["columns"] = self._top(marginal.sum(0) if marginal is not None else None, d_in, spec.dim)
        if spec.projection == "random":
            k_out, k_in = min(spec.dim, d_out), min(spec.dim, d_in)
            host["project_s"] = torch.randn(k_out, d_out, generator=_generator(spec.seed, name, 1)) / k_out**0.5
            host["project_a"] = torch.randn(k_in, d_in, generator=_generator(spec.seed, name, 2)) / k_in**0.5
        if spec.projection == "svd":
            rank = min(spec.rank, d_out, d_in)
            host["test_matrix"] = torch.randn(d_in, rank + _OVERSAMPLE, generator=_generator(spec.seed, name, 3))
        placed = to_device(host, device)
        self.rows, self.columns = placed.get("rows"), placed.get("columns")
        self.project_s, self.project_a = placed.get("project_s"), placed.get("project_a")
        self.test_matrix = placed.get("test_matrix")
        # √(Λ + λ) [d_out, d_in] float64, on the device (None: no curvature)
        self.scale = None if curvature.denominator is None else curvature.denominator.sqrt()

    @staticmethod
    def _top(weights: torch.Tensor | None, size: int, k: int) -> torch.Tensor:
        k = min(k, size)
        if weights is None:
            return torch.arange(k)
        return torch.topk(weights, k).indices.sort().values

    # -- the training side ----------------------------------------------------------------------

    def _whitened(self, rotated: torch.Tensor) -> torch.Tensor:
        return rotated if self.scale is None else rotated / self.scale.to(rotated.dtype)

    def compress(self, capture: ModuleCapture) -> dict[str, torch.Tensor]:
        """A batch's compressed gradients (in the capture's dtype; the caller stores them in the
        storage dtype)."""
        dtype = capture.a.dtype
        projection = self.spec.projection
        if projection == "random":
            s = capture.s @ self.project_s.to(dtype).T  # [B, N, k_out]
            a = capture.a @ self.project_a.to(dtype).T  # [B, N, k_in]
            return {"w": torch.bmm(s.transpose(1, 2), a)}
        basis = (None, None)
        if self.has_basis:
            basis = (self.curvature.gradient_basis.to(dtype), self.curvature.activation_basis.to(dtype))
        if projection == "eigen":
            if basis[0] is not None:
                s = capture.s @ basis[0][:, self.rows]
                a = capture.a @ basis[1][:, self.columns]
            else:
                s, a = capture.s[..., self.rows], capture.a[..., self.columns]
            block = torch.bmm(s.transpose(1, 2), a)
            scale = None if self.scale is None else self.scale[self.rows][:, self.columns]
            return {"w": block if scale is None else block / scale.to(block.dtype)}
        whitened = self._whitened(rotated_per_sequence_gradients(capture, *basis))  # [B, d_out, d_in]
        if projection == "none":
            return {"w": whitened}
        return dict(zip(("u", "v"), self._randomized_svd(whitened), strict=True))

    def _randomized_svd(self, matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-R truncated SVD of a stack [B, m, n] as U [B, m, R] (orthonormal columns) and
        V [B, n, R] (σ folded in): a shared Gaussian test matrix, one power iteration, then the
        small projection P = Basisᵀ M [B, R+p, n] truncated through the eigenvectors E of P Pᵀ
        [R+p, R+p] (its left singular vectors): U = Basis E_R, V = Pᵀ E_R, so U Vᵀ = Basis E_R E_Rᵀ P.
        The symmetric eigensolver on (R+p)² matrices costs a fraction of an SVD of P on CPU, and
        nothing is divided by a singular value (a zero gradient gives zero factors)."""
        rank = min(self.spec.rank, *matrices.shape[1:])
        omega = self.test_matrix[: matrices.shape[2]].to(matrices.dtype)  # [n, R+p]
        sketch = matrices @ omega  # [B, m, R+p]
        sketch = matrices @ (matrices.transpose(1, 2) @ sketch)  # one power iteration
        basis, _ = torch.linalg.qr(sketch)  # [B, m, R+p]
        small = basis.transpose(1, 2) @ matrices  # [B, R+p, n]
        _, vectors = torch.linalg.eigh(small @ small.transpose(1, 2))  # ascending eigenvalues
        top = vectors[..., -rank:]  # [B, R+p, R]
        return basis @ top, small.transpose(1, 2) @ top

    # -- the query side -------------------------------------------------------------------------

    def queries(self, gradients: torch.Tensor) -> dict[str, torch.Tensor]:
        """The index-space form of query gradients [Q, d_out, d_in] (see the module docstring)."""
        projection = self.spec.projection
        gradients = gradients.to(torch.float32)
        if projection == "random":
            preconditioned = precondition(gradients, self.curvature, torch.float32)
            return {"w": self.project_s @ preconditioned @ self.project_a.T}
        rotated = gradients
        if self.has_basis:
            q_s, q_a = self.curvature.gradient_basis.float(), self.curvature.activation_basis.float()
            rotated = q_s.T @ gradients @ q_a
        whitened = self._whitened(rotated)
        if projection == "eigen":
            return {"w": whitened[:, self.rows][:, :, self.columns]}
        if projection == "svd" and self.spec.query_rank:
            u, v = low_rank(whitened, self.spec.query_rank)
            return {"u": u, "v": v}
        return {"w": whitened}

    @staticmethod
    def scores(queries: dict[str, torch.Tensor], block: dict[str, torch.Tensor]) -> torch.Tensor:
        """Index scores of every query against every sequence of a block: [Q, n] float32.

        Block and query tensors as `compress` and `queries` make them (any storage dtype)."""
        if "w" in block:  # none, eigen, random: plain inner products of [a, b] matrices
            w = block["w"].float().reshape(block["w"].shape[0], -1)  # [n, a·b]
            if "w" in queries:
                return queries["w"].reshape(queries["w"].shape[0], -1) @ w.T
            raise InputError("index blocks and queries disagree")
        u, v = block["u"].float(), block["v"].float()  # [n, d_out, R], [n, d_in, R]
        if "u" in queries:  # ⟨U_q V_qᵀ, U_m V_mᵀ⟩ = Σ (U_qᵀ U_m) ⊙ (V_qᵀ V_m)
            left = torch.einsum("qor,nos->qnrs", queries["u"], u)  # [Q, n, R_q, R]
            right = torch.einsum("qir,nis->qnrs", queries["v"], v)
            return (left * right).sum((2, 3))
        w = queries["w"]  # [Q, d_out, d_in]: Σ_r u_rᵀ W_q v_r
        projected = torch.einsum("qoi,nir->qnor", w, v)  # [Q, n, d_out, R]
        return torch.einsum("qnor,nor->qn", projected, u)


class Indexer:
    """A model and factor set ready to build or query an index: the modules matched and the
    fingerprint checked (through a Scorer, which also computes query gradients and rescores
    exactly), one ModuleIndexer per module. Built once per task."""

    def __init__(self, model, tokenizer, factors, spec: IndexSpec, config):
        spec.validate()
        self.spec = spec
        self.scorer = Scorer(model, tokenizer, factors, config)
        curvature = self.scorer.preconditioners
        self.modules = {
            name: ModuleIndexer(factors.modules[name], factors.factors[name], curvature[name], spec, self.scorer.device)
            for name in self.scorer.names
        }

    @property
    def storage_dtype(self) -> torch.dtype:
        return parse_dtype(self.spec.storage_dtype)

    def damping_values(self) -> dict[str, float]:
        return {name: module.damping_value for name, module in self.modules.items()}

    def block_sequences(self, target_bytes: int = 64 << 20) -> int:
        """Sequences per stored block: about `target_bytes` of compressed gradients, at least one
        batch (a scoring worker holds a block or two at a time)."""
        per_sequence = self.spec.bytes_per_sequence(self.scorer.factors.modules)
        batch = self.scorer.config.batch_size
        return max(batch, target_bytes // max(per_sequence, 1) // batch * batch)

    def blocks(self, sequences, progress=None, block_sequences: int | None = None):
        """Compressed gradients of `sequences` as blocks (dicts of tensors in the storage dtype with
        "index" [n]), each of at most `block_sequences` sequences, in the pass's batch order."""
        limit = block_sequences or self.block_sequences()
        pending: dict[str, list[torch.Tensor]] = {}
        indices: list[torch.Tensor] = []
        count = 0
        with exact_arithmetic():
            for batch, captures in captured_batches(
                self.scorer.model,
                self.scorer.modules,
                sequences,
                batch_size=self.scorer.config.batch_size,
                pad_token_id=self.scorer.pad_token_id,
                stage="index",
                progress=progress,
            ):
                for name, module in self.modules.items():
                    for key, value in module.compress(captures[name]).items():
                        pending.setdefault(f"{name}/{key}", []).append(value.to("cpu", self.storage_dtype))
                indices.append(batch.indices.clone())
                count += len(batch.indices)
                if count >= limit:
                    yield _joined(pending, indices)
                    pending, indices, count = {}, [], 0
        if count:
            yield _joined(pending, indices)

    def queries(self, queries, progress=None) -> dict[str, dict[str, torch.Tensor]]:
        """Index-space queries per module (from the query gradients, computed once)."""
        return self.queries_from(self.scorer.query_gradients(queries, progress))

    @exact_arithmetic()
    def queries_from(self, gradients: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Index-space queries from query gradients already computed ({name: [Q, d_out, d_in]})."""
        return {name: module.queries(gradients[name]) for name, module in self.modules.items()}

    def score_block(self, queries: dict[str, dict[str, torch.Tensor]], block: dict[str, torch.Tensor]) -> torch.Tensor:
        return score_block(queries, block)


def score_block(queries: dict[str, dict[str, torch.Tensor]], block: dict[str, torch.Tensor]) -> torch.Tensor:
    """[Q, n] index scores of a block: the sum over modules. Needs no model: a scoring worker
    holds only the index-space queries and streams blocks."""
    total = None
    for name, module_queries in queries.items():
        part = {key[len(name) + 1 :]: value for key, value in block.items() if key.startswith(name + "/")}
        scores = ModuleIndexer.scores(module_queries, part)
        total = scores if total is None else total + scores
    return total


def queries_to_tensors(queries: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Flat tensors "{module}/{key}" for storage (index-space queries)."""
    return {f"{name}/{key}": value.contiguous() for name, parts in queries.items() for key, value in parts.items()}


def queries_from_tensors(tensors: dict[str, torch.Tensor], modules) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {key[len(name) + 1 :]: value for key, value in tensors.items() if key.startswith(name + "/")}
        for name in modules
    }


def _joined(pending: dict[str, list[torch.Tensor]], indices: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    block = {key: torch.cat(parts).contiguous() for key, parts in pending.items()}
    block["index"] = torch.cat(indices)
    return block


def default_rescore(n_train: int, top_k: int) -> int:
    """Candidates rescored exactly per query by default: 2% of the corpus, at least 2 x top_k
    (and at least 20), at most the corpus (bench/bench_index.py measures the recall of each K)."""
    return min(n_train, max(20, 2 * top_k, -(-2 * n_train // 100)))


def two_stage(
    scorer: Scorer,
    prepared,
    index_scores: torch.Tensor,
    sequence_of,
    candidates: int,
    progress=None,
):
    """Rescore each query's top `candidates` by index score exactly (full-rank EK-FAC, their
    sequences recomputed: the union over queries once) and rank its final top-k among them.

    index_scores: [Q, N]. Returns a ScoreResult whose scores are the index scores with every
    rescored column exact, and whose top-k (with per-module and per-token breakdowns as configured)
    come from exact scores only."""
    n_queries, n_train = index_scores.shape
    config = scorer.config
    if candidates <= 0:  # no second stage: the index's own ranking
        result = ScoreResult(scores=index_scores.to(torch.float32), module_names=scorer.names)
        result.top = top_k_entries(index_scores, None, scorer.names, config.top_k)
        for entry in (entry for entries in result.top for entry in entries):
            entry.approximate = True
        if config.per_token and config.top_k:
            scorer.attach_token_scores(prepared, result.top, sequence_of, progress)
        return result, 0
    k = min(candidates, n_train)
    chosen = [torch.topk(index_scores[query], k).indices.tolist() for query in range(n_queries)]
    union = sorted(set().union(*chosen))
    exact = scorer.score(prepared, [sequence_of(index) for index in union], progress)  # [M, Q, U]
    column = {index: position for position, index in enumerate(union)}
    totals = exact.scores.sum(0)  # [Q, U]
    scores = index_scores.to(torch.float64).clone()
    scores[:, union] = totals
    top = []
    for query in range(n_queries):
        columns = torch.tensor([column[index] for index in chosen[query]])
        values = totals[query, columns]
        order = torch.argsort(values, descending=True, stable=True)[: config.top_k]
        entries = []
        for position in order.tolist():
            index, value = chosen[query][position], float(values[position])
            breakdown = None
            if config.per_module:
                breakdown = {name: float(exact.scores[m, query, column[index]]) for m, name in enumerate(scorer.names)}
            entries.append(TopEntry(index=index, score=value, per_module=breakdown))
        top.append(entries)
    result = ScoreResult(scores=scores.to(torch.float32), module_names=scorer.names, top=top)
    if config.per_token and config.top_k:
        scorer.attach_token_scores(prepared, result.top, sequence_of, progress)
    return result, len(union)
