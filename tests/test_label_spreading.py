"""Label spreading: scikit-learn's estimator contract, agreement with its math, bad input."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.datasets import load_digits, make_blobs
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.semi_supervised import LabelSpreading as SklearnLabelSpreading
from sklearn.utils.estimator_checks import parametrize_with_checks

from trainer.knn_graph import NeighbourIndex, edge_affinity, knn_affinity, prepare_features
from trainer.label_spreading import LabelSpreading

# Same graph and the solver run to tol=1e-10 (float64): the distributions agree to this.
AGREEMENT_ATOL = 1e-6


def _hide_labels(y: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Copy of y with all but `per_class` labels of each class set to -1."""
    rng = np.random.default_rng(seed)
    kept = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)]
    )
    partial = np.full_like(y, -1)
    partial[kept] = y[kept]
    return partial


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y, _hide_labels(y, per_class=5)


@parametrize_with_checks(
    [LabelSpreading(n_neighbors=5), LabelSpreading(n_neighbors=5, method="poisson")]
)
def test_scikit_learn_estimator_checks(estimator, check) -> None:
    check(estimator)


def test_spreads_digits_better_than_scikit_learn_knn(digits) -> None:
    x, y, partial = digits
    unlabeled = partial == -1
    ours = LabelSpreading(n_neighbors=10).fit(x, partial)
    theirs = SklearnLabelSpreading(kernel="knn", n_neighbors=7).fit(x, partial)
    our_accuracy = np.mean(ours.transduction_[unlabeled] == y[unlabeled])
    assert our_accuracy > 0.9
    assert our_accuracy >= np.mean(theirs.transduction_[unlabeled] == y[unlabeled])
    assert ours.label_distributions_.shape == (len(x), 10)
    np.testing.assert_allclose(ours.label_distributions_.sum(axis=1), 1.0, rtol=1e-6)


def test_agrees_with_scikit_learn_on_the_same_knn_graph(digits) -> None:
    """scikit-learn given our kNN graph as its kernel reaches the same fixed point."""
    x, _, partial = digits

    def our_graph(a: np.ndarray, _: np.ndarray) -> sp.csr_matrix:
        features = prepare_features(a, "cosine")
        index = NeighbourIndex.build(features, "cosine", approximate=False)
        return knn_affinity(*index.search(features, 10, exclude_self=True), "cosine", 3.0)

    theirs = SklearnLabelSpreading(kernel=our_graph, alpha=0.9, max_iter=2000, tol=1e-12)
    theirs.fit(x, partial)
    ours = LabelSpreading(n_neighbors=10, alpha=0.9, class_balance=False, tol=1e-10)
    ours.fit(x, partial)
    np.testing.assert_allclose(
        ours.label_distributions_, theirs.label_distributions_, atol=AGREEMENT_ATOL
    )
    np.testing.assert_array_equal(ours.transduction_, theirs.transduction_)


def test_agrees_with_scikit_learn_rbf_kernel_given_as_precomputed_affinity(digits) -> None:
    x, _, partial = digits
    x, partial = x[:400] / 16, partial[:400]
    theirs = SklearnLabelSpreading(kernel="rbf", gamma=2.0, alpha=0.5, max_iter=2000, tol=1e-12)
    theirs.fit(x, partial)
    ours = LabelSpreading(alpha=0.5, metric="precomputed", class_balance=False, tol=1e-10)
    ours.fit(rbf_kernel(x, gamma=2.0), partial)
    np.testing.assert_allclose(
        ours.label_distributions_, theirs.label_distributions_, atol=AGREEMENT_ATOL
    )
    new = x[:5] + 0.01
    np.testing.assert_allclose(
        ours.predict_proba(rbf_kernel(new, x, gamma=2.0)), theirs.predict_proba(new), atol=1e-6
    )


def test_default_float32_solve_stays_close_to_the_exact_one(digits) -> None:
    x, _, partial = digits
    fast = LabelSpreading().fit(x, partial)
    exact = LabelSpreading(tol=1e-10).fit(x, partial)
    assert np.abs(fast.label_distributions_ - exact.label_distributions_).max() < 0.02
    assert np.mean(fast.transduction_ == exact.transduction_) > 0.99


def test_poisson_learning_solves_the_poisson_equation_on_the_graph(digits) -> None:
    """L U = B: the Laplacian of the scores is each seed's centred label, zero elsewhere."""
    x, _, partial = digits
    features = prepare_features(x, "cosine")
    index = NeighbourIndex.build(features, "cosine", approximate=False)
    graph = knn_affinity(*index.search(features, 10, exclude_self=True), "cosine", 3.0)
    model = LabelSpreading(metric="precomputed", method="poisson", tol=1e-10).fit(graph, partial)
    laplacian = sp.diags(np.asarray(graph.sum(axis=1)).ravel()) - graph
    scores = laplacian @ model.scores_
    labeled = partial != -1
    seeds = np.eye(10)[partial[labeled]] / 5
    np.testing.assert_allclose(scores[labeled], seeds - seeds.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(scores[~labeled], 0, atol=1e-6)


def test_poisson_learning_beats_spreading_at_one_label_per_class(digits) -> None:
    """Calder et al.: at very low label rates spreading flattens, Poisson keeps classes apart."""
    x, y, _ = digits
    poisson, spreading = [], []
    for seed in range(5):
        partial = _hide_labels(y, per_class=1, seed=seed)
        unlabeled = partial == -1
        for method, scores in (("poisson", poisson), ("spreading", spreading)):
            model = LabelSpreading(method=method, gamma=30.0).fit(x, partial)
            scores.append(np.mean(model.transduction_[unlabeled] == y[unlabeled]))
    assert np.mean(poisson) > np.mean(spreading)
    assert np.mean(poisson) > 0.85


def test_precomputed_graph_and_features_give_the_same_result(digits) -> None:
    x, _, partial = digits
    from_features = LabelSpreading(n_neighbors=8).fit(x, partial)
    features = prepare_features(x, "cosine")
    index = NeighbourIndex.build(features, "cosine", approximate=False)
    graph = knn_affinity(*index.search(features, 8, exclude_self=True), "cosine", 3.0)
    from_graph = LabelSpreading(metric="precomputed").fit(graph, partial)
    np.testing.assert_allclose(
        from_graph.label_distributions_, from_features.label_distributions_, atol=1e-5
    )


def test_edge_list_input_spreads_within_connected_components() -> None:
    # Two paths, 0-1-2-3 and 4-5-6-7, one seed each at an end.
    rows, cols = [0, 1, 2, 4, 5, 6], [1, 2, 3, 5, 6, 7]
    graph = edge_affinity(np.array(rows), np.array(cols), np.ones(6), n_samples=8)
    y = np.array([0, -1, -1, -1, -1, -1, -1, 1])
    model = LabelSpreading(metric="precomputed").fit(graph, y)
    np.testing.assert_array_equal(model.transduction_, [0, 0, 0, 0, 1, 1, 1, 1])
    assert np.all(model.confidence_ > 0.99)


def test_poisson_learning_solves_each_connected_component() -> None:
    # Two paths, 0..5 and 6..11, each with a seed of either class at its ends: on a graph in
    # pieces the singular Poisson system must still converge, component by component.
    rows = [i for i in range(11) if i != 5]
    graph = edge_affinity(np.array(rows), np.array(rows) + 1, np.ones(10), n_samples=12)
    y = np.full(12, -1)
    y[[0, 11]], y[[5, 6]] = 0, 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = LabelSpreading(metric="precomputed", method="poisson").fit(graph, y)
    np.testing.assert_array_equal(model.transduction_, [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0])


def test_class_balance_evens_out_unequal_seed_counts() -> None:
    # Node 0 joins three seeds of class 0 and one of class 1, all by equal edges.
    graph = edge_affinity(np.zeros(4), np.arange(1, 5), np.ones(4), n_samples=5)
    y = np.array([-1, 0, 0, 0, 1])
    balanced = LabelSpreading(metric="precomputed", tol=1e-10).fit(graph, y)
    raw = LabelSpreading(metric="precomputed", class_balance=False, tol=1e-10).fit(graph, y)
    np.testing.assert_allclose(balanced.label_distributions_[0], [0.5, 0.5], atol=1e-8)
    np.testing.assert_allclose(raw.label_distributions_[0], [0.75, 0.25], atol=1e-8)


def test_confidence_is_one_minus_normalised_entropy(digits) -> None:
    x, _, partial = digits
    model = LabelSpreading().fit(x, partial)
    p = model.label_distributions_
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)
    np.testing.assert_allclose(model.confidence_, 1 - entropy / np.log(10), atol=1e-9)
    assert model.confidence_[partial != -1].mean() > model.confidence_[partial == -1].mean()


def test_declared_classes_fix_the_columns_even_without_seeds() -> None:
    x, y = make_blobs(n_samples=300, centers=3, random_state=0)
    partial = _hide_labels(y, per_class=5)
    partial[partial == 2] = -1
    model = LabelSpreading(classes=[2, 1, 0, 7]).fit(x, partial)
    assert model.classes_.tolist() == [2, 1, 0, 7]
    assert model.label_distributions_.shape == (300, 4)
    seeded = partial != -1
    assert np.all(model.label_distributions_[seeded][:, [0, 3]] == 0)
    np.testing.assert_array_equal(model.transduction_[seeded], partial[seeded])


def test_ivf_search_finds_the_exact_neighbours_on_clustered_data() -> None:
    x, _ = make_blobs(n_samples=3000, n_features=16, centers=30, random_state=0)
    features = prepare_features(x, "euclidean")
    _, exact = NeighbourIndex.build(features, "euclidean", False).search(features, 10, True)
    _, approximate = NeighbourIndex.build(features, "euclidean", True, n_probe=2).search(
        features, 10, True
    )
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact, strict=True)])
    assert recall > 0.9
    assert not np.any(approximate == np.arange(3000)[:, None]), "a point is its own neighbour"


def test_ivf_fit_and_inductive_predict_on_new_points() -> None:
    x, y = make_blobs(n_samples=4000, n_features=8, centers=4, cluster_std=1.0, random_state=1)
    partial = _hide_labels(y, per_class=3)
    model = LabelSpreading(search="ivf", metric="euclidean").fit(x[:3000], partial[:3000])
    assert model.index_.centroids is not None
    assert np.mean(model.transduction_ == y[:3000]) > 0.98
    assert np.mean(model.predict(x[3000:]) == y[3000:]) > 0.98
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.predict_proba(x[3000:]), model.predict_proba(x[3000:]))


def test_progress_is_reported_only_when_asked(digits, capsys) -> None:
    x, _, partial = digits
    LabelSpreading().fit(x, partial)
    assert capsys.readouterr().err == ""
    LabelSpreading(verbose=True).fit(x, partial)
    err = capsys.readouterr().err
    assert "kNN search" in err and "label spreading" in err


def test_string_labels_without_unlabeled_samples() -> None:
    x, y = make_blobs(n_samples=60, centers=[[0, 0], [8, 8]], random_state=0)
    names = np.array(["cat", "dog"])[y]
    model = LabelSpreading(n_neighbors=5, metric="euclidean").fit(x, names)
    assert model.classes_.tolist() == ["cat", "dog"]
    np.testing.assert_array_equal(model.predict(x), names)


@pytest.mark.parametrize(
    ("x_change", "y", "params", "message"),
    [
        ("nan", None, {}, "NaN"),
        ("inf", None, {}, "infinity"),
        (None, "none-labeled", {}, "no labeled sample"),
        (None, "one-class", {}, "only 1 class"),
        (None, None, {"classes": [0, 1]}, r"labels \[2\] are not in classes"),
        (None, None, {"n_neighbors": 30}, "n_neighbors=30 must be below the number of samples"),
        (None, "short", {}, "inconsistent numbers of samples"),
        (None, None, {"alpha": 1.0}, "invalid alpha"),
        (None, None, {"metric": "manhattan"}, "invalid metric"),
        (None, "continuous", {}, "Unknown label type"),
    ],
)
def test_bad_input_is_a_clear_value_error(x_change, y, params, message) -> None:
    x, labels = make_blobs(n_samples=30, centers=3, random_state=0)
    labels = _hide_labels(labels, per_class=2)
    if x_change == "nan":
        x[3, 1] = np.nan
    if x_change == "inf":
        x[3, 1] = np.inf
    labels = {
        None: labels,
        "none-labeled": np.full(30, -1),
        "one-class": np.where(labels == 0, 0, -1),
        "short": labels[:-1],
        "continuous": np.linspace(0, 1, 30),
    }[y]
    with pytest.raises(ValueError, match=message):
        LabelSpreading(**params).fit(x, labels)


@pytest.mark.parametrize(
    ("affinity", "message"),
    [
        (sp.csr_matrix(np.ones((4, 5))), "square"),
        (sp.csr_matrix(np.triu(np.ones((4, 4)))), "symmetric"),
        (sp.csr_matrix(-np.ones((4, 4))), "non-negative"),
        (sp.csr_matrix(np.full((4, 4), np.nan)), "NaN"),
    ],
)
def test_bad_precomputed_affinity_is_a_clear_value_error(affinity, message) -> None:
    with pytest.raises(ValueError, match=message):
        LabelSpreading(metric="precomputed").fit(
            affinity, np.array([0, 1, -1, -1])[: affinity.shape[0]]
        )


@pytest.mark.parametrize(
    ("rows", "cols", "weights", "message"),
    [
        ([0, 1], [1], [1.0, 1.0], "equal length"),
        ([0], [9], [1.0], "node indices"),
        ([0], [1], [np.inf], "finite and non-negative"),
        ([0], [1], [-1.0], "finite and non-negative"),
    ],
)
def test_bad_edge_list_is_a_clear_value_error(rows, cols, weights, message) -> None:
    with pytest.raises(ValueError, match=message):
        edge_affinity(np.array(rows), np.array(cols), np.array(weights), n_samples=4)


def test_predict_rejects_features_of_the_wrong_width(digits) -> None:
    x, _, partial = digits
    model = LabelSpreading().fit(x, partial)
    with pytest.raises(ValueError, match="features"):
        model.predict(x[:, :10])


def test_stopping_at_max_iter_warns(digits) -> None:
    x, _, partial = digits
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        model = LabelSpreading(max_iter=2).fit(x, partial)
    assert model.n_iter_ == 2


def test_imports_without_torch_or_the_service() -> None:
    code = (
        "import sys, trainer.label_spreading; "
        "print(sorted({'torch', 'service'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
