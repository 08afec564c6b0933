"""PatchCore (`--method coreset`): coreset selection, nearest-neighbour scoring, image-score
re-weighting, bad flags, and one real bottle run through train.py / eval.py / predict.py."""
import csv
import importlib.util
import json
import os
import shutil

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import eval as eval_script
import predict as predict_script
import train as train_script
import export_model
from conftest import ACCURACY, assert_batches_match_batch_1, assert_deployed_matches_predict, count_images
from models import load_model
from models.nn_index import BruteForceIndex, FaissIndex, GroupedIndex
from models.patchcore import PatchCore, channel_pool_matrix, greedy_k_center, patch_rows
from utils import UserError, run_cli

CORESET = ["--method", "coreset", "--arch", "resnet18", "--coreset_ratio", "0.1"]


def config(**kw):
    return {"method": "coreset", "arch": "resnet18", "seed": 0, "resize": 256, "crop_size": 224, "coreset_ratio": 0.1,
            "num_neighbors": 9, **kw}


def slow_greedy(points, n_select, start):
    """The obvious O(n * n_select) greedy k-center in float64."""
    x = points.astype(np.float64)
    chosen, radii = [start], [np.inf]
    nearest = ((x - x[start]) ** 2).sum(1)
    while len(chosen) < n_select:
        j = int(nearest.argmax())
        chosen.append(j)
        radii.append(np.sqrt(nearest[j]))
        nearest = np.minimum(nearest, ((x - x[j]) ** 2).sum(1))
    return np.array(chosen), np.array(radii)


def farthest_point_gaps(points, chosen):
    """Following `chosen`, the float64 distance of each centre to the earlier ones, relative to
    the largest such distance over all points (1 for a farthest point); and those distances."""
    x = points.astype(np.float64)
    nearest = ((x - x[chosen[0]]) ** 2).sum(1)
    gaps, radii = [], [np.inf]
    for j in chosen[1:]:
        gaps.append(np.sqrt(nearest[j] / nearest.max()))
        radii.append(np.sqrt(nearest[j]))
        nearest = np.minimum(nearest, ((x - x[j]) ** 2).sum(1))
    return np.array(gaps), np.array(radii)


def check_greedy(points, n_select, **kw):
    """Small batches, candidate sets and blocks so that every path runs: early updates when the
    candidates run out, the dense phase and the pruned phase."""
    got, radii = greedy_k_center(points, n_select, seed=7, per_update=16, n_candidates=48, n_blocks=60)
    assert got[0] == np.random.RandomState(7).randint(len(points)) and len(set(got.tolist())) == n_select
    gaps, true_radii = farthest_point_gaps(points, got)
    np.testing.assert_allclose(radii[1:], true_radii[1:], rtol=1e-4)
    # radii[t] is the coverage radius of the first t centres, and it never increases.
    assert np.all(np.diff(radii[1:]) <= 1e-6)
    for t in (1, 59, 60, 61, n_select // 2, n_select - 1):
        cover = np.sqrt(((points[:, None, :] - points[got[:t]][None]) ** 2).sum(-1).min(1).max())
        assert radii[t] == pytest.approx(cover, rel=1e-4)
    return got, gaps


def test_greedy_k_center_equals_slow_greedy():
    points = np.random.RandomState(3).rand(3000, 8).astype(np.float32)
    got, _ = check_greedy(points, 400)
    np.testing.assert_array_equal(got, slow_greedy(points, 400, got[0])[0])


def test_greedy_k_center_on_clusters_picks_a_farthest_point_every_time():
    """Tight clusters far apart: the pruning skips most blocks. Distances there are small next
    to the norms, so float32 rounding (~1e-5 relative) can break near-ties otherwise than the
    float64 greedy; each choice must still be a farthest point to that precision."""
    rng = np.random.RandomState(3)
    points = ((rng.randn(40, 16) * 5)[rng.randint(40, size=3000)] + rng.randn(3000, 16) * 0.3).astype(np.float32)
    _, gaps = check_greedy(points, 400)
    assert gaps.min() > 1 - 1e-4


def test_greedy_k_center_edge_sizes_and_duplicates():
    points = np.repeat(np.random.RandomState(0).rand(50, 4).astype(np.float32), 3, axis=0)  # each point thrice
    assert len(greedy_k_center(points, 1, seed=0)[0]) == 1
    for kw in ({}, {"per_update": 8, "n_candidates": 20, "n_blocks": 30}):
        chosen, radii = greedy_k_center(points, 150, seed=0, **kw)
        assert sorted(chosen.tolist()) == list(range(150))  # each once, whatever the rounding
        assert radii[49] > 1e-2 and np.all(radii[50:] < 1e-3)  # 50 distinct places, then only copies


def test_channel_pooling_is_adaptive_average_pooling():
    x = np.random.RandomState(0).rand(2, 5, 384).astype(np.float32)
    want = F.adaptive_avg_pool1d(paddle.to_tensor(x), 1024).numpy()
    np.testing.assert_allclose(x @ channel_pool_matrix(384, 1024).T, want, rtol=1e-6)


def test_exact_search_matches_brute_force():
    rng = np.random.RandomState(1)
    bank, queries = rng.randn(700, 24).astype(np.float32), rng.randn(300, 24).astype(np.float32)
    dist, idx = BruteForceIndex(bank).search(queries, 5)
    full = np.sqrt(((queries[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1))
    np.testing.assert_array_equal(idx, np.argsort(full, axis=1)[:, :5])
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :5], rtol=1e-4)


def random_outputs(rng, bank_size=60, dim=16, batch=3):
    bank = rng.randn(bank_size, dim).astype(np.float32)
    feats = (rng.randn(batch, dim, 4, 5) * 1.3).astype(np.float32)
    return [feats], {"memory_bank": bank}


def test_image_score_reweighting_matches_direct_formula():
    rng = np.random.RandomState(2)
    outputs, stats = random_outputs(rng)
    bank = stats["memory_bank"].astype(np.float64)
    method = PatchCore(config(num_neighbors=4))
    patches = method.score(outputs, stats)
    got = method.image_score(outputs, patches, stats)
    for b, feats in enumerate(outputs[0]):
        q_all = feats.reshape(16, -1).T.astype(np.float64)
        d = np.sqrt(((q_all[:, None] - bank[None]) ** 2).sum(-1))   # [patches, bank]
        np.testing.assert_allclose(patches[b].ravel(), d.min(1), rtol=1e-4)
        worst = d.min(1).argmax()
        s_star, m_star = d[worst].min(), d[worst].argmin()
        support = np.argsort(((bank - bank[m_star]) ** 2).sum(1))[:4]    # m* and its 3 nearest
        weight = 1 - np.exp(d[worst, m_star]) / np.exp(d[worst, support]).sum()
        assert got[b] == pytest.approx(weight * s_star, rel=1e-4)
    plain = PatchCore(config(num_neighbors=1))
    np.testing.assert_allclose(plain.image_score(outputs, patches, stats), patches.reshape(3, -1).max(1), rtol=1e-6)


def test_exact_and_faiss_give_the_same_scores():
    pytest.importorskip("faiss", reason="faiss not installed (pip install faiss-cpu): faiss search untested")
    rng = np.random.RandomState(4)
    bank, queries = rng.randn(900, 32).astype(np.float32), rng.randn(400, 32).astype(np.float32)
    d_exact, i_exact = BruteForceIndex(bank).search(queries, 9)
    d_faiss, i_faiss = FaissIndex(bank).search(queries, 9)
    np.testing.assert_array_equal(i_exact, i_faiss)
    np.testing.assert_allclose(d_exact, d_faiss, rtol=1e-4)
    outputs, stats = random_outputs(rng, bank_size=300, dim=32)
    exact, fast = PatchCore(config()), PatchCore(config(faiss=True))
    patches = exact.score(outputs, stats)
    np.testing.assert_allclose(fast.score(outputs, stats), patches, rtol=1e-4)
    np.testing.assert_allclose(fast.image_score(outputs, patches, stats), exact.image_score(outputs, patches, stats),
                               rtol=1e-4)


@pytest.mark.parametrize("flags", [["--coreset_ratio", "0"], ["--coreset_ratio", "1.5"], ["--num_neighbors", "0"]])
def test_bad_coreset_flags_are_one_line_errors(flags, capsys):
    with pytest.raises(UserError):
        train_script.main(["--method", "coreset", *flags])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_script.main(["--method", "coreset", *flags]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {flags[0]} must")


# ---------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def coreset_run(mvtec_lite, r18_weights, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("coreset_run"))
    code = train_script.main(["--data_path", mvtec_lite, "--category", "bottle", *CORESET,
                              "--backbone_weights", r18_weights, "--eval_PRO", "--save_path", save, "--no_progress"])
    assert code == 0
    return save


def test_bottle_accuracy_and_model_file(coreset_run, mvtec_lite):
    with open(os.path.join(coreset_run, "results.csv")) as f:
        row = next(csv.DictReader(f))
    image_bound, pixel_bound, pro_bound = ACCURACY["coreset"]
    assert float(row["image_AUROC"]) >= image_bound
    assert float(row["pixel_AUROC"]) >= pixel_bound
    assert float(row["PRO"]) >= pro_bound
    state = load_model(os.path.join(coreset_run, "bottle.pdparams"))
    n_train = count_images(os.path.join(mvtec_lite, "bottle", "train"))  # 209 shared, 60 demo
    assert state["train_patches"] == n_train * 28 * 28
    assert state["stats"]["memory_bank"].shape == (round(n_train * 784 * 0.1), 384)  # in the 384-dim feature basis
    assert "basis" not in state["stats"] and state["projection"].shape == (384, 128)
    assert state["net"]["channel_pool"].shape == (384, 384, 1, 1)  # the basis folded into the pooling conv
    assert state["config"]["coreset_ratio"] == 0.1 and "faiss" not in state["config"]


def raw_scores(save_path, test_root):
    """{image path under test_root: raw image score} from a run's metrics record."""
    with open(os.path.join(save_path, "metrics", "bottle.json")) as f:
        return {os.path.relpath(p["image_path"], test_root): p["raw_score"] for p in json.load(f)["predictions"]}


def test_eval_and_predict_with_the_saved_model(coreset_run, mvtec_lite, tmp_path, capsys):
    """eval.py on a small copy of the test set (with --faiss when installed, else brute force:
    same scores as training's grouped search), then predict.py on two images."""
    subset = tmp_path / "data" / "bottle"
    picked = ["good/000.png", "good/001.png", "broken_large/000.png", "contamination/000.png"]
    for rel in picked:
        os.makedirs(subset / "test" / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(mvtec_lite, "bottle", "test", rel), subset / "test" / rel)
        if not rel.startswith("good"):
            mask = rel.replace(".png", "_mask.png")
            os.makedirs(subset / "ground_truth" / os.path.dirname(rel), exist_ok=True)
            shutil.copy(os.path.join(mvtec_lite, "bottle", "ground_truth", mask), subset / "ground_truth" / mask)
    # Training scored with the grouped search: brute force (or faiss) gives the same scores.
    search = ["--faiss"] if importlib.util.find_spec("faiss") else ["--nn_search", "brute"]
    out = str(tmp_path / "eval")
    assert eval_script.main(["--data_path", str(tmp_path / "data"), "--category", "bottle", *CORESET, *search,
                             "--model_path", coreset_run, "--save_path", out, "--no_progress",
                             "--update_thresholds", "False"]) == 0
    trained = raw_scores(coreset_run, os.path.join(mvtec_lite, "bottle", "test"))
    evaluated = raw_scores(out, str(subset / "test"))
    assert sorted(evaluated) == sorted(picked)
    for rel, score in evaluated.items():
        assert score == pytest.approx(trained[rel], rel=1e-4)
    capsys.readouterr()
    images = [os.path.join(mvtec_lite, "bottle", "test", rel) for rel in ("broken_large/000.png", "good/000.png")]
    assert predict_script.main([*images, "--category", "bottle", *CORESET, "--model_path", coreset_run,
                                "--output_dir", str(tmp_path / "pred"), "--no_progress"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["pred_label"] for line in lines] == ["anomalous", "normal"]


def test_deployed_patchcore_matches_predict(coreset_run, mvtec_lite, tmp_path, capsys):
    test_dir = os.path.join(mvtec_lite, "bottle", "test")
    images = [os.path.join(test_dir, d, f"{i:03d}.png") for d in ("broken_large", "contamination", "good")
              for i in range(3)]
    assert_deployed_matches_predict(coreset_run, CORESET, "bottle", images, tmp_path, capsys)


def float64_knn(bank, queries, k):
    b, q = bank.astype(np.float64), queries.astype(np.float64)
    d2 = (q ** 2).sum(1)[:, None] - 2 * q @ b.T + (b ** 2).sum(1)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.sqrt(np.maximum(np.take_along_axis(d2, idx, axis=1), 0)), idx


def test_deployed_batches_and_grouped_search_on_the_bottle_bank(coreset_run, mvtec_lite, tmp_path):
    """The deployed 10% bank: batch-4 scores equal batch-1 scores; on real patches the grouped
    search finds brute force's neighbours (k=1, and the re-weighting's k=9 around bank rows)
    and image scores, computing a small share of the distances."""
    deployed = str(tmp_path / "deployed")
    assert export_model.main([*CORESET, "--model_path", os.path.join(coreset_run, "bottle.pdparams"),
                              "--save_dir", deployed]) == 0
    test_dir = os.path.join(mvtec_lite, "bottle", "test")
    images = [os.path.join(test_dir, d, f"{i:03d}.png")
              for d, n in (("broken_large", 2), ("good", 3)) for i in range(n)]
    detector, x = assert_batches_match_batch_1(deployed, images, tmp_path)
    stats = detector.stats
    bank = stats["memory_bank"]
    outputs = detector.features(x)
    queries = patch_rows(outputs[0])
    grouped = GroupedIndex(bank)
    brute_d, brute_i = BruteForceIndex(bank).search(queries, 1)
    got_d, got_i = grouped.search(queries, 1)
    # float32 brute force can misorder a near-tie (one query of 3920 on the demo bank): where the
    # two disagree, float64 must find the grouped search's neighbour at least as near.
    differ = np.flatnonzero(got_i[:, 0] != brute_i[:, 0])
    assert len(differ) <= len(queries) // 1000, differ
    for m in differ:
        q = queries[m].astype(np.float64)
        d_got, d_brute = (np.linalg.norm(q - bank[i].astype(np.float64)) for i in (got_i[m, 0], brute_i[m, 0]))
        assert d_got <= d_brute * (1 + 1e-12), (m, d_got, d_brute)
    # Brute force's float32 |q|^2 - 2 q.p + |p|^2 errs by up to ~1e-4 absolute on small distances;
    # the grouped search sums squared differences, and matches float64 to 1e-5 below.
    np.testing.assert_allclose(got_d, brute_d, rtol=1e-4, atol=5e-4)
    for q, k in ((queries[::20], 1), (queries[::40], 9), (bank[::100], 9)):
        want_d, want_i = float64_knn(bank, q, k)
        got_d, got_i = grouped.search(q, k)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-6)
    assert grouped.distance_share() < 0.5
    exact, fast = PatchCore(config(nn_search="brute")), PatchCore(config())
    patches = fast.score(outputs, stats)
    np.testing.assert_allclose(patches, exact.score(outputs, stats), rtol=1e-4, atol=5e-4)
    np.testing.assert_allclose(fast.image_score(outputs, patches, stats), exact.image_score(outputs, patches, stats),
                               rtol=1e-6)
