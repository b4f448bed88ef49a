"""Compressed training gradients (the index): scoring a query batch without a pass over the corpus.

For a tracked module with factors (Q_S, Q_A, Λ) and damping λ, the EK-FAC score of query q on
training sequence m is, in the eigenbasis,

    score(q, m) = Σ_ij G̃_q[i, j] G̃_m[i, j] / (Λ[i, j] + λ),      G̃ = Q_Sᵀ DW Q_A
                = ⟨W_q, W_m⟩,                                     W = G̃ ⊘ sqrt(Λ + λ)   (whitened)

so an index stores each sequence's whitened gradient W_m (or a compression of it) once, and a
query batch costs one inner product per (query, sequence) pair. Compressions (`--projection`):

    none     W_m itself [d_out, d_in]: exact (tests, small models)
    svd      W_m ≈ Σ_r u_r v_rᵀ, its truncated SVD (singular values folded into v): at most `rank`
             factor pairs per sequence and module. The truncation is optimal for the whitened inner
             product, the one that scores. Computed by a randomized SVD (one power iteration) in
             ≈ 4·d_out·d_in·(R+8) multiply-adds per sequence. How many pairs each sequence keeps in
             each module is chosen from its whitened singular values (`select_ranks`): the fewest,
             across all modules, that carry `energy` of the sequence's whitened energy ‖W‖², within
             `budget` bytes per sequence; a module whose gradient concentrates in few directions,
             or carries little of the sequence's score, keeps fewer.
    eigen    W_m restricted to the K output and K input eigendirections that carry the most
             curvature (largest row / column sums of Λ): [K, K].
    random   Kronecker-structured Gaussian projections (LoGra-style) of the raw gradient:
             R_S DW_m R_Aᵀ [k, k], R ~ N(0, 1/k). The query side is the full EK-FAC IHVP projected the
             same way, so each score is an unbiased (Johnson-Lindenstrauss) estimate of the exact
             one; no curvature is fitted in the projected space (LoGra does, at the cost of another
             pass over the data).
Storage (`--storage-dtype`, quantize.py): a float dtype, or int8 with one absmax scale per row.

The query side starts from each query's per-token factors rotated into the eigenbasis (G̃_q, in
the cheapest order for its length: Scorer.rotated_query_gradients), then whitens it the same way
(svd keeps the query's rank-R_q truncation, by the build's randomized SVD in float32, so a pair
costs R·R_q·(d_out + d_in) instead of d_out·d_in); random projects the preconditioned query,
(R_S Q_S) P̃ (R_A Q_A)ᵀ, without forming P. Scores of a compressed index are approximations:
two-stage retrieval rescores candidates exactly (two_stage.py); block scoring is index_scan.py.

Layout of a block (one safetensors file; n sequences) by format (catalog/indexes.py's
format_version): per module "{module}/w" [n, a, b] (none, eigen, random), or (svd) "{module}/u"
[K, d_out] and "{module}/v" [K, d_in], the K kept factor pairs of the block's sequences in order,
and "{module}/count" [n] int32, how many of them each sequence has (format 2; format 1 stored
u [n, d_out, R] and v [n, d_in, R], read as R pairs each: index_scan.module_part). Each stored in
the storage dtype, int8 ones with "{key}.scale"; and "index" [n] (global sequence indices).

Placement (device.py): a ModuleIndexer prepares its whitening, rows and columns, projections and
test matrices on the host (from the factors as loaded, and CPU generators: the same on every
device) and places them on the model's device once; `compress` and `queries` then read only
tensors there. Scoring takes index-space queries and a block on one device (the index_score
stage: both as read from the store, on the host).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..errors import InputError
from ..options import BUDGET, DIM, PROJECTION, RANK, SEED, STORAGE_DTYPE
from .budget import within_memory
from .capture import ModuleCapture
from .device import exact_arithmetic, to_device
from .factors import ModuleFactors
from .modules import TrackedModule
from .passes import captured_batches
from .precondition import Preconditioner, divided
from .quantize import row_bytes, stored
from .rotation import rotated_per_sequence_gradients
from .score import PreparedQueries, Scorer

PROJECTIONS = ("none", "svd", "eigen", "random")
STORAGE_DTYPES = ("int8", "bfloat16", "float16", "float32")
_OVERSAMPLE = 8  # extra columns of the randomized SVD's test matrix


@dataclass(frozen=True)
class IndexSpec:
    """How an index compresses each sequence's gradient (see the module docstring)."""

    projection: str = PROJECTION.default
    rank: int = RANK.default  # svd: at most R factor pairs per sequence and module
    dim: int = DIM.default  # eigen, random: K (or k) per side
    seed: int = SEED.default  # random projections and the randomized SVD's test matrices
    storage_dtype: str = STORAGE_DTYPE.default
    query_rank: int | None = 16  # svd: the query side's rank in index space (None: full)
    # svd: the share of each sequence's whitened energy kept; 1: every pair, R per module. A spec
    # without it (written before issue 24: an index, a queued job) meant 1, so 1 is the field's
    # default; a new build asks for ENERGY.default (0.95) through the CLI or the request.
    energy: float = 1.0
    budget: int = BUDGET.default  # svd: at most this many bytes per sequence (0: no limit)

    def validate(self) -> None:
        if self.projection not in PROJECTIONS:
            raise InputError(f"unknown projection '{self.projection}' (choose from {', '.join(PROJECTIONS)})")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise InputError(f"--storage-dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        if self.rank < 1 or self.dim < 1:
            raise InputError(f"--rank and --dim must be >= 1, got {self.rank} and {self.dim}")
        if self.query_rank is not None and self.query_rank < 1:
            raise InputError(f"the index query rank must be >= 1, got {self.query_rank}")
        if not 0 < self.energy <= 1:
            raise InputError(f"--energy must be in (0, 1], got {self.energy}")
        if self.budget < 0:
            raise InputError(f"--budget must be >= 0 bytes, got {self.budget}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def selects(self) -> bool:
        """Whether svd ranks are chosen per sequence (an energy share below 1, or a budget)."""
        return self.projection == "svd" and (self.energy < 1 or self.budget > 0)

    def bytes_per_sequence(self, modules: dict) -> int:
        """Stored bytes of one sequence's compressed gradient over `modules` (TrackedModule): svd
        ranks chosen per sequence store at most this (the budget, or every module at rank R)."""
        total = 0
        for module in modules.values():
            d_out, d_in = module.d_out, module.d_in_full
            if self.projection == "none":
                total += d_out * row_bytes(d_in, self.storage_dtype)
            elif self.projection == "svd":
                pair = row_bytes(d_out, self.storage_dtype) + row_bytes(d_in, self.storage_dtype)
                total += min(self.rank, d_out, d_in) * pair + 4  # and the sequence's count
            else:
                total += min(self.dim, d_out) * row_bytes(min(self.dim, d_in), self.storage_dtype)
        return min(total, self.budget) if self.projection == "svd" and self.budget else total


def _generator(seed: int, name: str, salt: int) -> torch.Generator:
    digest = sum((index + 1) * ord(character) for index, character in enumerate(name))
    return torch.Generator().manual_seed((seed * 1_000_003 + digest * 7919 + salt) % (2**63 - 1))


@dataclass
class SvdFactors:
    """A batch's truncated whitened gradients in one module, before rank selection and storage:
    u [B, d_out, R] (orthonormal columns), v [B, d_in, R] (σ folded in; columns by descending σ),
    energy [B] = ‖W‖² of each sequence's whitened gradient (all of it, not only the R pairs)."""

    u: torch.Tensor
    v: torch.Tensor
    energy: torch.Tensor

    @property
    def squared_singular_values(self) -> torch.Tensor:
        """σ_r² [B, R]."""
        return self.v.square().sum(1)


class ModuleIndexer:
    """One module's compression and its query side, from the factors and the build's damping.

    Tensors: s [B, N, d_out], a [B, N, d_in] (a capture); rotated query gradients [Q, d_out, d_in];
    all on `curvature`'s device (the model's), where everything this holds is placed once, when built."""

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
            if spec.query_rank:
                query_rank = min(spec.query_rank, d_out, d_in)
                host["query_test_matrix"] = torch.randn(
                    d_in, query_rank + _OVERSAMPLE, generator=_generator(spec.seed, name, 4)
                )
        placed = to_device(host, device)
        self.rows, self.columns = placed.get("rows"), placed.get("columns")
        self.project_s, self.project_a = placed.get("project_s"), placed.get("project_a")
        self.test_matrix, self.query_test_matrix = placed.get("test_matrix"), placed.get("query_test_matrix")
        # √(Λ + λ) [d_out, d_in] float64, on the device (None: no curvature)
        self.scale = None if curvature.denominator is None else curvature.denominator.sqrt()

    @staticmethod
    def _top(weights: torch.Tensor | None, size: int, k: int) -> torch.Tensor:
        k = min(k, size)
        if weights is None:
            return torch.arange(k)
        return torch.topk(weights, k).indices.sort().values

    def _whitened(self, rotated: torch.Tensor) -> torch.Tensor:
        return rotated if self.scale is None else rotated / self.scale.to(rotated.dtype)

    # -- the training side ----------------------------------------------------------------------

    def compress(self, capture: ModuleCapture) -> dict[str, torch.Tensor] | SvdFactors:
        """A batch's compressed gradients in the capture's dtype: {"w": [B, a, b]} (none, eigen,
        random), or (svd) its truncated whitened gradients before rank selection and storage."""
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
        u, v = randomized_svd(whitened, self.spec.rank, self.test_matrix)
        return SvdFactors(u, v, whitened.square().sum((1, 2)))

    # -- the query side -------------------------------------------------------------------------

    def queries(self, rotated: torch.Tensor) -> dict[str, torch.Tensor]:
        """The index-space form of queries from their rotated gradients G̃ = Q_Sᵀ ∇ Q_A
        [Q, d_out, d_in] (the gradients themselves without a basis; Scorer.rotated_query_gradients)."""
        projection = self.spec.projection
        rotated = rotated.to(torch.float32)
        if projection == "random":
            preconditioned = divided(rotated, self.curvature, torch.float32)  # P̃
            left, right = self.project_s, self.project_a
            if self.has_basis:  # R_S P R_Aᵀ = (R_S Q_S) P̃ (R_A Q_A)ᵀ
                left, right = (
                    left @ self.curvature.gradient_basis.float(),
                    right @ self.curvature.activation_basis.float(),
                )
            return {"w": left @ preconditioned @ right.T}
        whitened = self._whitened(rotated)
        if projection == "eigen":
            return {"w": whitened[:, self.rows][:, :, self.columns]}
        if projection == "svd" and self.spec.query_rank:
            u, v = randomized_svd(whitened, self.spec.query_rank, self.query_test_matrix)
            return {"u": u, "v": v}
        return {"w": whitened}


def randomized_svd(matrices: torch.Tensor, rank: int, test_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-R truncated SVD of a stack [B, m, n] as U [B, m, R] (orthonormal columns) and
    V [B, n, R] (σ folded in), columns by descending σ: a shared Gaussian test matrix [n', R+p]
    (n' ≥ n), one power iteration, then the small projection P = Basisᵀ M [B, R+p, n] truncated
    through the eigenvectors E of P Pᵀ [R+p, R+p] (its left singular vectors): U = Basis E_R,
    V = Pᵀ E_R, so U Vᵀ = Basis E_R E_Rᵀ P. The symmetric eigensolver on (R+p)² matrices costs a
    fraction of an SVD of P on CPU, and nothing is divided by a singular value (a zero gradient
    gives zero factors). Error: within the randomized range finder's bound (Halko et al. 2011,
    10.6) of the optimal rank-R truncation; exact when R + p ≥ min(m, n)."""
    rank = min(rank, *matrices.shape[1:])
    omega = test_matrix[: matrices.shape[2]].to(matrices.dtype)  # [n, R+p]
    sketch = matrices @ omega  # [B, m, R+p]
    sketch = matrices @ (matrices.transpose(1, 2) @ sketch)  # one power iteration
    basis, _ = torch.linalg.qr(sketch)  # [B, m, R+p]
    small = basis.transpose(1, 2) @ matrices  # [B, R+p, n]
    _, vectors = torch.linalg.eigh(small @ small.transpose(1, 2))  # ascending eigenvalues
    top = vectors[..., -rank:].flip(-1)  # [B, R+p, R], descending
    return basis @ top, small.transpose(1, 2) @ top


def select_ranks(parts: dict[str, SvdFactors], spec: IndexSpec) -> dict[str, torch.Tensor]:
    """How many factor pairs each sequence keeps in each module: {name: [B] int64}.

    Per sequence, the pairs of all modules in the order of σ² per stored byte (within a module,
    descending σ), kept while the energy before them is under `spec.energy` of the sequence's
    whitened energy Σ_modules ‖W‖² and their bytes fit `spec.budget` (the greedy choice for the
    whitened gradient's Frobenius error per byte). Without selection: every pair, R per module
    (at most `spec.rank` of the pairs given)."""
    if not spec.selects:
        return {
            name: torch.full((part.u.shape[0],), min(spec.rank, part.u.shape[2]), dtype=torch.long)
            for name, part in parts.items()
        }
    names = list(parts)
    values, costs, owners = [], [], []
    for position, name in enumerate(names):
        part = parts[name]
        pair = row_bytes(part.u.shape[1], spec.storage_dtype) + row_bytes(part.v.shape[1], spec.storage_dtype)
        squared = part.squared_singular_values.double()[:, : spec.rank]  # [B, R]
        values.append(squared)
        costs.append(torch.full_like(squared, pair))
        owners.append(torch.full(squared.shape[1:], position, dtype=torch.long, device=squared.device))
    squared, cost = torch.cat(values, 1), torch.cat(costs, 1)  # [B, ΣR]
    owner = torch.cat(owners)  # [ΣR]
    order = torch.argsort(squared / cost, dim=1, descending=True, stable=True)
    energy_before = squared.gather(1, order).cumsum(1) - squared.gather(1, order)
    total = sum(part.energy.double() for part in parts.values()).unsqueeze(1)  # [B, 1]
    keep = energy_before < spec.energy * total
    if spec.budget:
        fixed = 4 * len(names)  # each module's count
        keep &= cost.gather(1, order).cumsum(1) + fixed <= spec.budget
    kept_owner = torch.where(keep, owner[order], len(names))  # [B, ΣR]: a module, or none
    counts = torch.zeros(squared.shape[0], len(names) + 1, dtype=torch.long, device=squared.device)
    counts.scatter_add_(1, kept_owner, torch.ones_like(kept_owner))
    return {name: counts[:, position] for position, name in enumerate(names)}


def packed(name: str, part: dict[str, torch.Tensor] | SvdFactors, count: torch.Tensor | None, storage_dtype: str):
    """One module's block tensors for a batch (on the host, in the storage dtype): "{name}/w", or
    the kept pairs' "{name}/u" [K, d_out], "{name}/v" [K, d_in] and "{name}/count" [B]."""
    if not isinstance(part, SvdFactors):
        return {f"{name}/{key}": tensor for key, tensor in stored("w", part["w"], storage_dtype).items()}
    rank = part.u.shape[2]
    kept = torch.arange(rank, device=count.device).unsqueeze(0) < count.unsqueeze(1)  # [B, R]
    tensors = {f"{name}/count": count.to("cpu", torch.int32)}
    for key, factors in (("u", part.u), ("v", part.v)):
        rows = factors.transpose(1, 2)[kept]  # [K, d]
        tensors.update({f"{name}/{k}": t for k, t in stored(key, rows, storage_dtype).items()})
    return tensors


def pack_batch(parts: dict[str, dict[str, torch.Tensor] | SvdFactors], spec: IndexSpec) -> dict[str, torch.Tensor]:
    """A batch's compressed gradients of every module as block tensors (rank selection, storage)."""
    svd = {name: part for name, part in parts.items() if isinstance(part, SvdFactors)}
    counts = select_ranks(svd, spec) if svd else {}
    tensors = {}
    for name, part in parts.items():
        tensors.update(packed(name, part, counts.get(name), spec.storage_dtype))
    return tensors


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

    def damping_values(self) -> dict[str, float]:
        return {name: module.damping_value for name, module in self.modules.items()}

    def block_sequences(self, target_bytes: int = 64 << 20) -> int:
        """Sequences per stored block: about `target_bytes` of compressed gradients, at least one
        batch (a scoring worker holds a block or two at a time)."""
        per_sequence = self.spec.bytes_per_sequence(self.scorer.factors.modules)
        batch = self.scorer.config.batch_size
        return max(batch, target_bytes // max(per_sequence, 1) // batch * batch)

    def compressed_batches(self, sequences, progress=None, batch_size: int | None = None):
        """(batch indices [B], {name: ModuleIndexer.compress of the batch}) in the pass's batch order
        (batches of `batch_size`, default the Scorer's)."""
        with exact_arithmetic():
            for batch, captures in captured_batches(
                self.scorer.model,
                self.scorer.modules,
                sequences,
                batch_size=batch_size or self.scorer.batch_size,
                pad_token_id=self.scorer.pad_token_id,
                stage="index",
                progress=progress,
            ):
                yield (
                    batch.indices.clone(),
                    {name: module.compress(captures[name]) for name, module in self.modules.items()},
                )

    def blocks(self, sequences, progress=None, block_sequences: int | None = None, batch_size: int | None = None):
        """Compressed gradients of `sequences` as blocks (dicts of host tensors in the storage dtype
        with "index" [n]), each of at most `block_sequences` sequences, in the pass's batch order."""
        limit = block_sequences or self.block_sequences()
        pending: list[dict[str, torch.Tensor]] = []
        count = 0
        for indices, parts in self.compressed_batches(sequences, progress, batch_size):
            pending.append({**pack_batch(parts, self.spec), "index": indices})
            count += len(indices)
            if count >= limit:
                yield joined(pending)
                pending, count = [], 0
        if count:
            yield joined(pending)

    def write_blocks(self, sequences, write: Callable[[int, dict[str, torch.Tensor]], None], progress=None) -> int:
        """`write(number, block)` for each of `blocks(sequences)`, under the budget's out-of-memory
        rule (budget.within_memory: the pass once more at a lower batch size, its blocks written
        again under the same numbers); the batch size the pass ran at."""

        def run(batch_size: int) -> None:
            for number, block in enumerate(self.blocks(sequences, progress, batch_size=batch_size)):
                write(number, block)

        _, used = within_memory(run, self.scorer.batch_size, "index", self.scorer.device)
        return used

    @exact_arithmetic()
    def query_side(
        self, queries, mean_tokens: float, progress=None
    ) -> tuple[dict[str, dict[str, torch.Tensor]], PreparedQueries]:
        """Both query sides of a batch, modules streamed: each module's rotated query gradients are
        formed once (from the queries' per-token factors), turned into its index-space queries and
        its exact prepared queries (Scorer.prepare_module: full rank in the eigenbasis, settled by
        two_stage once the candidates are known), and dropped. Returns ({name: index-space
        queries}, prepared)."""
        factors = self.scorer.query_factors(queries, progress)
        index_queries, prepared = {}, {}
        for name, module in self.modules.items():
            rotated = self.scorer.rotated_query_gradients(name, factors.pop(name))
            index_queries[name] = module.queries(rotated)
            prepared[name] = self.scorer.prepare_module(name, rotated, mean_tokens)
        return index_queries, PreparedQueries(prepared)

    @exact_arithmetic()
    def queries(self, queries, progress=None) -> dict[str, dict[str, torch.Tensor]]:
        """The index-space queries alone ({name: {key: tensor}}), modules streamed."""
        factors = self.scorer.query_factors(queries, progress)
        return {
            name: module.queries(self.scorer.rotated_query_gradients(name, factors.pop(name)))
            for name, module in self.modules.items()
        }


def block_bytes(block: dict[str, torch.Tensor]) -> int:
    """Stored bytes of a block's compressed gradients (its tensors but the global indices)."""
    return sum(value.numel() * value.element_size() for key, value in block.items() if key != "index")


def joined(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batches' block tensors as one block: every key concatenated along its first dimension."""
    return {key: torch.cat([part[key] for part in parts]).contiguous() for key in parts[0]}
