"""COCO instances (RLE segmentations) built from segment results: the CLI's and the jobs' output.

A file can grow over several runs: its categories are kept (ids unchanged) and new phrases are
appended; each image may record the phrases it was asked for (`phrases`, an extra field COCO
readers ignore), so a rerun knows which images lack an answer for a new phrase."""

from __future__ import annotations

import threading
from typing import Any

from pycocotools import mask as coco_mask

from tunnelvision.schemas import RLE, Segmentation, SegmentResponse

REQUIRED = {
    "images": ("id", "file_name"),
    "categories": ("id", "name"),
    "annotations": ("id", "image_id", "category_id"),
}


def coco_problem(data: Any) -> str | None:
    """What makes `data` unusable as a COCO instances file to add to, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    for key, fields in REQUIRED.items():
        items = data.get(key, [])
        if not isinstance(items, list):
            return f"'{key}' is not a list"
        for item in items:
            if not isinstance(item, dict) or any(field not in item for field in fields):
                return f"an entry of '{key}' lacks {' or '.join(repr(f) for f in fields)}"
    return None


class Coco:
    def __init__(self, labels: list[str], existing: dict[str, Any] | None = None) -> None:
        existing = existing or {}
        self.lock = threading.Lock()
        categories: list[dict[str, Any]] = list(existing.get("categories") or [])
        self.data: dict[str, Any] = {
            "images": list(existing.get("images", [])),
            "annotations": list(existing.get("annotations", [])),
            "categories": categories,
        }
        # An image recorded without its phrases was asked for the file's categories (the only
        # ones a run could add before the file grew).
        earlier = [c["name"] for c in categories]
        for image in self.data["images"]:
            image.setdefault("phrases", list(earlier))
        for label in labels:
            if label.casefold() not in {c["name"].casefold() for c in categories}:
                category_id = 1 + max((c["id"] for c in categories), default=0)
                categories.append({"id": category_id, "name": label, "supercategory": "object"})
        self.category_ids = {c["name"].casefold(): c["id"] for c in categories}
        self.images = {image["file_name"]: image for image in self.data["images"]}
        self._next_image = 1 + max((i["id"] for i in self.data["images"]), default=0)
        self._next_annotation = 1 + max((a["id"] for a in self.data["annotations"]), default=0)

    def file_names(self) -> set[str]:
        return set(self.images)

    def asked(self, file_name: str) -> set[str] | None:
        """The phrases (case-folded) `file_name` was answered for; None when it is not here."""
        image = self.images.get(file_name)
        return None if image is None else {str(p).casefold() for p in image.get("phrases", [])}

    def add(self, file_name: str, result: SegmentResponse, phrases: list[str] | None = None) -> None:
        """Record `result`, asked for `phrases`. An image already here keeps its id; its
        annotations for these phrases (all of them when `phrases` is None) are replaced."""
        with self.lock:
            image = self._image(file_name, result, phrases)
            if phrases is not None:
                known = image.get("phrases", [])
                seen = {str(p).casefold() for p in known}
                image["phrases"] = [*known, *(p for p in phrases if p.casefold() not in seen)]
            for detection in result.detections:
                if isinstance(detection.mask, RLE) and self._category(detection.label) is not None:
                    self.data["annotations"].append(self._annotation(image["id"], detection))

    def _image(self, file_name: str, result: SegmentResponse, phrases: list[str] | None) -> dict[str, Any]:
        """The image's record (sized by this answer), made or cleared of what `result` replaces."""
        image = self.images.get(file_name)
        if image is None:
            image = {"id": self._next_image, "file_name": file_name}
            self._next_image += 1
            self.data["images"].append(image)
            self.images[file_name] = image
        else:
            replaced = None if phrases is None else {self._category(p) for p in phrases}
            self._drop_annotations(image["id"], replaced)
        image.update(width=result.image.width, height=result.image.height)
        return image

    def _drop_annotations(self, image_id: int, category_ids: set[int | None] | None) -> None:
        """Forget the image's annotations in `category_ids` (None: all of them)."""
        self.data["annotations"] = [
            a
            for a in self.data["annotations"]
            if a["image_id"] != image_id
            or (category_ids is not None and a["category_id"] not in category_ids)
        ]

    def _category(self, label: str | None) -> int | None:
        return None if label is None else self.category_ids.get(label.casefold())

    def _annotation(self, image_id: int, detection: Segmentation) -> dict[str, Any]:
        assert isinstance(detection.mask, RLE) and detection.label is not None
        mask = detection.mask
        x1, y1, x2, y2 = detection.box
        annotation_id, self._next_annotation = self._next_annotation, self._next_annotation + 1
        return {
            "id": annotation_id,
            "image_id": image_id,
            "category_id": self._category(detection.label),
            "segmentation": {"size": mask.size, "counts": mask.counts},
            "area": float(coco_mask.area({"size": mask.size, "counts": mask.counts.encode()})),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "iscrowd": 0,
            "score": detection.score,
        }
