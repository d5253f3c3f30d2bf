"""COCO mAP with pycocotools (the standard; not reimplemented): any backend, any COCO-format split."""
from __future__ import annotations

import contextlib
import io
import time
from typing import Dict, List, Optional

from .errors import EdetError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_results(detector, dataset, max_images: Optional[int] = None, progress: bool = True,
                 batch_size: int = 8, bar=None) -> List[Dict]:
    """Run `detector` over the split and return detections in COCO results format: a step of `bar` per image
    (a job's bar, e.g. training's), else a bar of its own when `progress`."""
    import contextlib

    from .progress import job_bar, phase

    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    step = max(1, min(batch_size, detector.runner.max_batch))
    results = []
    phase(bar, f"eval {dataset.split}")
    with (contextlib.nullcontext(bar) if bar is not None else job_bar(progress, n, f"eval {dataset.split}")) as bar:
        for start in range(0, n, step):
            idx = list(range(start, min(n, start + step)))
            for i, det in zip(idx, detector.detect([dataset.image_path(i) for i in idx])):
                for box, score, cls in zip(det.boxes, det.scores, det.classes):
                    x1, y1, x2, y2 = (float(v) for v in box)
                    results.append({"image_id": dataset.image_id(i), "category_id": dataset.category_ids[int(cls)],
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


def evaluate(detector, dataset, max_images: Optional[int] = None, progress: bool = True, bar=None) -> Dict:
    """mAP@[.5:.95], AP50, AP75, small/medium/large and recalls, plus what was evaluated (`bar`: see
    `coco_results`)."""
    t = time.perf_counter()
    results = coco_results(detector, dataset, max_images, progress, bar=bar)
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    stats = coco_map(dataset, results, [dataset.image_id(i) for i in range(n)])
    return {"stats": stats, "images": n, "detections": len(results), "split": dataset.split,
            "annotations": str(dataset.ann_file), "seconds": round(time.perf_counter() - t, 1),
            "backend": detector.runner.name, "precision": detector.runner.metadata.get("precision", "fp32")}
