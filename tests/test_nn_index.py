"""models/nn_index.py: the grouped exact search returns what brute force returns, on
clustered synthetic data (where it must also skip most distances) and at the edges."""
import numpy as np
import pytest

from models.nn_index import BruteForceIndex, GroupedIndex, build_index
from models.patchcore import greedy_k_center
from utils import UserError


def float64_knn(bank, queries, k):
    full = np.sqrt(((queries[:, None].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
    idx = np.argsort(full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, idx, axis=1), idx


def clustered(rng, n, dim=24, clusters=30, spread=0.4):
    centres = rng.randn(clusters, dim) * 4
    return (centres[rng.randint(clusters, size=n)] + rng.randn(n, dim) * spread).astype(np.float32)


@pytest.fixture(scope="module")
def clustered_bank():
    """A coreset of clustered points in greedy selection order, as PatchCore stores its bank."""
    rng = np.random.RandomState(5)
    points = clustered(rng, 6000)
    chosen, _ = greedy_k_center(points, 1200, seed=0)
    queries = np.concatenate([clustered(rng, 600), rng.randn(20, 24).astype(np.float32) * 12])  # with outliers
    return points[chosen], queries


@pytest.mark.parametrize("k", [1, 9])
def test_grouped_equals_brute_force_on_clusters(clustered_bank, k):
    bank, queries = clustered_bank
    index = GroupedIndex(bank)
    dist, idx = index.search(queries, k)
    want_d, want_i = float64_knn(bank, queries, k)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(dist, want_d, rtol=1e-5, atol=1e-6)
    brute_d, brute_i = BruteForceIndex(bank).search(queries, k)
    np.testing.assert_array_equal(idx, brute_i)
    np.testing.assert_allclose(dist, brute_d, rtol=1e-5, atol=1e-5)
    # A functional check of the pruning, not a timing: most distances are never computed.
    assert 0 < index.distance_share() < 0.2


def test_grouped_search_of_bank_rows_and_small_banks(clustered_bank):
    bank, _ = clustered_bank
    # Bank rows as queries (the re-weighting searches the neighbours of a bank row): itself first.
    dist, idx = GroupedIndex(bank).search(bank[:300], 9)
    np.testing.assert_array_equal(idx[:, 0], np.arange(300))
    np.testing.assert_array_equal(idx, float64_knn(bank, bank[:300], 9)[1])
    rng = np.random.RandomState(1)
    for size, groups in ((1, None), (5, 2), (40, 40), (200, 1)):
        small, queries = rng.randn(size, 8).astype(np.float32), rng.randn(50, 8).astype(np.float32)
        got_d, got_i = GroupedIndex(small, n_groups=groups).search(queries, 3)
        want_d, want_i = float64_knn(small, queries, min(3, size))
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-6)


def test_duplicate_rows_give_the_same_distances():
    rows = np.random.RandomState(2).randn(100, 16).astype(np.float32)
    bank = np.concatenate([rows, rows])  # every row twice: ties everywhere
    queries = rows[:40] + 0.01
    dist, idx = GroupedIndex(bank, n_groups=10).search(queries, 2)
    np.testing.assert_allclose(dist, float64_knn(bank, queries, 2)[0], rtol=1e-5)
    # Equal distances rank by bank row, as brute force's stable sort ranks them.
    np.testing.assert_array_equal(idx, np.stack([np.arange(40), np.arange(40) + 100], axis=1))
    np.testing.assert_array_equal(idx, BruteForceIndex(bank).search(queries, 2)[1])


def test_answers_do_not_depend_on_the_batch_or_threads(clustered_bank, monkeypatch):
    """A query's neighbours are the same whether it is searched alone, in another order, in a
    smaller batch or by another number of threads: the search splits a batch by nearest centre
    and into per-thread blocks, and none of that may reach the answer (scores must not depend
    on --batch_size or --cpu_threads)."""
    from models import parallel
    bank, queries = clustered_bank
    index = GroupedIndex(bank)
    want_d, want_i = index.search(queries, 9)
    shuffled = np.random.RandomState(3).permutation(len(queries))
    got_d, got_i = index.search(queries[shuffled], 9)
    np.testing.assert_array_equal(got_d, want_d[shuffled])
    np.testing.assert_array_equal(got_i, want_i[shuffled])
    for lo in (0, 7, 300):
        part_d, part_i = index.search(queries[lo:lo + 5], 9)
        np.testing.assert_array_equal(part_d, want_d[lo:lo + 5])
        np.testing.assert_array_equal(part_i, want_i[lo:lo + 5])
    before = parallel.cpu_threads()
    try:
        parallel.set_cpu_threads(1)
        one_d, one_i = index.search(queries, 9)
    finally:
        parallel.set_cpu_threads(before)
    np.testing.assert_array_equal(one_d, want_d)
    np.testing.assert_array_equal(one_i, want_i)
    monkeypatch.setattr("models.nn_index.MIN_BLOCK", 16)  # many more, smaller blocks
    small_d, small_i = index.search(queries, 9)
    np.testing.assert_array_equal(small_d, want_d)
    np.testing.assert_array_equal(small_i, want_i)


def test_unknown_search_kind_is_a_user_error():
    with pytest.raises(UserError, match="grouped, brute, faiss"):
        build_index(np.zeros((3, 2), np.float32), "annoy")
