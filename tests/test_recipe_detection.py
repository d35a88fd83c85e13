"""The `detection` recipe: its scenes, boxes, matching, NMS and mAP by hand, and short training runs."""

from __future__ import annotations

import math

import pytest
import torch

from mixprec.harness.training import train
from mixprec.recipes import detection as det
from mixprec.recipes import get_recipe

SPEC = "mixprec.recipes.detection:recipe"


@pytest.fixture(scope="module")
def small_data():
    return det.make_data(train_rows=512, test_rows=64)


def _boxes(*rows: tuple[float, float, float, float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_scenes_are_deterministic_and_boxes_lie_inside_the_image():
    first, again = det.make_data(train_rows=64, test_rows=16), det.make_data(train_rows=64, test_rows=16)
    for a, b in zip((*first.train, *first.test), (*again.train, *again.test), strict=True):
        assert torch.equal(a, b)
    longer = det.make_data(train_rows=64, test_rows=32)
    assert all(torch.equal(a, b) for a, b in zip(first.train, longer.train, strict=True))  # the split is fixed
    assert not torch.equal(first.train[0][:16], first.test[0])  # and the test scenes are others
    images, boxes, labels, valid = first.train
    assert images.shape == (64, 1, det.IMAGE_SIZE, det.IMAGE_SIZE) and boxes.shape == (64, det.MAX_OBJECTS, 4)
    counts = valid.sum(dim=1)
    assert counts.min() >= 1 and counts.max() <= det.MAX_OBJECTS and counts.float().std() > 0
    real = boxes[valid]
    assert (real >= 0).all() and (real <= 1).all()
    assert ((real[:, 2:] - real[:, :2]) * det.IMAGE_SIZE >= det.SIZE_RANGE[0] - 1e-4).all()
    assert set(labels[valid].tolist()) == set(range(det.NUM_CLASSES))
    # the shapes are where their boxes say: brighter inside the boxes than outside
    ys, xs = torch.meshgrid(torch.arange(det.IMAGE_SIZE) + 0.5, torch.arange(det.IMAGE_SIZE) + 0.5, indexing="ij")
    inside = torch.zeros(64, det.IMAGE_SIZE, det.IMAGE_SIZE, dtype=torch.bool)
    for row, slot in valid.nonzero().tolist():
        x1, y1, x2, y2 = (boxes[row, slot] * det.IMAGE_SIZE).tolist()
        inside[row] |= (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)
    pixels = images[:, 0]
    assert pixels[inside].mean() > pixels[~inside].mean() + 0.3


def test_iou_encoding_and_matching_on_a_hand_example():
    assert det.box_iou(_boxes((0, 0, 2, 2)), _boxes((1, 1, 3, 3))).item() == pytest.approx(1 / 7)
    assert det.box_iou(_boxes((0, 0, 1, 1)), _boxes((2, 2, 3, 3))).item() == 0.0
    priors = _boxes((0.25, 0.25, 0.5, 0.5), (0.3, 0.3, 0.5, 0.5), (0.75, 0.75, 0.5, 0.5))  # (cx, cy, w, h)
    boxes = _boxes((0, 0, 0.5, 0.5), (0.7, 0.7, 0.8, 0.8), (0, 0, 1, 1))[None]
    labels = torch.tensor([[0, 2, 1]])
    valid = torch.tensor([[True, True, False]])  # the third is padding: ignored
    classes, targets = det.match(boxes, labels, valid, priors)
    # prior 0 overlaps box 0 exactly; prior 1 at IoU 0.2025 / 0.2975 = 0.68 >= 0.5; prior 2 overlaps box 1
    # only at IoU 0.04, but it is box 1's best anchor, so it is matched anyway
    assert classes.tolist() == [[1, 1, 3]]
    assert torch.allclose(targets[0, 0], torch.zeros(4), atol=1e-6)
    assert torch.allclose(det.decode(targets, priors)[0], boxes[0, [0, 0, 1]], atol=1e-6)
    lonely = det.match(boxes, labels, torch.tensor([[False, True, False]]), priors)[0]
    assert lonely.tolist() == [[0, 0, 3]]  # without box 0 the first two priors are background


def test_nms_is_greedy_by_score():
    a, a_twin, far = (0, 0, 0.4, 0.4), (0.02, 0.02, 0.42, 0.42), (0.6, 0.6, 1, 1)
    kept = det.nms(_boxes(a, a_twin, far)[None], torch.ones(1, 3, dtype=torch.bool))
    assert kept.tolist() == [[True, False, True]]
    # a chain: b overlaps a and c, c does not overlap a; b is suppressed by a, so it cannot suppress c
    chain = _boxes((0, 0, 0.4, 0.4), (0.1, 0, 0.5, 0.4), (0.2, 0, 0.6, 0.4))[None]
    assert det.nms(chain, torch.ones(1, 3, dtype=torch.bool), iou_threshold=0.45).tolist() == [[True, False, True]]
    # an invalid (low-scored) box neither survives nor suppresses
    assert det.nms(_boxes(a, a_twin, far)[None], torch.tensor([[False, True, True]])).tolist() == [[False, True, True]]


def _map(det_boxes, det_scores, det_labels, gt_boxes, gt_labels, num_classes=1):
    """mAP of one image's detections against its ground truth, every entry valid."""
    return det.mean_average_precision(
        _boxes(*det_boxes)[None], torch.tensor([det_scores]), torch.tensor([det_labels]),
        torch.ones(1, len(det_scores), dtype=torch.bool), _boxes(*gt_boxes)[None], torch.tensor([gt_labels]),
        torch.ones(1, len(gt_labels), dtype=torch.bool), num_classes=num_classes)


def test_average_precision_by_hand():
    a, b = (0.0, 0.0, 0.4, 0.4), (0.5, 0.5, 0.9, 0.9)
    a_shifted = (0.05, 0.0, 0.45, 0.4)  # IoU 0.8 with a
    assert _map([a, b], [0.9, 0.8], [0, 0], [a, b], [0, 0])[0] == pytest.approx(1.0)  # perfect
    assert _map([a], [0.9], [0], [a, b], [0, 0])[0] == pytest.approx(0.5)  # b missed: recall 1/2
    # a duplicate of a is a false positive: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    assert _map([a, a_shifted, b], [0.9, 0.8, 0.7], [0, 0, 0], [a, b], [0, 0])[0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # the duplicate scored below the true positives costs nothing (all-point interpolation)
    assert _map([a, b, a_shifted], [0.9, 0.8, 0.7], [0, 0, 0], [a, b], [0, 0])[0] == pytest.approx(1.0)
    # a box at IoU < 0.5 is a false positive; so is the right box with the wrong class
    assert _map([(0.2, 0.2, 0.6, 0.6)], [0.9], [0], [a], [0])[0] == pytest.approx(0.0)
    mean, per_class = _map([a, b], [0.9, 0.8], [1, 1], [a, b], [0, 1], num_classes=3)
    assert per_class[0] == 0.0 and per_class[1] == pytest.approx(0.5) and math.isnan(per_class[2])
    assert mean == pytest.approx(0.25)  # the class without ground truth is left out of the mean
    # AP directly: hits at ranks 1 and 3 of 3 objects: 1/3 * 1 + 1/3 * 2/3
    ap = det.average_precision(torch.tensor([0.7, 0.9, 0.8]), torch.tensor([True, True, False]), 3)
    assert ap == pytest.approx(1 / 3 + 1 / 3 * 2 / 3)


def test_detections_of_the_truth_score_one(small_data):
    _, boxes, labels, valid = small_data.test
    perfect = det.mean_average_precision(boxes, valid.float(), labels, valid, boxes, labels, valid)[0]
    assert perfect == pytest.approx(1.0)
    # decoded from offsets that encode the truth at its anchors, through detect's NMS
    priors = det.anchors()
    classes, targets = det.match(boxes, labels, valid, priors)
    logits = torch.nn.functional.one_hot(classes, det.NUM_CLASSES + 1).float() * 20
    mean = det.mean_average_precision(*det.detect(logits, targets), boxes, labels, valid)[0]
    assert mean > 0.99


def test_short_training_lowers_the_loss(small_data):
    recipe = get_recipe(SPEC)
    assert recipe.metric == "mAP@0.5" and recipe.higher_is_better
    result = train(recipe, "f32", steps=40, data=small_data, threads=1)
    losses = [r["loss"] for r in result.history if r["kind"] == "step"]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert result.final_metric > result.initial_metric + 0.05


def test_runs_under_f16_master_emulated(small_data):
    result = train(SPEC, "f16-master", steps=6, data=small_data, threads=1)
    assert result.execution == "emulated" and result.steps == 6
    assert math.isfinite(result.final_loss) and 0.0 <= result.final_metric <= 1.0
