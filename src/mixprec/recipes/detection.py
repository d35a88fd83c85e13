"""`detection`: a small single-shot multibox detector (SSD) on generated scenes; mAP@0.5.

The paper's object-detection experiment in miniature. Micikevicius et al. trained Multibox SSD (a VGG-D
backbone) on PASCAL VOC with FP16 activations and gradients and FP32 master weights; without loss
scaling the activation gradients that mattered, in [2^-27, 2^-24), flushed to zero and the run diverged,
while a scale of 8 matched FP32. This recipe has SSD's ingredients at a size one CPU core trains in a
minute or two:

* data: noisy single-channel 32x32 scenes, each with 1-3 non-overlapping shapes of three classes
  (filled rectangles, ellipses, crosses) of random position, size and aspect, drawn from a fixed seed;
  ground-truth boxes (x1, y1, x2, y2 in [0, 1]) and labels padded to `MAX_OBJECTS` with a validity mask;
* model: a BatchNorm conv backbone with two feature maps (8x8 and 4x4) and a multibox head: for each of
  `ANCHORS_PER_CELL` default boxes per cell, class logits (background + 3) and offsets in SSD's
  (cx, cy, w, h) encoding with variances (0.1, 0.2);
* loss: SSD's matching (each ground truth to its best anchor, and every anchor with IoU >= 0.5), softmax
  cross-entropy with 3:1 hard negative mining plus smooth-L1 on the matched anchors' offsets, divided by
  the number of matches; computed in FP32 from the model's outputs;
* metric: VOC-style mAP@0.5 on the test scenes (per-class AP, all-point interpolation, averaged over
  the classes) after decoding the boxes and per-class non-maximum suppression.

Measured (CPU, 1 thread, seed 0, defaults): FP32 reaches mAP@0.5 0.886 in 1500 steps; f16-master
(emulated) 0.888; f16-master-noscale 0.881, no stall (seed 1: FP32 0.902, no-scale 0.900). Unlike the
paper's VGG-sized SSD, only ~0.5% of this small detector's activation-gradient values fall below 2^-24
(most in [2^-27, 2^-24)), though ~37% are FP16 subnormals (median ~2^-17): precision is lost, training
is not. `underflow` is the recipe built to show the flush to zero.

Example:
    >>> data = make_data(train_rows=8, test_rows=4)
    >>> images, boxes, labels, valid = data.train
    >>> tuple(images.shape), tuple(boxes.shape), recipe().metric
    ((8, 1, 32, 32), (8, 3, 4), 'mAP@0.5')
    >>> logits, offsets = TinySSD()(images)
    >>> tuple(logits.shape), tuple(offsets.shape)
    ((8, 320, 4), (8, 320, 4))
    >>> multibox_loss(logits, offsets, boxes, labels, valid).item() > 0
    True
"""

from __future__ import annotations

import functools
import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Data, Recipe

IMAGE_SIZE = 32
CLASS_NAMES = ("rectangle", "ellipse", "cross")
NUM_CLASSES = len(CLASS_NAMES)  # the logits have one more, background, at index 0
MAX_OBJECTS = 3  # objects per scene: 1..MAX_OBJECTS, padded to MAX_OBJECTS
SIZE_RANGE = (5.0, 14.0)  # a box's width and height in pixels, drawn independently
NOISE = 0.35  # std of the Gaussian pixel noise
INTENSITY = (0.3, 1.0)  # a shape's brightness, drawn uniformly (the background is 0)
DATA_SEED = 1234  # the scenes are the task: the same for every training seed
#: SSD's default boxes: per feature map (cells per side, scale s_k, the next scale s_k+1); per cell boxes of
#: aspect 1 at s_k and at sqrt(s_k s_k+1), and of aspects 2 and 1/2 at s_k
FEATURE_MAPS = ((8, 0.2, 0.35), (4, 0.35, 0.55))
ASPECTS = (2.0, 0.5)
ANCHORS_PER_CELL = 2 + len(ASPECTS)
VARIANCES = (0.1, 0.2)  # SSD's: centre offsets / 0.1, log size ratios / 0.2
MATCH_IOU = 0.5
NEG_POS_RATIO = 3
TOP_K = 20  # boxes per class and image kept before NMS
SCORE_THRESHOLD = 0.05
NMS_IOU = 0.45


# ----- data -----------------------------------------------------------------------------------------------


def _place(rng: random.Random, count: int) -> list[tuple[int, float, float, float, float]]:
    """Up to ``count`` objects (class, x1, y1, x2, y2 in pixels) whose boxes keep a pixel apart."""
    objects: list[tuple[int, float, float, float, float]] = []
    for _ in range(count):
        for _attempt in range(50):
            w, h = rng.uniform(*SIZE_RANGE), rng.uniform(*SIZE_RANGE)
            x1, y1 = rng.uniform(0, IMAGE_SIZE - w), rng.uniform(0, IMAGE_SIZE - h)
            box = (x1, y1, x1 + w, y1 + h)
            if all(box[0] > o[3] + 1 or o[1] > box[2] + 1 or box[1] > o[4] + 1 or o[2] > box[3] + 1
                   for o in objects):
                objects.append((rng.randrange(NUM_CLASSES), *box))
                break
    return objects


def render(boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scenes [N, 1, S, S] with each valid object's shape filling its pixel box (boxes [N, K, 4]), plus noise."""
    centers = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    x1, y1, x2, y2 = (boxes[..., i, None, None] for i in range(4))  # [N, K, 1, 1]
    dx = (centers.view(1, 1, 1, -1) - (x1 + x2) / 2).abs() / ((x2 - x1) / 2)  # 0 at the centre, 1 at the edge
    dy = (centers.view(1, 1, -1, 1) - (y1 + y2) / 2).abs() / ((y2 - y1) / 2)
    rectangle = (dx <= 1) & (dy <= 1)
    shapes = torch.stack([rectangle, dx**2 + dy**2 <= 1, rectangle & ((dx <= 1 / 3) | (dy <= 1 / 3))], dim=2)
    index = labels.clamp(min=0)[:, :, None, None, None].expand(-1, -1, 1, IMAGE_SIZE, IMAGE_SIZE)
    masks = shapes.gather(2, index).squeeze(2) & valid[:, :, None, None]  # [N, K, S, S]
    intensity = INTENSITY[0] + (INTENSITY[1] - INTENSITY[0]) * torch.rand(*labels.shape, 1, 1, generator=generator)
    images = (masks * intensity).amax(dim=1) + NOISE * torch.randn(len(boxes), IMAGE_SIZE, IMAGE_SIZE,
                                                                   generator=generator)
    return images.unsqueeze(1)


def _scenes(rows: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``rows`` scenes from ``seed``: images [N, 1, S, S], boxes [N, K, 4] in [0, 1], labels [N, K], valid [N, K]."""
    rng = random.Random(seed)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(rows, MAX_OBJECTS, 1)  # padding: a harmless box
    labels = torch.full((rows, MAX_OBJECTS), -1, dtype=torch.long)
    for row in range(rows):
        for slot, (label, *box) in enumerate(_place(rng, rng.randint(1, MAX_OBJECTS))):
            labels[row, slot] = label
            boxes[row, slot] = torch.tensor(box)
    valid = labels >= 0
    images = render(boxes, labels, valid, torch.Generator().manual_seed(seed))
    return images, boxes / IMAGE_SIZE, labels.clamp(min=0), valid


def make_data(train_rows: int = 8000, test_rows: int = 500) -> Data:
    """Scenes from `DATA_SEED` (train) and `DATA_SEED` + 1 (test): (images, boxes, labels, valid) each."""
    return Data(
        train=_scenes(train_rows, DATA_SEED),
        test=_scenes(test_rows, DATA_SEED + 1),
        info={"generator": "seeded shapes (rectangle, ellipse, cross) with noise", "data_seed": DATA_SEED,
              "image_size": IMAGE_SIZE, "classes": list(CLASS_NAMES), "noise": NOISE, "train_rows": train_rows,
              "test_rows": test_rows},
    )


# ----- boxes, anchors and matching --------------------------------------------------------------------------


def corners(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
    return torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of corner boxes ``a`` [..., 4] and ``b`` [..., 4], broadcast: [...]."""
    inter = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-12)


@functools.lru_cache(maxsize=8)
def anchors(device: str = "cpu") -> torch.Tensor:
    """SSD's default boxes [A, 4] as (cx, cy, w, h) in [0, 1], in the head's order: map, row, column, box."""
    per_map = []
    for cells, scale, next_scale in FEATURE_MAPS:
        mid = math.sqrt(scale * next_scale)
        shapes = torch.tensor([(scale, scale), (mid, mid), *((scale * math.sqrt(a), scale / math.sqrt(a))
                                                              for a in ASPECTS)])
        steps = (torch.arange(cells, dtype=torch.float32) + 0.5) / cells
        cy, cx = torch.meshgrid(steps, steps, indexing="ij")
        centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(shapes), 2)
        per_map.append(torch.cat([centres, shapes.expand(cells * cells, -1, -1)], dim=-1).reshape(-1, 4))
    return torch.cat(per_map).to(device)


def encode(boxes: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Corner boxes [..., A, 4] as SSD offsets from ``priors`` [A, 4] (cx, cy, w, h), with `VARIANCES`."""
    centre, size = (boxes[..., :2] + boxes[..., 2:]) / 2, (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-6)
    return torch.cat([(centre - priors[:, :2]) / (VARIANCES[0] * priors[:, 2:]),
                      torch.log(size / priors[:, 2:]) / VARIANCES[1]], dim=-1)


def decode(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """SSD offsets [..., A, 4] from ``priors`` [A, 4] -> corner boxes [..., A, 4] (the inverse of `encode`)."""
    centre = priors[:, :2] + offsets[..., :2] * VARIANCES[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp((offsets[..., 2:] * VARIANCES[1]).clamp(max=8.0))
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def match(boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
          priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD's matching of ground truth (boxes [B, G, 4], labels and valid [B, G]) to ``priors`` [A, 4].

    Each valid ground truth takes its best-overlapping anchor, and every other anchor takes the ground
    truth it overlaps most if that IoU >= `MATCH_IOU`. Returns each anchor's class [B, A] (0: background,
    else label + 1) and its regression target [B, A, 4] (meaningful where the class is not background).
    """
    iou = box_iou(boxes[:, :, None], corners(priors)[None, None]).masked_fill(~valid[..., None], -1.0)  # [B, G, A]
    best_iou, best_truth = iou.max(dim=1)
    image, truth = valid.nonzero(as_tuple=True)
    anchor = iou.argmax(dim=2)[image, truth]  # each ground truth's best anchor is its, whatever the IoU
    best_truth[image, anchor] = truth
    best_iou[image, anchor] = 2.0
    matched = torch.gather(boxes, 1, best_truth[..., None].expand(-1, -1, 4))
    classes = torch.where(best_iou >= MATCH_IOU, torch.gather(labels, 1, best_truth) + 1, 0)
    return classes, encode(matched, priors)


def multibox_loss(logits: torch.Tensor, offsets: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                  valid: torch.Tensor) -> torch.Tensor:
    """SSD's loss in FP32: (cross-entropy on matches and 3:1 hard negatives + smooth-L1 on matches) / matches."""
    logits, offsets = logits.float(), offsets.float()
    priors = anchors(str(logits.device))
    with torch.no_grad():
        classes, targets = match(boxes, labels, valid, priors)
    positive = classes > 0
    ce = F.cross_entropy(logits.flatten(0, 1), classes.flatten(), reduction="none").view_as(classes)
    with torch.no_grad():  # hard negatives: the background anchors the model finds hardest, 3 per match
        rank = ce.masked_fill(positive, -math.inf).argsort(dim=1, descending=True).argsort(dim=1)
        num_pos = positive.sum(dim=1, keepdim=True)
        negative = rank < torch.minimum(NEG_POS_RATIO * num_pos, classes.shape[1] - num_pos)
    regression = F.smooth_l1_loss(offsets[positive], targets[positive], reduction="sum")
    return (ce[positive | negative].sum() + regression) / positive.sum().clamp(min=1)


# ----- model ------------------------------------------------------------------------------------------------


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class TinySSD(nn.Module):
    """32x32 -> feature maps 8x8 and 4x4, each with a 3x3 multibox head: (logits [B, A, 4], offsets [B, A, 4])."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            _block(1, width // 2), nn.MaxPool2d(2), _block(width // 2, width), nn.MaxPool2d(2),
            _block(width, 2 * width), _block(2 * width, 2 * width),
        )
        self.extra = nn.Sequential(nn.MaxPool2d(2), _block(2 * width, 2 * width), _block(2 * width, 2 * width))
        self.heads = nn.ModuleList(nn.Conv2d(2 * width, ANCHORS_PER_CELL * (NUM_CLASSES + 5), 3, padding=1)
                                   for _ in FEATURE_MAPS)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.backbone(images)
        maps = (first, self.extra(first))
        out = torch.cat([head(f).permute(0, 2, 3, 1).reshape(len(images), -1, NUM_CLASSES + 5)
                         for head, f in zip(self.heads, maps, strict=True)], dim=1)
        return out[..., : NUM_CLASSES + 1], out[..., NUM_CLASSES + 1 :]


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    images, boxes, labels, valid = batch
    logits, offsets = model(images)
    return multibox_loss(logits, offsets, boxes, labels, valid)


# ----- detection and mAP ------------------------------------------------------------------------------------


def nms(boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float = NMS_IOU) -> torch.Tensor:
    """Greedy non-maximum suppression in each row of score-sorted corner boxes [R, K, 4]: kept [R, K].

    Only ``valid`` boxes are kept, and only kept boxes suppress the lower-scored ones they overlap.
    """
    k = boxes.shape[1]
    later = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(1)
    overlaps = (box_iou(boxes[:, :, None], boxes[:, None]) > iou_threshold) & later  # [R, K, K]
    keep = valid.clone()
    for i in range(k):  # box i's fate is settled once the boxes before it are
        keep &= ~(keep[:, i : i + 1] & overlaps[:, i])
    return keep


def detect(logits: torch.Tensor, offsets: torch.Tensor,
           top_k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoded detections per image after per-class NMS: boxes [N, D, 4], scores, labels and kept [N, D]."""
    scores = logits.float().softmax(dim=-1)[..., 1:].transpose(1, 2)  # [N, C, A]
    boxes = decode(offsets.float(), anchors(str(logits.device))).clamp(0.0, 1.0)  # [N, A, 4]
    top, index = scores.topk(min(top_k, scores.shape[2]), dim=2)  # sorted: [N, C, K]
    n, c, k = top.shape
    candidates = torch.gather(boxes[:, None].expand(-1, c, -1, -1), 2, index[..., None].expand(-1, -1, -1, 4))
    keep = nms(candidates.reshape(n * c, k, 4), (top > SCORE_THRESHOLD).reshape(n * c, k)).view(n, c, k)
    labels = torch.arange(c, device=top.device).view(1, c, 1).expand(n, c, k)
    return candidates.reshape(n, c * k, 4), top.reshape(n, c * k), labels.reshape(n, c * k), keep.reshape(n, c * k)


def average_precision(scores: torch.Tensor, true_positive: torch.Tensor, num_truths: int) -> float:
    """VOC's AP with all-point interpolation of detections (``scores``, ``true_positive`` [D]); NaN if no truths."""
    if num_truths == 0:
        return math.nan
    hits = true_positive[scores.argsort(descending=True, stable=True)].double()
    tp, fp = hits.cumsum(0), (1 - hits).cumsum(0)
    recall = torch.cat([hits.new_zeros(1), tp / num_truths, hits.new_ones(1)])
    precision = torch.cat([hits.new_zeros(1), tp / (tp + fp).clamp(min=1), hits.new_zeros(1)])
    envelope = precision.flip(0).cummax(0).values.flip(0)  # the best precision at any recall at least this
    return float(((recall[1:] - recall[:-1]) * envelope[1:]).sum())


def mean_average_precision(det_boxes: torch.Tensor, det_scores: torch.Tensor, det_labels: torch.Tensor,
                           det_valid: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                           gt_valid: torch.Tensor, num_classes: int = NUM_CLASSES,
                           iou_threshold: float = 0.5) -> tuple[float, list[float]]:
    """VOC mAP of padded detections ([N, D, ...]) against padded ground truth ([N, G, ...]); per-class APs too.

    As the VOC devkit: each class's detections in descending score are matched to the ground truth of
    their image and class they overlap most; a true positive if that IoU >= ``iou_threshold`` and the
    ground truth is not yet taken (a duplicate is a false positive). Classes with no ground truth are
    left out of the mean (their AP is NaN).
    """
    aps = []
    for c in range(num_classes):
        image, slot = (det_valid & (det_labels == c)).nonzero(as_tuple=True)
        truths = gt_valid & (gt_labels == c)
        scores = det_scores[image, slot].float()
        order = scores.argsort(descending=True, stable=True)
        image, slot, scores = image[order], slot[order], scores[order]
        iou = box_iou(det_boxes[image, slot][:, None].float(), gt_boxes[image].float())
        iou = iou.masked_fill(~truths[image], -1.0)  # [D, G]: only this class's ground truth in the same image
        best_iou, best = iou.max(dim=1) if len(iou) else (iou.new_zeros(0), image)
        taken: set[tuple[int, int]] = set()
        hits = []
        for i, g, hit in zip(image.tolist(), best.tolist(), (best_iou >= iou_threshold).tolist(), strict=True):
            hits.append(hit and (i, g) not in taken)
            if hit:
                taken.add((i, g))
        aps.append(average_precision(scores, torch.tensor(hits, dtype=torch.bool), int(truths.sum())))
    present = [ap for ap in aps if not math.isnan(ap)]
    return (sum(present) / len(present) if present else math.nan), aps


def evaluate(model: nn.Module, data: Data) -> float:
    images, boxes, labels, valid = data.test
    logits, offsets = model(images)
    return mean_average_precision(*detect(logits, offsets), boxes, labels, valid)[0]


def recipe() -> Recipe:
    return Recipe(
        name="detection",
        description="single-shot multibox detector (SSD) on generated 32x32 scenes of 3 shape classes; mAP@0.5",
        make_data=make_data,
        make_model=TinySSD,
        loss=loss,
        evaluate=evaluate,
        metric="mAP@0.5",
        higher_is_better=True,
        steps=1500,
        batch_size=32,
        lr=3e-3,
        optimizer="adam",
        max_grad_norm=5.0,
        warmup_steps=50,
        eval_every=250,
    )
