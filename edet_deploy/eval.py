"""COCO mAP with pycocotools (the standard; not reimplemented): any backend, any COCO-format split."""
from __future__ import annotations

import contextlib
import io
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from .errors import EdetError, first_few
from .log import logger

if TYPE_CHECKING:
    from .data import CocoDataset

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def category_map(class_names: Sequence[str], num_classes: int, dataset: "CocoDataset",
                 by_index: bool = False) -> List[int]:
    """The dataset category id of each model class. By name when the model's names are known: every one must
    name exactly one category (a dataset labelled otherwise scores by index only when asked, `by_index`). A
    model class the dataset lacks is refused rather than dropped: a cut or relabelled file would otherwise score
    as if it were the model's task. A category the model does not detect stays in the score, as missed. By
    index (no names, or `by_index`): class k is the k-th category by id."""
    where = dataset.ann_file
    if class_names and not by_index:
        ids: Dict[str, List[int]] = {}
        for cid, name in zip(dataset.category_ids, dataset.class_names):
            ids.setdefault(name, []).append(cid)
        missing = [n for n in class_names if n not in ids]
        if len(missing) == len(class_names):
            raise EdetError(f"the model's classes ({first_few(list(class_names))}) share no name with the "
                            f"categories of {where} ({first_few(dataset.class_names)}) (`eval --match-by-index` "
                            f"pairs them by position)")
        if missing:
            raise EdetError(f"{where} has no category named {first_few(missing)} of the model's classes "
                            f"({first_few(list(class_names))}): add them as categories to score the others (without "
                            f"annotations they stay out of pycocotools' means)")
        twice = [n for n in class_names if len(ids[n]) > 1]
        if twice:
            raise EdetError(f"{where} has several categories named {first_few(twice)}: which one a class means "
                            f"is ambiguous")
        known = set(class_names)
        unknown = [n for n in dataset.class_names if n not in known]
        if unknown:
            logger.warning("the model detects no %s: those categories of %s score as missed", first_few(unknown),
                           where)
        return [ids[n][0] for n in class_names]
    if num_classes > len(dataset.category_ids):
        raise EdetError(f"the model detects {num_classes} classes but {where} has {len(dataset.category_ids)} "
                        f"categories: classes are paired by position, so each needs one")
    return dataset.category_ids[:num_classes]


def coco_results(detector, dataset, max_images: Optional[int] = None, progress: bool = True,
                 batch_size: int = 8, bar=None, match_by_index: bool = False) -> List[Dict]:
    """Run `detector` over the split and return detections in COCO results format: a step of `bar` per image
    (a job's bar, e.g. training's), else a bar of its own when `progress`. The images and the class pairing
    (`category_map`) are checked first, so bad input costs no inference."""
    import contextlib

    from .progress import job_bar, phase

    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    meta = detector.runner.metadata
    names = list(detector.class_names)
    categories = category_map(names, int(meta.get("num_classes") or len(names)), dataset, match_by_index)
    dataset.check_images(n)
    step = max(1, min(batch_size, detector.runner.max_batch))
    results = []
    phase(bar, f"eval {dataset.split}")
    with (contextlib.nullcontext(bar) if bar is not None else job_bar(progress, n, f"eval {dataset.split}")) as bar:
        for start in range(0, n, step):
            idx = list(range(start, min(n, start + step)))
            for i, det in zip(idx, detector.detect([dataset.image_path(i) for i in idx])):
                for box, score, cls in zip(det.boxes, det.scores, det.classes):
                    x1, y1, x2, y2 = (float(v) for v in box)
                    results.append({"image_id": dataset.image_id(i), "category_id": categories[int(cls)],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
            bar.update(len(idx))
    return results


def coco_map(dataset, results: List[Dict], image_ids: Optional[List[int]] = None) -> Dict[str, float]:
    """pycocotools COCOeval (bbox) of `results` against the split's annotation file."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise EdetError("evaluation needs pycocotools: pip install 'edet-deploy[eval]'") from None
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()  # the dataset's checked, normalised annotations, not the file as it lies
        gt.dataset = dataset.coco_ground_truth()
        gt.createIndex()
        if not results:
            return {k: 0.0 for k in STAT_NAMES}
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: round(float(v), 5) for k, v in zip(STAT_NAMES, ev.stats)}


def evaluate(detector, dataset, max_images: Optional[int] = None, progress: bool = True, bar=None,
             match_by_index: bool = False) -> Dict:
    """mAP@[.5:.95], AP50, AP75, small/medium/large and recalls, plus what was evaluated (`bar`,
    `match_by_index`: see `coco_results`). `targets` counts the ground-truth boxes scored: with none, the
    statistics are pycocotools' -1 (nothing to score), which a warning says."""
    t = time.perf_counter()
    results = coco_results(detector, dataset, max_images, progress, bar=bar, match_by_index=match_by_index)
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    stats = coco_map(dataset, results, [dataset.image_id(i) for i in range(n)])
    targets = sum(len(dataset.target(i)[1]) for i in range(n))
    if not targets:
        logger.warning("nothing to score: the %d evaluated image(s) of %s have no annotations", n, dataset.ann_file)
    return {"stats": stats, "images": n, "detections": len(results), "targets": targets, "split": dataset.split,
            "annotations": str(dataset.ann_file), "seconds": round(time.perf_counter() - t, 1),
            "backend": detector.runner.name, "precision": detector.runner.metadata.get("precision", "fp32")}
