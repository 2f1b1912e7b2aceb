"""Label spreading on a sparse kNN graph (Zhou et al. 2004, as used by Iscen et al. CVPR 2019),
and Poisson learning on the same graph (Calder et al. ICML 2020) for very few labels.

A scikit-learn compatible estimator whose memory is O(n * k) rather than scikit-learn's dense
n-by-n kernel: the graph comes from faiss nearest-neighbour search (see `trainer.knn_graph`),
and the spreading solves (I - alpha S) F = Y by conjugate gradient on the sparse matrix S.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from tqdm.auto import tqdm

from trainer.knn_graph import (
    EXACT_SEARCH_MAX_SAMPLES,
    METRICS,
    NeighbourIndex,
    edge_affinity,
    edge_weights,
    knn_affinity,
    normalized_affinity,
    prepare_features,
)

__all__ = ["LabelSpreading", "edge_affinity"]

UNLABELED = -1


class LabelSpreading(ClassifierMixin, BaseEstimator):
    """Semi-supervised label spreading over a sparse kNN graph built with faiss.

    `fit(X, y)` takes features (or, with `metric='precomputed'`, an (n, n) affinity matrix)
    and labels with -1 for unlabeled samples. The graph links each sample to its
    `n_neighbors` nearest neighbours with weight max(cos, 0)**gamma (cosine) or
    exp(-gamma d^2 / d_k^2) (euclidean, d_k the distance to the k-th neighbour), is
    symmetrised (W + W^T) and normalised (S = D^-1/2 W D^-1/2). Spreading solves
    (I - alpha S) F = Y, the fixed point of scikit-learn's iteration
    F <- alpha S F + (1 - alpha) Y, by conjugate gradient; rows of F are then normalised
    (a sample no seed reaches gets the uniform distribution).

    With `method='poisson'` the seeds become sources and sinks: each seed column is centred
    on the labeled samples (they sum to zero) and the Poisson equation L U = B is solved on the
    graph Laplacian L = D - W, as (I - S) V = D^-1/2 B, U = D^-1/2 V, by the same conjugate
    gradient (`alpha` is not used). At one or a few labels per class, where spreading's
    solution flattens towards a constant away from the seeds, Poisson learning keeps the
    classes apart.

    Parameters
    ----------
    n_neighbors : neighbours per sample in the graph and for inductive `predict`.
    alpha : soft clamping in (0, 1); closer to 1 spreads further from the seeds.
    method : 'spreading' (Zhou et al.) or 'poisson' (Calder et al.).
    metric : 'cosine', 'euclidean', or 'precomputed' (X is a symmetric affinity matrix,
        e.g. from `edge_affinity`; predict then takes (n_queries, n_train) affinities).
    gamma : edge-weight sharpness; 0 gives plain connectivity.
    class_balance : divide each class's seed column by its number of seeds.
    classes : the classes in column order of `label_distributions_`; by default the sorted
        labels seen in y. Labels outside it are an error; a class without seeds gets zeros.
    search : 'auto' (exact up to `EXACT_SEARCH_MAX_SAMPLES` samples, IVF above), 'exact', 'ivf'.
    n_probe : IVF cells each training sample is listed in; a query searches the samples
        listed in its nearest cell (more is slower and more exact).
    tol : relative residual at which conjugate gradient stops; below 1e-5 it runs in float64.
    max_iter : most conjugate-gradient iterations (Poisson on a sharp graph, sim**30 over
        pixels, needed about 1,000 on digits: 200 stopped it at half its accuracy gain).
    verbose : show progress bars for graph building and iterations.
    random_state : seed of the IVF k-means.

    Attributes
    ----------
    classes_, scores_ (the solver's raw (n, n_classes) solution: spreading's F, Poisson's
    potentials U), label_distributions_ (n, n_classes, rows sum to 1), transduction_,
    confidence_ (1 - H(p) / log(n_classes), the per-sample weight of Iscen et al.),
    label_mass_ (the row sums of F before normalising: how much seed mass reaches each
    sample; a far-off cluster gets little, however peaked its normalised row),
    n_iter_, n_features_in_, and for features index_ (`NeighbourIndex`): a float32 copy of
    the training features (n * d * 4 bytes) that inductive `predict` searches.
    """

    def __init__(
        self,
        n_neighbors: int = 10,
        alpha: float = 0.99,
        *,
        method: str = "spreading",
        metric: str = "cosine",
        gamma: float = 3.0,
        class_balance: bool = True,
        classes: Any = None,
        search: str = "auto",
        n_probe: int = 2,
        tol: float = 1e-3,
        max_iter: int = 2000,
        verbose: bool = False,
        random_state: int = 0,
    ) -> None:
        self.n_neighbors = n_neighbors
        self.alpha = alpha
        self.method = method
        self.metric = metric
        self.gamma = gamma
        self.class_balance = class_balance
        self.classes = classes
        self.search = search
        self.n_probe = n_probe
        self.tol = tol
        self.max_iter = max_iter
        self.verbose = verbose
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> LabelSpreading:
        """Spread the labels of y (-1 = unlabeled) over the graph of X."""
        self._check_params()
        precomputed = self.metric == "precomputed"
        X, y = validate_data(
            self,
            X,
            y,
            accept_sparse="csr" if precomputed else False,
            dtype=np.float64 if precomputed else np.float32,
        )
        check_classification_targets(y)
        seeds = self._seed_matrix(np.asarray(y))
        n_samples = X.shape[0]
        order = np.arange(n_samples)
        if precomputed:
            affinity = _check_affinity(X)
        else:
            if self.n_neighbors >= n_samples:
                raise ValueError(
                    f"n_neighbors={self.n_neighbors} must be below the number of samples "
                    f"({n_samples}); lower n_neighbors"
                )
            approximate = self.search == "ivf" or (
                self.search == "auto" and n_samples > EXACT_SEARCH_MAX_SAMPLES
            )
            features = prepare_features(X, self.metric)
            self.index_ = NeighbourIndex.build(
                features,
                self.metric,
                approximate,
                self.n_probe,
                self.random_state,
                progress=self.verbose,
            )
            scores, indices = self.index_.search(
                features, self.n_neighbors, exclude_self=True, progress=self.verbose
            )
            # Number the graph's nodes cell by cell: neighbours then sit close in memory.
            order = self.index_.locality_order()
            rank = np.empty_like(order)
            rank[order] = np.arange(n_samples)
            indices = np.where(indices >= 0, rank[indices], -1)[order]
            affinity = knn_affinity(scores[order], indices, self.metric, self.gamma)
            del scores, indices
        spread_in_order, self.n_iter_ = self._propagate(affinity, seeds[order])
        spread = np.empty_like(spread_in_order)
        spread[order] = spread_in_order
        self.scores_ = spread
        self.label_mass_ = np.maximum(spread, 0).sum(axis=1)
        self.label_distributions_ = _normalize_rows(spread)
        self.transduction_ = self.classes_[np.argmax(self.label_distributions_, axis=1)]
        self.confidence_ = confidence(self.label_distributions_)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities of new samples from their neighbours among the training samples.

        With `metric='precomputed'`, X holds affinities (n_queries, n_train) to the training
        samples. Otherwise each query's `n_neighbors` nearest training samples vote with their
        label distributions, weighted like the graph's edges.
        """
        check_is_fitted(self)
        if self.metric == "precomputed":
            X = validate_data(self, X, accept_sparse="csr", dtype=np.float64, reset=False)
            return _normalize_rows(np.asarray(sp.csr_matrix(X) @ self.label_distributions_))
        X = validate_data(self, X, dtype=np.float32, reset=False)
        scores, indices = self.index_.search(
            prepare_features(X, self.metric), self.n_neighbors, progress=self.verbose
        )
        weights = edge_weights(scores, self.metric, self.gamma)
        unweighted = weights.sum(axis=1) <= 0
        weights[unweighted] = indices[unweighted] >= 0
        votes = np.zeros((len(X), len(self.classes_)))
        for weight, neighbour in zip(weights.T, indices.T, strict=True):
            votes += weight[:, None] * self.label_distributions_[neighbour]
        return _normalize_rows(votes)

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class of each new sample."""
        probabilities = self.predict_proba(X)
        return self.classes_[np.argmax(probabilities, axis=1)]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.pairwise = self.metric == "precomputed"
        tags.input_tags.sparse = self.metric == "precomputed"
        return tags

    def _propagate(self, affinity: sp.csr_matrix, seeds: np.ndarray) -> tuple[np.ndarray, int]:
        """The (n, n_classes) scores the seeds give every sample, and the solver's iterations."""
        if self.method == "spreading":
            return _solve(
                normalized_affinity(affinity),
                seeds,
                self.alpha,
                self.tol,
                self.max_iter,
                self.verbose,
            )
        degree = np.asarray(affinity.sum(axis=1)).ravel()
        # A sample without edges (IVF search can leave one) gets no score, not a division by 0.
        scale = 1 / np.sqrt(np.maximum(degree, 1e-12))
        sources = _poisson_sources(affinity, seeds, degree)
        solution, iterations = _solve(
            normalized_affinity(affinity),
            sources * scale[:, None],
            1.0,
            self.tol,
            self.max_iter,
            self.verbose,
        )
        return solution * scale[:, None], iterations

    def _check_params(self) -> None:
        """Raise ValueError naming the first invalid parameter."""
        checks = {
            "n_neighbors": isinstance(self.n_neighbors, Integral) and self.n_neighbors >= 1,
            "alpha": isinstance(self.alpha, Real) and 0 < self.alpha < 1,
            "method": self.method in ("spreading", "poisson"),
            "metric": self.metric in (*METRICS, "precomputed"),
            "gamma": isinstance(self.gamma, Real) and 0 <= self.gamma < np.inf,
            "search": self.search in ("auto", "exact", "ivf"),
            "n_probe": isinstance(self.n_probe, Integral) and self.n_probe >= 1,
            "tol": isinstance(self.tol, Real) and self.tol > 0,
            "max_iter": isinstance(self.max_iter, Integral) and self.max_iter >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}; see LabelSpreading")

    def _seed_matrix(self, y: np.ndarray) -> np.ndarray:
        """Set `classes_` and return the (n, n_classes) seed matrix Y, class-balanced."""
        if y.dtype.kind in "US":  # text labels: none can be the unlabeled marker -1
            unlabeled = np.zeros(len(y), dtype=bool)
        else:
            unlabeled = np.asarray(y == UNLABELED, dtype=bool)
        labels = y[~unlabeled]
        if len(labels) == 0:
            raise ValueError("y has no labeled sample: give at least one label other than -1")
        seen = np.unique(labels)
        if len(seen) < 2:
            raise ValueError(
                f"y has labels of only 1 class ({seen[0]!r}); label spreading needs at least 2"
            )
        classes = seen if self.classes is None else np.asarray(self.classes)
        if classes.ndim != 1 or len(np.unique(classes)) != len(classes):
            raise ValueError("classes must be a 1-D sequence of distinct labels")
        if not np.all(np.isin(seen, classes)):
            outside = seen[~np.isin(seen, classes)]
            raise ValueError(
                f"labels {outside.tolist()} are not in classes {classes.tolist()}; "
                "use -1 for unlabeled samples"
            )
        self.classes_ = classes
        order = np.argsort(classes)
        columns = order[np.searchsorted(classes, labels, sorter=order)]
        seeds = np.zeros((len(y), len(classes)))
        seeds[np.flatnonzero(~unlabeled), columns] = 1.0
        if self.class_balance:
            seeds /= np.maximum(seeds.sum(axis=0), 1.0)
        return seeds


def _poisson_sources(affinity: sp.csr_matrix, seeds: np.ndarray, degree: np.ndarray) -> np.ndarray:
    """Calder et al.'s sources: each seed minus the mean seed, then a sink spread over each
    connected component by degree, so every column sums to zero on every component and the
    singular system L U = B has a solution there (CG diverges on a graph in pieces otherwise).
    """
    labeled = np.flatnonzero(seeds.any(axis=1))
    sources = np.zeros_like(seeds)
    sources[labeled] = seeds[labeled] - seeds[labeled].mean(axis=0)
    _, component = connected_components(affinity, directed=False)
    totals = np.zeros((component.max() + 1, seeds.shape[1]))
    np.add.at(totals, component, sources)
    volume = np.maximum(np.bincount(component, weights=degree), 1e-12)
    return sources - degree[:, None] * (totals / volume[:, None])[component]


def _check_affinity(affinity: sp.csr_matrix | np.ndarray) -> sp.csr_matrix:
    """A square, symmetric, finite, non-negative affinity matrix as CSR."""
    affinity = sp.csr_matrix(affinity)
    if affinity.shape[0] != affinity.shape[1]:
        raise ValueError(
            f"metric='precomputed' needs a square (n, n) affinity matrix, got {affinity.shape}"
        )
    if np.any(affinity.data < 0):
        raise ValueError("precomputed affinities must be non-negative")
    if abs(affinity - affinity.T).max() > 1e-8 * max(abs(affinity).max(), 1.0):
        raise ValueError("precomputed affinity must be symmetric: pass A + A.T or edge_affinity")
    return affinity


def _solve(
    s: sp.csr_matrix, seeds: np.ndarray, alpha: float, tol: float, max_iter: int, verbose: bool
) -> tuple[np.ndarray, int]:
    """Solve (I - alpha S) F = Y for all seeded columns at once by conjugate gradient.

    I - alpha S is symmetric positive definite for a normalised symmetric S and alpha < 1;
    at alpha = 1 it is semi-definite, and CG converges for seeds orthogonal to its null space
    D^1/2 1 (Poisson learning's centred sources).
    Each column keeps its own step sizes; stops when every relative residual is below tol.
    Runs in float32 (half the memory traffic) unless tol < 1e-5 asks for float64.
    """
    dtype = np.float64 if tol < 1e-5 else np.float32
    s = s.astype(dtype)
    columns = np.flatnonzero(seeds.any(axis=0))
    b: np.ndarray = seeds[:, columns].astype(dtype)

    def apply(v: np.ndarray) -> np.ndarray:
        out = s @ v
        out *= -alpha
        out += v
        return out

    def column_dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->j", u, v)

    x: np.ndarray = b.copy()
    residual = b - apply(x)
    direction = residual.copy()
    scratch = np.empty_like(x)
    residual_sq = column_dot(residual, residual)
    b_norm = np.sqrt(column_dot(b, b))
    iterations = 0
    with tqdm(total=max_iter, desc="label spreading", unit="it", disable=not verbose) as bar:
        while (relative := np.max(np.sqrt(residual_sq) / b_norm)) > tol:
            if iterations == max_iter:
                warnings.warn(
                    f"label spreading stopped at max_iter={max_iter} with relative residual "
                    f"{relative:.1e} > tol={tol}; raise max_iter or tol",
                    ConvergenceWarning,
                    stacklevel=3,
                )
                break
            product = apply(direction)
            curvature = column_dot(direction, product)
            step = np.divide(
                residual_sq, curvature, out=np.zeros_like(curvature), where=curvature > 0
            )
            np.multiply(direction, step, out=scratch)
            x += scratch
            np.multiply(product, step, out=scratch)
            residual -= scratch
            new_residual_sq = column_dot(residual, residual)
            ratio = np.divide(
                new_residual_sq, residual_sq, out=np.zeros_like(residual_sq), where=residual_sq > 0
            )
            direction *= ratio
            direction += residual
            residual_sq = new_residual_sq
            iterations += 1
            bar.update()
            bar.set_postfix(residual=f"{relative:.1e}")
    spread = np.zeros(seeds.shape)
    spread[:, columns] = x
    return spread, iterations


def _normalize_rows(scores: np.ndarray) -> np.ndarray:
    """Rows clipped at 0 and scaled to sum 1; rows with no mass become uniform."""
    scores = np.maximum(scores, 0)
    totals = scores.sum(axis=1, keepdims=True)
    uniform = np.full_like(scores, 1.0 / scores.shape[1])
    return np.divide(scores, totals, out=uniform, where=totals > 0)


def confidence(distributions: np.ndarray) -> np.ndarray:
    """1 - H(p) / log(C): 1 for a one-hot row, 0 for a uniform one."""
    p = distributions
    entropy = -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=1)
    return np.clip(1 - entropy / np.log(p.shape[1]), 0.0, 1.0)
