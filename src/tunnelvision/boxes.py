"""Box helpers on tensors (torch): class-aware NMS and IoU. Apart from masks.py so that the light
client, which decodes masks, never imports torch."""

from __future__ import annotations

import torch


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float) -> torch.Tensor:
    """Class-aware NMS; indices kept, best score first. torchvision's kernel when installed."""
    try:
        from torchvision.ops import batched_nms as tv_batched_nms

        return tv_batched_nms(boxes.float(), scores.float(), classes, iou)  # type: ignore[no-any-return]
    except (ImportError, RuntimeError):
        return _batched_nms_torch(boxes.float(), scores.float(), classes, iou)


def _batched_nms_torch(
    boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float
) -> torch.Tensor:
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    # Offsetting boxes per class keeps classes apart: the trick torchvision uses too.
    offsets = classes.to(boxes) * (boxes.max() + 1)
    shifted = boxes + offsets[:, None]
    order = scores.argsort(descending=True)
    ious = box_iou(shifted[order], shifted[order])
    keep: list[int] = []
    suppressed = torch.zeros(order.numel(), dtype=torch.bool, device=boxes.device)
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= ious[i] > iou
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.max(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)
