"""The seed's design, faithfully, for side-by-side runs: one FastAPI app, models global, one
`asyncio.Semaphore(1)` around the whole pipeline (decode, models, masks) via `run_in_executor`.
Same backends and the same output schema as tunnelvision.

    python bench/seed_server.py --port 8001 --backend simulated
    python bench/seed_server.py --port 8001 --detector DIR --segmenter DIR
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import uvicorn
from fastapi import FastAPI, File, Form, UploadFile

from tunnelvision.engine.backend import Backend
from tunnelvision.imaging import decode_image
from tunnelvision.schemas import ImageInfo, Segmentation, SegmentParams, SegmentResponse

app = FastAPI()
BACKEND: Backend | None = None
LOCK = asyncio.Semaphore(1)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/segment")
async def segment(
    image: UploadFile = File(...),  # noqa: B008 - FastAPI's idiom
    prompt: str = Form(...),
    box_threshold: float = Form(0.35),
    max_detections: int = Form(100),
) -> dict[str, Any]:
    data = await image.read()
    params = SegmentParams(prompt=prompt, box_threshold=box_threshold, max_detections=max_detections)
    async with LOCK:
        return await asyncio.get_running_loop().run_in_executor(None, pipeline, data, params)


def pipeline(data: bytes, params: SegmentParams) -> dict[str, Any]:
    assert BACKEND is not None
    pixels = decode_image(data, 40_000_000)
    prepared = BACKEND.prepare(pixels, params, "")
    (raw,) = BACKEND.run_batch([(prepared, params)])
    detections = [d for d in BACKEND.finish(raw, params, prepared) if isinstance(d, Segmentation)]
    info = ImageInfo(width=pixels.shape[1], height=pixels.shape[0])
    response = SegmentResponse(
        image=info, image_id="", mask_format="rle", detections=detections, timings_ms={}
    )
    return response.model_dump()


def main() -> None:
    global BACKEND
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", choices=["simulated", "grounded-sam"], default="grounded-sam")
    parser.add_argument("--detector")
    parser.add_argument("--segmenter")
    parser.add_argument("--simulated-batch-ms", type=float, default=40.0)
    parser.add_argument("--simulated-item-ms", type=float, default=5.0)
    args = parser.parse_args()
    if args.backend == "simulated":
        from tunnelvision.models.simulated import SimulatedBackend

        BACKEND = SimulatedBackend(args.simulated_batch_ms, args.simulated_item_ms)
    else:
        from tunnelvision.models.grounded_sam import GroundedSam

        BACKEND = GroundedSam(args.detector, args.segmenter, device="auto")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
