"""Fine-tuning / training from scratch: focal loss + Huber box loss, flip and scale-jitter augmentation.

Good enough to make a real model on CPU (the bundled shapes model), not to compete with detectron2."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .anchors import anchors_for
from .box_coding import encode_boxes
from .box_ops import box_area, box_iou
from .configs import MEAN_RGB
from .errors import EdetError
from .log import logger

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 1.5  # effdet / automl
HUBER_DELTA, BOX_LOSS_WEIGHT = 0.1, 50.0
POS_IOU, NEG_IOU = 0.5, 0.4


# --- targets -----------------------------------------------------------------------------------------------

def assign_targets(anchors: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per anchor: class label (>= 0 positive, -1 background, -2 ignored) and box regression target.
    IoU >= 0.5 is positive, < 0.4 background; each object also claims its best anchor."""
    labels = torch.full((anchors.shape[0],), -1, dtype=torch.long)
    codes = torch.zeros(anchors.shape[0], 4)
    if boxes.numel() == 0:
        return labels, codes
    iou = torch.from_numpy(box_iou(anchors.numpy(), boxes.numpy(), np.float32))  # [A, G]
    best_iou, best_gt = iou.max(dim=1)
    labels[(best_iou >= NEG_IOU) & (best_iou < POS_IOU)] = -2
    forced = iou.argmax(dim=0)  # every object gets at least its best anchor
    best_gt[forced] = torch.arange(boxes.shape[0])
    best_iou[forced] = 1.0
    pos = best_iou >= POS_IOU
    labels[pos] = classes[best_gt[pos]]
    codes[pos] = encode_boxes(boxes[best_gt[pos]], anchors[pos])
    return labels, codes


def detection_loss(logits: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Focal loss over non-ignored anchors and Huber loss over positives, normalised by the positive count."""
    num_classes = logits.shape[-1]
    valid = labels > -2
    pos = labels >= 0
    num_pos = pos.sum().clamp(min=1).float()
    onehot = F.one_hot(labels.clamp(min=0), num_classes).float() * pos[..., None]
    lg, oh = logits[valid], onehot[valid]
    p = torch.sigmoid(lg)
    ce = F.binary_cross_entropy_with_logits(lg, oh, reduction="none")
    p_t = p * oh + (1 - p) * (1 - oh)
    alpha_t = FOCAL_ALPHA * oh + (1 - FOCAL_ALPHA) * (1 - oh)
    cls_loss = (alpha_t * (1 - p_t) ** FOCAL_GAMMA * ce).sum() / num_pos
    box_loss = F.huber_loss(codes[pos], targets[pos], delta=HUBER_DELTA, reduction="sum") / (num_pos * 4)
    return cls_loss, BOX_LOSS_WEIGHT * box_loss


# --- augmentation ------------------------------------------------------------------------------------------

def augment(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, size: int, rng: np.random.Generator,
            jitter: Tuple[float, float] = (0.8, 1.25), fill: Sequence[float] = MEAN_RGB
            ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal flip, then standard scale jittering: resize to size/max(h, w) times U(0.8, 1.25), random
    crop (or pad bottom/right with the variant's mean colour `fill`, as preprocess pads) to size x size.
    Boxes that lose most of their area go."""
    from PIL import Image

    h, w = image.shape[:2]
    boxes = boxes.copy()
    if rng.random() < 0.5:
        image = image[:, ::-1]
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    scale = size / max(h, w) * rng.uniform(*jitter)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((nw, nh), Image.BILINEAR))
    oy = int(rng.integers(0, nh - size + 1)) if nh > size else 0
    ox = int(rng.integers(0, nw - size + 1)) if nw > size else 0
    out = np.empty((size, size, 3), np.uint8)
    out[...] = np.round(fill).astype(np.uint8)
    crop = resized[oy:oy + size, ox:ox + size]
    out[:crop.shape[0], :crop.shape[1]] = crop
    b = boxes * scale - np.array([ox, oy, ox, oy], np.float32)
    c = np.clip(b, 0, [crop.shape[1], crop.shape[0], crop.shape[1], crop.shape[0]])
    keep = (box_area(c) >= 0.4 * np.maximum(box_area(b), 1e-6)) & (c[:, 2] - c[:, 0] >= 2) & (c[:, 3] - c[:, 1] >= 2)
    return out, c[keep].astype(np.float32), classes[keep]


# --- loop --------------------------------------------------------------------------------------------------

def _diverged(epoch: int, why: str, lr: float) -> EdetError:
    return EdetError(f"training diverged in epoch {epoch + 1} ({why}): lower --lr (it is {lr:g})")


def train(model_name: str, data_dir: str, out: str, *, epochs: int = 10, batch_size: int = 16, lr: float = 2e-3,
          image_size: int = 256, weights: Optional[str] = None, seed: int = 0, threads: Optional[int] = None,
          max_minutes: Optional[float] = None, eval_images: Optional[int] = None, progress: bool = True) -> Dict:
    """Train `model_name` on the COCO-format dataset `data_dir` (splits train / val). Writes the best
    checkpoint (by val mAP) to `out` with its metadata and returns the history."""
    from .backends.pytorch import TorchRunner
    from .data import CocoDataset
    from .detector import Detector
    from .eval import evaluate
    from .export.graph import CandidateGraph
    from .io import signals_deferred, write_json
    from .model import create_model, save_weights
    from .progress import job_bar

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_set, val_set = CocoDataset(data_dir, "train"), CocoDataset(data_dir, "val")
    num_classes = len(train_set.class_names)
    model = create_model(model_name, num_classes=num_classes, image_size=image_size)
    if weights:
        from .model.weights import load_weights
        load_weights(model, weights, new_class_head=True)  # fine-tuning a COCO model on other classes
    for m in model.modules():  # faster-moving batch-norm statistics for short schedules
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    model = model.to(memory_format=torch.channels_last)  # ~30% faster convolutions on CPU
    graph = CandidateGraph(model)
    anchors = torch.from_numpy(anchors_for(model.config))
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = min(300, total_steps // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, total_steps)))))
    meta = {"class_names": train_set.class_names, "trained_on": str(data_dir), "epochs": epochs,
            "image_size": image_size}
    history: List[Dict] = []
    best = -1.0
    start = time.perf_counter()
    out_path = Path(out)
    eval_n = len(val_set) if eval_images is None else min(eval_images, len(val_set))
    # One bar over the whole run: every training step and every evaluated image of every epoch.
    bar = job_bar(progress, epochs * (steps_per_epoch + eval_n), f"train {model_name}")
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(train_set))
        totals = np.zeros(2)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            images, labels, targets = [], [], []
            for i in idx:
                boxes, classes = train_set.target(i)
                img, boxes, classes = augment(train_set.load_image(i), boxes, classes, image_size, rng,
                                              fill=model.config.mean)
                lab, tgt = assign_targets(anchors, torch.from_numpy(boxes), torch.from_numpy(classes))
                images.append(img)
                labels.append(lab)
                targets.append(tgt)
            logits, codes = graph.head_outputs(torch.from_numpy(np.stack(images)))
            cls_loss, box_loss = detection_loss(logits, codes, torch.stack(labels), torch.stack(targets))
            loss = cls_loss + box_loss
            if not (torch.isfinite(loss) and torch.isfinite(logits).all() and torch.isfinite(codes).all()):
                # Else validation's NMS refused the NaN scores as if the input were bad.
                raise _diverged(epoch, f"loss {loss.item()}", lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            totals += [cls_loss.item(), box_loss.item()]
            bar.set_postfix_str(f"epoch {epoch + 1}/{epochs}, cls {cls_loss.item():.3f}, box {box_loss.item():.3f}")
            bar.update(1)
        model.eval()
        with torch.no_grad():  # a model that diverged may compute finite numbers in training mode only (its BN)
            finite = all(bool(torch.isfinite(t).all()) for t in graph.head_outputs(torch.from_numpy(np.stack(images))))
        if not finite:
            raise _diverged(epoch, "the model's outputs are not finite", lr)
        detector = Detector(TorchRunner(model_name, model=model, class_names=train_set.class_names))
        report = evaluate(detector, val_set, max_images=eval_images, bar=bar)
        elapsed = (time.perf_counter() - start) / 60
        row = {"epoch": epoch + 1, "cls_loss": round(totals[0] / steps_per_epoch, 4),
               "box_loss": round(totals[1] / steps_per_epoch, 4), "val_mAP": report["stats"]["AP"],
               "val_AP50": report["stats"]["AP50"], "minutes": round(elapsed, 1), "lr": opt.param_groups[0]["lr"]}
        history.append(row)
        logger.info("epoch %d: %s", epoch + 1, row)
        # The checkpoint and its history land together: a Ctrl-C or SIGTERM meanwhile waits for both, so the
        # history never describes another epoch's checkpoint.
        with signals_deferred():
            if report["stats"]["AP"] > best:
                best = report["stats"]["AP"]
                save_weights(model, out_path, {**meta, "val_mAP": best, "val_stats": report["stats"],
                                               "epoch": epoch + 1})
            write_json(out_path.with_suffix(".history.json"), history)
        if max_minutes and elapsed * (epoch + 2) / (epoch + 1) > max_minutes:
            logger.info("stopping: the next epoch would exceed %.0f minutes", max_minutes)
            break
    bar.close()
    if best < 0:
        raise EdetError("training ran no epoch")
    return {"best_val_mAP": best, "history": history, "checkpoint": str(out_path)}
