"""k-nearest-neighbour graphs with faiss and the sparse affinities label spreading runs on.

Search is exact (brute force, BLAS) up to `EXACT_SEARCH_MAX_SAMPLES` base points and IVF
above it: k-means cells over the base points (about sqrt(n) of them), each base point listed
in its `n_probe` nearest cells, and each query compared with the points listed in its own
nearest cell. The work is then one dense matrix product per cell instead of one over all
pairs; cells are searched in parallel on faiss's thread count. With a GPU (faiss-gpu) the
products run there. Memory is O(n * d) for the features plus O(n * k) for the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import faiss
import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

EXACT_SEARCH_MAX_SAMPLES = 20_000
"""Above this many base points, `search='auto'` switches from exact to IVF search."""

METRICS = ("cosine", "euclidean")
_QUERY_BATCH = 2048
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def _brute_force_knn(
    queries: np.ndarray, base: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN: cosine similarities (rows of unit length) or squared L2 distances."""
    kind = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if faiss.get_num_gpus() > 0:  # pragma: no cover - needs faiss-gpu and a GPU
        return faiss.knn_gpu(faiss.StandardGpuResources(), queries, base, k, metric=kind)
    return faiss.knn(queries, base, k, metric=kind)


def prepare_features(x: np.ndarray, metric: str) -> np.ndarray:
    """Float32, C-contiguous copy of `x`; rows scaled to unit length for cosine."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x /= np.maximum(norms, np.finfo(np.float32).tiny)
    return x


@dataclass
class NeighbourIndex:
    """Searchable training points: exact when `centroids` is None, IVF cells otherwise."""

    base: np.ndarray
    metric: str
    centroids: np.ndarray | None = None
    cells: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        base: np.ndarray,
        metric: str,
        approximate: bool,
        n_probe: int = 2,
        seed: int = 0,
        progress: bool = False,
    ) -> NeighbourIndex:
        """Index prepared features; `approximate` trains k-means with about sqrt(n) cells and
        lists each base point in its `n_probe` nearest cells."""
        if not approximate:
            return cls(base, metric)
        n_cells = max(1, int(np.sqrt(len(base))))
        kmeans = faiss.Kmeans(
            base.shape[1],
            n_cells,
            niter=10,
            seed=seed,
            spherical=metric == "cosine",
            max_points_per_centroid=64,
            min_points_per_centroid=1,
        )
        kmeans.train(base)
        centroids = np.asarray(kmeans.centroids, dtype=np.float32)
        cells = _nearest_cells(base, centroids, min(n_probe, n_cells), metric, progress)
        return cls(base, metric, centroids, cells)

    def search(
        self, queries: np.ndarray, k: int, exclude_self: bool = False, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest base points of each query: (scores, indices), NaN and -1 where none.

        With `exclude_self`, `queries` are the base points and each one's own index is
        dropped from its list.
        """
        k_search = k + 1 if exclude_self else k
        scores = np.full((len(queries), k_search), np.nan, dtype=np.float32)
        indices = np.full((len(queries), k_search), -1, dtype=np.int64)

        def search_block(
            block: tuple[np.ndarray, np.ndarray | None],
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            rows, candidates = block
            base = self.base if candidates is None else self.base[candidates]
            found = _brute_force_knn(queries[rows], base, min(k_search, len(base)), self.metric)
            if candidates is None:
                return rows, *found
            return rows, found[0], np.where(found[1] >= 0, candidates[found[1]], -1)

        blocks = self._blocks(queries, exclude_self)
        for rows, block_scores, block_indices in _thread_map(search_block, blocks, progress):
            scores[rows, : block_scores.shape[1]] = block_scores
            indices[rows, : block_indices.shape[1]] = block_indices
        if exclude_self:
            scores, indices = _drop_self(scores, indices)
        return scores, indices

    def locality_order(self) -> np.ndarray:
        """A permutation of the base points that puts each IVF cell's points together."""
        if self.cells is None:
            return np.arange(len(self.base))
        return np.argsort(self.cells[:, 0], kind="stable")

    def _blocks(
        self, queries: np.ndarray, exclude_self: bool
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(query rows, candidate base rows or None for all) to search together.

        IVF: a query's candidates are the base points listed in its nearest cell.
        """
        if self.centroids is None or self.cells is None:
            return [(rows, None) for rows in _batches(len(queries))]
        n_cells = len(self.centroids)
        if exclude_self:
            query_cells = self.cells[:, 0]
        else:
            query_cells = _nearest_cells(queries, self.centroids, 1, self.metric)[:, 0]
        members = _group_by_cell(self.cells.ravel(), n_cells)
        listed = [rows // self.cells.shape[1] for rows in members]
        return [
            (rows, listed[cell])
            for cell, rows in enumerate(_group_by_cell(query_cells, n_cells))
            if len(rows)
        ]


def _batches(n: int) -> list[np.ndarray]:
    """Row ranges of at most `_QUERY_BATCH` rows covering range(n)."""
    return [np.arange(start, min(start + _QUERY_BATCH, n)) for start in range(0, n, _QUERY_BATCH)]


def _thread_map(
    function: Callable[[_Item], _Result],
    items: list[_Item],
    progress: bool = False,
    desc: str = "kNN search",
) -> Iterator[_Result]:
    """Map over items in order on faiss's thread count, each thread running faiss single-threaded.

    Many small single-threaded calls in parallel beat OpenMP inside each call, whose threads
    spin-wait between regions and crawl on a busy machine.
    """
    threads = 1 if faiss.get_num_gpus() > 0 else max(1, faiss.omp_get_max_threads())
    with ThreadPoolExecutor(threads, initializer=faiss.omp_set_num_threads, initargs=(1,)) as pool:
        yield from tqdm(
            pool.map(function, items),
            total=len(items),
            desc=desc,
            unit="block",
            disable=not progress,
        )


def _nearest_cells(
    x: np.ndarray, centroids: np.ndarray, n: int, metric: str, progress: bool = False
) -> np.ndarray:
    """Indices (rows, n) of each row's n nearest centroids."""

    def nearest(rows: np.ndarray) -> np.ndarray:
        return _brute_force_knn(x[rows], centroids, n, metric)[1]

    found = _thread_map(nearest, _batches(len(x)), progress, desc="IVF cells")
    return np.concatenate([*found, np.empty((0, n), np.int64)])


def _group_by_cell(cells: np.ndarray, n_cells: int) -> list[np.ndarray]:
    """Row indices of each cell, in cell order."""
    order = np.argsort(cells, kind="stable")
    return np.split(order, np.cumsum(np.bincount(cells, minlength=n_cells))[:-1])


def _drop_self(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index (or, when it was not found, the last neighbour)."""
    n, width = indices.shape
    is_self = indices == np.arange(n)[:, None]
    first_self = np.where(is_self.any(axis=1), is_self.argmax(axis=1), width - 1)
    keep = np.ones_like(is_self)
    keep[np.arange(n), first_self] = False
    return scores[keep].reshape(n, width - 1), indices[keep].reshape(n, width - 1)


def edge_weights(scores: np.ndarray, metric: str, gamma: float) -> np.ndarray:
    """Affinity of each row's kNN edges (rows of `scores` as `NeighbourIndex.search` gives).

    Cosine: max(cos, 0)**gamma. Euclidean: exp(-gamma d^2 / d_k^2), d_k the row's distance
    to its farthest listed neighbour (a local scale). `gamma=0` gives plain connectivity;
    missing edges (NaN) weigh 0.
    """
    valid = ~np.isnan(scores)
    scores = np.where(valid, scores, 0).astype(np.float64)
    if metric == "cosine":
        weights = np.maximum(scores, 0) ** gamma
    else:
        distances = np.maximum(scores, 0)
        scale = distances.max(axis=1, keepdims=True)
        weights = np.exp(-gamma * distances / np.where(scale > 0, scale, 1.0))
    return np.where(valid, weights, 0.0)


def knn_affinity(
    scores: np.ndarray, indices: np.ndarray, metric: str, gamma: float
) -> sp.csr_matrix:
    """Symmetric sparse affinity W + W^T of a kNN graph given as (scores, indices) rows."""
    n, k = indices.shape
    rows = np.repeat(np.arange(n), k)
    return edge_affinity(rows, indices.ravel(), edge_weights(scores, metric, gamma).ravel(), n)


def edge_affinity(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, n_samples: int
) -> sp.csr_matrix:
    """Symmetric sparse affinity W + W^T from an edge list; self-loops and edges with a -1
    end (missing) are dropped.

    Pass the result to `LabelSpreading(metric='precomputed').fit`.
    """
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    if not (rows.shape == cols.shape == weights.shape) or rows.ndim != 1:
        raise ValueError("edge list: rows, cols and weights must be 1-D arrays of equal length")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("edge list: weights must be finite and non-negative")
    if rows.size and (max(rows.max(), cols.max()) >= n_samples or min(rows.min(), cols.min()) < -1):
        raise ValueError(f"edge list: node indices must lie in [0, {n_samples})")
    keep = (rows != cols) & (rows >= 0) & (cols >= 0) & (weights > 0)
    rows, cols, weights = rows[keep], cols[keep], weights[keep]
    index_type = np.int32 if n_samples < 2**31 else np.int64
    both_ways = (
        np.concatenate([weights, weights]),
        (
            np.concatenate([rows, cols]).astype(index_type),
            np.concatenate([cols, rows]).astype(index_type),
        ),
    )
    return sp.csr_matrix(both_ways, shape=(n_samples, n_samples))


def normalized_affinity(w: sp.spmatrix) -> sp.csr_matrix:
    """D^-1/2 W D^-1/2 for a symmetric non-negative W, its diagonal dropped."""
    w = sp.csr_matrix(w, dtype=np.float64, copy=True)
    if w.diagonal().any():
        w = w.tocoo()
        off_diagonal = w.row != w.col
        w = sp.csr_matrix(
            (w.data[off_diagonal], (w.row[off_diagonal], w.col[off_diagonal])), shape=w.shape
        )
    degree = np.asarray(w.sum(axis=1)).ravel()
    inv_sqrt = 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0))
    w.data *= np.repeat(inv_sqrt, np.diff(w.indptr)) * inv_sqrt[w.indices]
    return w
