"""COCO instances (RLE segmentations) built from segment results: the CLI's and the jobs' output."""

from __future__ import annotations

import threading
from typing import Any

from pycocotools import mask as coco_mask

from tunnelvision.schemas import RLE, Segmentation, SegmentResponse


class Coco:
    def __init__(self, labels: list[str], existing: dict[str, Any] | None = None) -> None:
        existing = existing or {}
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {
            "images": existing.get("images", []),
            "annotations": existing.get("annotations", []),
            "categories": existing.get("categories")
            or [{"id": i, "name": label, "supercategory": "object"} for i, label in enumerate(labels, 1)],
        }
        self.category_ids = {c["name"]: c["id"] for c in self.data["categories"]}

    def file_names(self) -> set[str]:
        return {image["file_name"] for image in self.data["images"]}

    def add(self, file_name: str, result: SegmentResponse) -> None:
        with self.lock:
            image_id = 1 + max((i["id"] for i in self.data["images"]), default=0)
            self.data["images"].append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": result.image.width,
                    "height": result.image.height,
                }
            )
            for detection in result.detections:
                if isinstance(detection.mask, RLE) and detection.label in self.category_ids:
                    self.data["annotations"].append(self._annotation(image_id, detection))

    def _annotation(self, image_id: int, detection: Segmentation) -> dict[str, Any]:
        assert isinstance(detection.mask, RLE) and detection.label is not None
        mask = detection.mask
        x1, y1, x2, y2 = detection.box
        return {
            "id": 1 + len(self.data["annotations"]),
            "image_id": image_id,
            "category_id": self.category_ids[detection.label],
            "segmentation": {"size": mask.size, "counts": mask.counts},
            "area": float(coco_mask.area({"size": mask.size, "counts": mask.counts.encode()})),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "iscrowd": 0,
            "score": detection.score,
        }
