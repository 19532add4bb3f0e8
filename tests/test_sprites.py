"""The sprites tasks of data.py: the scene generator, FG-ARI / ARI / mBO and the fixed baselines, the Hungarian solver and set-prediction AP."""

import itertools
import math

import pytest
import torch

import torch.nn.functional as F

from data import (PALETTE, SHAPES, SIZES, Sprites, SpritesConfig, SpritesSets, adjusted_rand_index, fixed_partitions,
                  hungarian, mean_best_overlap, shape_mask)


def batch_of(config=None, size=6, seed=0):
    task = Sprites(config or SpritesConfig())
    return task, task.train_batch(size, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Adjusted Rand index

def brute_force_ari(true, predicted):
    """Pair counting over every pair of points (Hubert & Arabie 1985), no contingency table."""
    n11 = n10 = n01 = n00 = 0
    for i, j in itertools.combinations(range(len(true)), 2):
        same_true, same_pred = true[i] == true[j], predicted[i] == predicted[j]
        n11 += same_true and same_pred
        n10 += same_true and not same_pred
        n01 += same_pred and not same_true
        n00 += not same_true and not same_pred
    denominator = (n00 + n01) * (n01 + n11) + (n00 + n10) * (n10 + n11)
    return 1.0 if denominator == 0 else 2 * (n00 * n11 - n01 * n10) / denominator


def test_ari_matches_a_hand_computed_example():
    # true [0 0 0 1 1 1], predicted [0 0 1 1 2 2]: sum C(n_ij, 2) = 2, sum C(a_i, 2) = 6,
    # sum C(b_j, 2) = 3, C(6, 2) = 15: expected 6 * 3 / 15 = 1.2, max 4.5, ARI = 0.8 / 3.3
    true = torch.tensor([[0, 0, 0, 1, 1, 1]])
    predicted = torch.tensor([[0, 0, 1, 1, 2, 2]])
    assert adjusted_rand_index(true, predicted).item() == pytest.approx(0.8 / 3.3, abs=1e-6)


def test_ari_equals_brute_force_pair_counting_on_small_random_segmentations():
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 4, (20, 3, 4), generator=g)
    predicted = torch.randint(0, 3, (20, 3, 4), generator=g)
    predicted[:5] = true[:5] % 2  # some close to the truth, so the values spread out
    include = torch.rand(20, 3, 4, generator=g) > 0.3
    ours = adjusted_rand_index(true, predicted)
    ours_fg = adjusted_rand_index(true, predicted, include)
    for b in range(20):
        assert ours[b].item() == pytest.approx(brute_force_ari(true[b].flatten().tolist(), predicted[b].flatten().tolist()), abs=1e-5)
        keep = include[b]
        assert ours_fg[b].item() == pytest.approx(brute_force_ari(true[b][keep].tolist(), predicted[b][keep].tolist()), abs=1e-5)


def test_ari_is_one_for_a_perfect_segmentation_up_to_relabelling_and_never_nan():
    true = torch.tensor([[[0, 1, 1], [2, 2, 3]]])
    relabelled = torch.tensor([[[5, 0, 0], [3, 3, 1]]])
    assert adjusted_rand_index(true, relabelled).item() == pytest.approx(1.0)
    one_object = torch.tensor([[[0, 1, 1], [0, 1, 1]]])
    uniform = torch.zeros(1, 2, 3, dtype=torch.long)
    assert adjusted_rand_index(one_object, uniform, one_object > 0).item() == 1.0  # both one cluster
    assert adjusted_rand_index(one_object, torch.tensor([[[0, 0, 1], [0, 0, 2]]]), one_object > 0).item() == 0.0
    assert adjusted_rand_index(true, uniform, true > 0).item() == 0.0  # a uniform prediction scores 0
    assert not torch.isnan(adjusted_rand_index(true, uniform, torch.zeros_like(true, dtype=torch.bool))).any()


def test_fg_ari_of_the_true_masks_is_100_and_background_pixels_do_not_count():
    task, batch = batch_of()
    masks = torch.nn.functional.one_hot(batch["segmentation"], 6).permute(0, 3, 1, 2).float()
    result = task.metrics(batch["x"], batch, {"masks": masks})
    assert result["fg_ari"] == pytest.approx(100 * 6) and result["ari"] == pytest.approx(100 * 6)
    assert result["count"] == 6 and result["mse"] == 0
    merged = batch["segmentation"].clamp(max=1)  # background and objects apart, objects all merged...
    masks = torch.nn.functional.one_hot(merged + (batch["segmentation"] == 0) * 2, 6).permute(0, 3, 1, 2).float()
    result = task.metrics(batch["x"], batch, {"masks": masks})
    assert result["fg_ari"] == pytest.approx(0.0, abs=1e-6)  # ...is no better than chance on the foreground


# ----------------------------------------------------------------------------------------------
# Hungarian matching

@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (3, 5), (2, 4)])
def test_hungarian_finds_the_brute_force_optimum(rows, cols):
    g = torch.Generator().manual_seed(rows * 10 + cols)
    for _ in range(20):
        cost = torch.rand(rows, cols, generator=g)
        cost[cost < 0.2] = 0.0  # ties
        assignment = hungarian(cost)
        assert len(set(assignment.tolist())) == rows
        best = min(sum(cost[r, c].item() for r, c in enumerate(p)) for p in itertools.permutations(range(cols), rows))
        assert cost[torch.arange(rows), assignment].sum().item() == pytest.approx(best, abs=1e-6)


def test_hungarian_refuses_more_rows_than_columns():
    with pytest.raises(ValueError):
        hungarian(torch.zeros(3, 2))


# ----------------------------------------------------------------------------------------------
# The scene generator

def test_the_segmentation_is_exactly_the_top_most_drawn_shape_and_the_image_its_colour():
    config = SpritesConfig(background="grey")
    task, batch = batch_of(config)
    S = config.image_size
    centres = torch.arange(S) + 0.5
    py, px = torch.meshgrid(centres, centres, indexing="ij")
    for b in range(len(batch["x"])):
        count = int(batch["exists"][b].sum())
        expected = torch.zeros(S, S, dtype=torch.long)
        for i in range(count):  # redraw from the stored properties, in painter's order
            radius = SIZES[batch["size"][b, i]] * S
            cx, cy = batch["position"][b, i] * S
            a = batch["angle"][b, i]
            dx, dy = (px - cx) / radius, (py - cy) / radius
            u, v = dx * torch.cos(a) + dy * torch.sin(a), -dx * torch.sin(a) + dy * torch.cos(a)
            expected[shape_mask(SHAPES[batch["shape"][b, i]], u, v)] = i + 1  # later objects on top
        assert (expected != batch["segmentation"][b]).float().mean() < 0.002  # float rounding at edges only
        seg = batch["segmentation"][b]
        assert torch.allclose(batch["x"][b][:, seg == 0], torch.tensor(0.0))  # grey background: 0.5 -> 0
        for i in range(count):
            colour = 2 * PALETTE[batch["colour"][b, i]].unsqueeze(1) - 1  # [0, 1] -> [-1, 1]
            assert torch.equal(batch["x"][b][:, seg == i + 1], colour.expand(3, int((seg == i + 1).sum())))


def test_object_counts_stay_in_range_every_object_stays_visible_and_padding_is_zero():
    config = SpritesConfig(min_objects=2, max_objects=5)
    task, batch = batch_of(config, size=24, seed=3)
    counts = batch["exists"].sum(1)
    assert counts.min() >= 2 and counts.max() <= 5 and len(set(counts.tolist())) > 1
    for b in range(24):
        n = int(counts[b])
        assert set(batch["segmentation"][b].unique().tolist()) == set(range(n + 1))  # none fully hidden
        assert all((batch["segmentation"][b] == i + 1).sum() >= 4 for i in range(n))
        assert batch["exists"][b, n:].sum() == 0 and batch["position"][b, n:].abs().sum() == 0


def test_the_same_seed_gives_the_same_scenes_and_another_seed_others():
    _, a = batch_of(seed=5)
    _, b = batch_of(seed=5)
    _, c = batch_of(seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x"], c["x"])


def test_backgrounds_and_64_pixel_scenes():
    _, batch = batch_of(SpritesConfig(image_size=64, background="colour"), size=2)
    assert batch["x"].shape == (2, 3, 64, 64)
    background = batch["x"][0][:, batch["segmentation"][0] == 0]
    assert torch.allclose(background, background[:, :1].expand_as(background))  # one colour per image
    assert -0.7 <= background.min() and background.max() <= 0.0  # 0.15..0.5 in [0, 1]


def test_inputs_lie_in_minus_1_1_and_unsigned_scenes_are_the_same_scenes_in_0_1():
    _, signed = batch_of(seed=4)
    _, unsigned = batch_of(SpritesConfig(signed=False), seed=4)
    assert signed["x"].min() == -1 and signed["x"].max() <= 1  # black background: -1
    assert torch.allclose(signed["x"], 2 * unsigned["x"] - 1)
    assert torch.equal(signed["segmentation"], unsigned["segmentation"])
    assert torch.allclose(Sprites(SpritesConfig()).to_display(signed["x"]), unsigned["x"])


def test_colours_are_distinct_within_every_scene_unless_asked_otherwise():
    _, batch = batch_of(SpritesConfig(min_objects=4, max_objects=5), size=64, seed=2)
    for b in range(64):
        n = int(batch["exists"][b].sum())
        assert len(set(batch["colour"][b, :n].tolist())) == n
    _, repeated = batch_of(SpritesConfig(min_objects=4, max_objects=5, distinct_colours=False), size=64, seed=2)
    assert any(len(set(repeated["colour"][b, :int(repeated["exists"][b].sum())].tolist())) <
               int(repeated["exists"][b].sum()) for b in range(64))
    with pytest.raises(ValueError, match="distinct colours"):
        SpritesConfig(max_objects=9)
    SpritesConfig(max_objects=9, distinct_colours=False)


def test_mean_best_overlap_by_hand():
    true = torch.tensor([[[0, 1, 1, 2],
                          [0, 1, 1, 2]]])  # background, object 1 (4 px), object 2 (2 px)
    predicted = torch.tensor([[[3, 3, 5, 5],
                               [3, 3, 5, 5]]])
    # object 1: best IoU with segment 3 or 5 = 2 / 6; object 2: with segment 5 = 2 / 4
    assert mean_best_overlap(true, predicted).item() == pytest.approx((2 / 6 + 2 / 4) / 2)
    assert mean_best_overlap(true, true).item() == pytest.approx(1.0)  # the true masks
    assert mean_best_overlap(torch.zeros(1, 2, 2, dtype=torch.long), predicted[:, :, :2]).item() == 1.0


def test_the_fixed_partitions_are_a_3_by_2_grid_and_six_stripes_and_metrics_report_them():
    parts = fixed_partitions(6, 6)
    assert parts["grid"].tolist() == [[0, 0, 0, 1, 1, 1]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2 + [[4, 4, 4, 5, 5, 5]] * 2
    assert parts["stripes"].tolist() == [[r] * 6 for r in range(6)]
    assert fixed_partitions(4, 2)["grid"].tolist() == [[0, 1], [2, 3]]
    task, batch = batch_of(size=8, seed=0)
    grid = fixed_partitions(6, 32)["grid"]
    masks = F.one_hot(grid, 6).permute(2, 0, 1).float().expand(8, -1, -1, -1)  # a model that outputs the grid
    result = task.metrics(batch["x"], batch, {"masks": masks})
    assert result["fg_ari"] == pytest.approx(result["grid_fg_ari"]) and result["mbo"] == pytest.approx(result["grid_mbo"])
    assert result["grid_fg_ari"] != result["stripes_fg_ari"]
    true_masks = F.one_hot(batch["segmentation"], 6).permute(0, 3, 1, 2).float()
    perfect = task.metrics(batch["x"], batch, {"masks": true_masks})
    assert perfect["mbo"] == pytest.approx(800.0) and perfect["mbo"] > 2 * perfect["grid_mbo"]


@pytest.mark.parametrize("bad", [dict(min_objects=0), dict(min_objects=4, max_objects=3),
                                 dict(background="pink"), dict(image_size=8), dict(min_visible=0)])
def test_bad_sprites_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SpritesConfig(**bad)


# ----------------------------------------------------------------------------------------------
# Set prediction

def perfect_predictions(task, batch, num_slots=6):
    y = task.targets(batch, num_slots)
    return y[:, torch.randperm(num_slots, generator=torch.Generator().manual_seed(0))]  # slot order is arbitrary


def test_set_loss_is_zero_for_the_right_set_in_any_slot_order_and_positive_otherwise():
    task = SpritesSets(SpritesConfig())
    batch = task.train_batch(4, torch.Generator().manual_seed(0))
    assert task.spec["output_size"] == 2 + 4 + 8 + 3 + 1
    predictions = perfect_predictions(task, batch)
    assert task.loss(predictions, batch).item() == pytest.approx(0.0, abs=1e-7)
    assert task.loss(predictions.flip(1) * 0.9, batch).item() > 0


def test_ap_is_100_for_perfect_predictions_and_falls_with_distance_and_wrong_classes():
    task = SpritesSets(SpritesConfig())
    batch = task.train_batch(8, torch.Generator().manual_seed(0))
    predictions = perfect_predictions(task, batch)
    result = task.metrics(predictions, batch, {})
    assert result["count"] == 8
    assert all(result[f"ap@{t}"] == pytest.approx(800.0) for t in ("inf", "1", "0.5", "0.25", "0.125"))
    assert result["shape_acc"] == result["colour_acc"] == result["size_acc"] == pytest.approx(800.0)
    assert result["position_err"] == pytest.approx(0.0, abs=1e-5)
    shifted = predictions.clone()
    shifted[..., 0] += 0.3 / 6  # every centre 0.3 units off: right at 0.5 and above, wrong below
    result = task.metrics(shifted, batch, {})
    assert result["ap@0.5"] == pytest.approx(800.0) and result["ap@0.25"] == 0.0
    assert result["position_err"] == pytest.approx(8 * 0.3, abs=1e-4)  # 0.3 units per image, summed
    wrong = predictions.clone()
    wrong[..., 2:6] = wrong[..., 2:6].roll(1, dims=-1)  # every object's shape wrong: only the slots
    wrong_result = task.metrics(wrong, batch, {})  # left empty (confidence 0) can still hit
    assert wrong_result["ap@inf"] < 0.1 * 800
    # (the matching may now pair a few objects differently, so not exactly 0 and 100 %)
    assert wrong_result["shape_acc"] < 0.1 * 800 and wrong_result["colour_acc"] > 0.9 * 800


def test_ap_follows_the_official_rule_a_prediction_nearest_a_claimed_object_is_a_false_positive():
    task = SpritesSets(SpritesConfig(min_objects=2, max_objects=2))
    batch = task.train_batch(1, torch.Generator().manual_seed(1))
    batch["colour"][0, 1] = batch["colour"][0, 0]  # two objects of the same classes
    batch["shape"][0, 1], batch["size"][0, 1] = batch["shape"][0, 0], batch["size"][0, 0]
    batch["position"][0] = torch.tensor([[0.2, 0.5], [0.8, 0.5]])  # 3.6 units apart
    y = task.targets(batch, 2)
    predictions = y.clone()
    predictions[0, :, :2] = torch.tensor([[0.2, 0.5], [0.3, 0.5]])  # both nearest object 0
    predictions[0, 0, -1], predictions[0, 1, -1] = 0.9, 0.8
    # the second is nearest object 0, already claimed: a false positive (the nearest unclaimed object,
    # 3 units away, would have made it a hit at infinite threshold)
    assert task.average_precision(predictions, batch, math.inf) == pytest.approx(0.5)
    # and the threshold is strict: a distance equal to it does not count
    predictions[0, 1, :2] = torch.tensor([0.8 + 0.5 / 6, 0.5])  # 0.5 units from object 1
    assert task.average_precision(predictions, batch, 0.5 + 1e-4) == pytest.approx(1.0)
    assert task.average_precision(predictions, batch, 0.5 - 1e-4) == pytest.approx(0.5)


def test_ap_by_hand_one_true_and_one_false_positive_ranked_by_confidence():
    task = SpritesSets(SpritesConfig(min_objects=2, max_objects=2))
    batch = task.train_batch(1, torch.Generator().manual_seed(1))
    y = task.targets(batch, 2)
    predictions = y.clone()
    predictions[0, 1, 2:6] = predictions[0, 1, 2:6].roll(1)  # the second object gets the wrong shape
    predictions[0, 0, -1], predictions[0, 1, -1] = 0.6, 0.9  # and is the more confident one
    # ranked: wrong (precision 0, recall 0), right (precision 1/2, recall 1/2): AP = 1/2 * 1/2
    assert task.average_precision(predictions, batch, math.inf) == pytest.approx(0.25)
    predictions[0, 0, -1] = 0.95  # the right one first: precision 1 at recall 1/2
    assert task.average_precision(predictions, batch, math.inf) == pytest.approx(0.5)
