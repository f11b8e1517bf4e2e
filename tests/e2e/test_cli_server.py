"""`tunnelvision serve` as a subprocess on tiny random checkpoints: what a user gets."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from support import cli_server, free_port, image_bytes, send_and_hang_up, stats, wait_for, wait_until_ready

pytestmark = pytest.mark.e2e
PNG = image_bytes(160, 120)


@pytest.fixture(scope="module")
def url(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with cli_server(*tiny_models, log=log) as (server_url, _):
        yield server_url


def post(url: str, route: str, image: bytes = PNG, timeout: float = 60, **fields: Any) -> httpx.Response:
    return httpx.post(f"{url}{route}", files={"image": ("image", image)}, data=fields, timeout=timeout)


def test_detect_returns_boxes_for_the_prompt(url: str) -> None:
    body = {
        "image": base64.b64encode(PNG).decode(),
        "prompt": "forklift . person",
        "box_threshold": 0.0,
        "max_detections": 5,
    }
    response = httpx.post(f"{url}/v1/detect", json=body, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["image"] == {"width": 160, "height": 120}
    assert 0 < len(data["detections"]) <= 5
    for d in data["detections"]:
        assert d["label"] in {"forklift", "person"} and 0 <= d["score"] <= 1 and len(d["box"]) == 4


def test_segment_by_text_gives_rle_masks_of_the_image_size(url: str) -> None:
    response = post(url, "/v1/segment", prompt="cat", box_threshold="0", max_detections="3")
    assert response.status_code == 200, response.text
    detections = response.json()["detections"]
    assert len(detections) == 3
    for d in detections:
        rle = d["mask"]
        mask = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert mask.shape == (120, 160)
        assert d["label"] == "cat" and isinstance(d["mask_score"], float)


def test_segment_by_boxes_and_by_points(url: str) -> None:
    boxes = post(url, "/v1/segment", boxes="[[10, 10, 80, 60], [50, 20, 150, 110]]")
    assert boxes.status_code == 200, boxes.text
    assert [d["box"] for d in boxes.json()["detections"]] == [[10, 10, 80, 60], [50, 20, 150, 110]]
    points = post(url, "/v1/segment", points="[[40, 30, 1], [120, 90, 0]]", multimask="true")
    assert points.status_code == 200, points.text
    (only,) = points.json()["detections"]
    assert only["label"] is None and only["mask"]["size"] == [120, 160]


@pytest.mark.parametrize("fmt", ["rle", "polygon", "png", "none"])
def test_every_mask_format(url: str, fmt: str) -> None:
    response = post(url, "/v1/segment", boxes="[[0, 0, 160, 120]]", mask_format=fmt)
    assert response.status_code == 200, response.text
    assert response.json()["mask_format"] == fmt
    mask = response.json()["detections"][0]["mask"]
    if fmt == "rle":
        decoded = coco_mask.decode({"size": mask["size"], "counts": mask["counts"].encode()})
        assert decoded.shape == (120, 160)
    elif fmt == "polygon":
        assert all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in mask)
        assert all(0 <= v <= 160 for poly in mask for v in poly)
    elif fmt == "png":
        assert Image.open(io.BytesIO(base64.b64decode(mask))).size == (160, 120)
    else:
        assert mask is None


def converted(mode: str, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image = Image.open(io.BytesIO(image_bytes(90, 60))).convert(mode)
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def sixteen_bit() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((60, 90), 40000, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def rotated_by_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return converted("RGB", "JPEG", exif=exif.tobytes())


def animated() -> bytes:
    frames = [Image.new("RGB", (90, 60), c) for c in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "size"),
    [
        (lambda: converted("L", "PNG"), (90, 60)),
        (lambda: converted("RGBA", "PNG"), (90, 60)),
        (lambda: converted("CMYK", "JPEG"), (90, 60)),
        (lambda: converted("P", "PNG"), (90, 60)),
        (lambda: converted("RGB", "WEBP"), (90, 60)),
        (sixteen_bit, (90, 60)),
        (animated, (90, 60)),
        (rotated_by_exif, (60, 90)),
    ],
    ids=["gray", "rgba", "cmyk", "palette", "webp", "16bit", "animated", "exif-rotated"],
)
def test_image_kinds_are_accepted_and_converted(url: str, make: Any, size: tuple[int, int]) -> None:
    response = post(url, "/v1/segment", image=make(), prompt="cat", box_threshold="0", max_detections="1")
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": size[0], "height": size[1]}


def test_models_route_and_openapi(url: str, tiny_models: tuple[Path, Path]) -> None:
    models = httpx.get(f"{url}/v1/models").json()
    assert models["detector"] == {"id": str(tiny_models[0]), "device": "cpu", "dtype": "float32"}
    assert models["demo"] is False
    assert "/v1/segment" in httpx.get(f"{url}/openapi.json").json()["paths"]


def burst(url: str, count: int, **fields: Any) -> list[httpx.Response]:
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(post, url, "/v1/segment", **fields) for _ in range(count)]
        return [f.result() for f in futures]


HEAVY = {
    "prompt": "cat . dog",
    "box_threshold": "0",
    "max_detections": "30",
    "multimask": "true",
    "mask_format": "none",
}


def test_healthz_stays_fast_while_requests_saturate_the_worker(url: str) -> None:
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(burst, url, 16, **HEAVY)
        wait_for(lambda: stats(url)["queued"] > 0)
        latencies = []
        while not load.done():
            began = time.monotonic()
            assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
            latencies.append(time.monotonic() - began)
            time.sleep(0.02)
        assert all(r.status_code == 200 for r in load.result())
    assert len(latencies) >= 5 and max(latencies) < 1.0


def test_client_that_hangs_up_while_queued_never_reaches_the_device(url: str) -> None:
    before = stats(url)
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(burst, url, 12, **HEAVY)
        wait_for(lambda: stats(url)["queued"] >= 3)
        send_and_hang_up(url, PNG)
        wait_for(lambda: stats(url)["dropped_cancelled"] > before["dropped_cancelled"])
        assert all(r.status_code == 200 for r in load.result())
    after = stats(url)
    assert after["executed"] - before["executed"] == 12
    assert after["dropped_cancelled"] - before["dropped_cancelled"] == 1


def test_full_queue_gets_503_with_retry_after(tiny_models: tuple[Path, Path]) -> None:
    with cli_server(*tiny_models, "--max-queue", "1", "--no-warmup") as (server_url, _):
        responses = burst(server_url, 24, **HEAVY)
    codes = [r.status_code for r in responses]
    assert 200 in codes and 503 in codes, codes
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1


def test_requests_past_the_deadline_are_dropped_before_the_device(tiny_models: tuple[Path, Path]) -> None:
    with cli_server(*tiny_models, "--deadline-s", "0.25", "--no-warmup") as (server_url, _):
        responses = burst(server_url, 16, **HEAVY)
        wait_for(lambda: stats(server_url)["running"] == 0)
        final = stats(server_url)
    timed_out = [r for r in responses if r.status_code == 504]
    assert timed_out and all(r.json()["error"]["code"] == "deadline_exceeded" for r in timed_out)
    assert final["dropped_expired"] > 0
    assert final["executed"] + final["failed"] < 16  # dropped ones never ran


def test_sigterm_finishes_running_work_fails_the_queued_and_exits(tiny_models: tuple[Path, Path]) -> None:
    with cli_server(*tiny_models, "--no-warmup") as (server_url, process), ThreadPoolExecutor(1) as pool:
        load = pool.submit(burst, server_url, 12, **HEAVY)
        wait_for(lambda: stats(server_url)["queued"] >= 4)
        process.send_signal(signal.SIGTERM)
        responses = load.result()
        process.wait(30)
    codes = {r.status_code for r in responses}
    assert codes <= {200, 503} and 503 in codes, codes
    assert 200 in codes  # the request on the device finished
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "shutting_down"
    assert process.returncode in (0, -signal.SIGTERM)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnelvision.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_missing_weights_fail_fast_with_the_remedies(tiny_models: tuple[Path, Path]) -> None:
    began = time.monotonic()
    result = run_cli(
        "serve",
        "--detector",
        "someone/uncached-detector",
        "--segmenter",
        str(tiny_models[1]),
        "--port",
        str(free_port()),
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert time.monotonic() - began < 45
    assert "someone/uncached-detector" in result.stderr and "Cache folder" in result.stderr
    assert "--demo" in result.stderr


def test_a_busy_port_is_refused_before_any_model_loads(tiny_models: tuple[Path, Path]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_cli(
            "serve", "--detector", str(tiny_models[0]), "--segmenter", str(tiny_models[1]), "--port", port
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert "loading detector" not in result.stderr and "Application startup" not in result.stderr


def test_invalid_settings_are_refused_before_starting() -> None:
    result = run_cli("serve", "--deadline-s", "200")
    assert result.returncode == 2 and "Cloudflare" in result.stderr


def test_demo_mode_serves_random_models_and_says_so(tmp_path: Path) -> None:
    port = str(free_port())
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tunnelvision.cli", "serve", "--demo", "--port", port],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", process=process)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["demo"] is True
        assert post(f"http://127.0.0.1:{port}", "/v1/segment", prompt="cat").status_code == 200
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode()
    assert "DEMO MODE" in output and "RANDOM-WEIGHT" in output


def test_public_bind_without_auth_is_refused_at_start(tmp_path: Path) -> None:
    keys_file = str(tmp_path / "none.json")
    refused = run_cli("serve", "--host", "0.0.0.0", "--keys-file", keys_file, "--demo")
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in refused.stderr


def test_keys_cli_round_trip_against_a_running_server(tiny_models: tuple[Path, Path], tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    added = run_cli("keys", "--keys-file", str(keys_file), "add", "ci")
    assert added.returncode == 0
    key = added.stdout.strip()
    assert key.startswith("tv_") and key not in keys_file.read_text()
    assert "ci\t" in run_cli("keys", "--keys-file", str(keys_file), "list").stdout
    log_path = tmp_path / "serve.log"
    with cli_server(*tiny_models, "--keys-file", str(keys_file), "--no-warmup", log=log_path) as (url, _):
        assert httpx.get(f"{url}/v1/models").status_code == 401
        bearer = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/v1/models", headers=bearer).status_code == 200
        assert run_cli("keys", "--keys-file", str(keys_file), "revoke", "ci").returncode == 0
        assert httpx.get(f"{url}/v1/models", headers=bearer).status_code == 401
    log = log_path.read_text()
    assert key not in log
    assert '"principal": "key:ci"' in log  # the structured access log names the key, not the key


def test_image_id_round_trip_reuses_the_image(url: str) -> None:
    unseen = image_bytes(80, 60, seed=99)  # no other test sends it: the first pass runs the encoder
    first = post(url, "/v1/segment", image=unseen, prompt="cat", box_threshold="0", max_detections="2")
    assert first.json()["timings_ms"]["encode"] > 0
    image_id = first.json()["image_id"]
    again = httpx.post(
        f"{url}/v1/segment",
        json={"image_id": image_id, "prompt": "cat", "box_threshold": 0, "max_detections": 2},
        timeout=60,
    )
    assert again.status_code == 200, again.text
    assert again.json()["image_id"] == image_id and again.json()["image"] == first.json()["image"]
    assert again.json()["detections"] == first.json()["detections"]  # the cached embedding, same masks
    assert "encode" not in again.json()["timings_ms"]  # no encoder pass this time
    boxes = httpx.post(
        f"{url}/v1/segment", json={"image_id": image_id, "boxes": [[0, 0, 50, 50]]}, timeout=60
    )
    assert boxes.status_code == 200 and len(boxes.json()["detections"]) == 1


def test_evicted_image_id_gets_404_asking_for_the_image(tiny_models: tuple[Path, Path]) -> None:
    one_image = 160 * 120 * 3
    with cli_server(*tiny_models, "--image-cache-bytes", str(one_image), "--no-warmup") as (server_url, _):
        first = post(server_url, "/v1/detect", prompt="cat").json()["image_id"]
        second = post(server_url, "/v1/detect", image=image_bytes(160, 120, seed=1), prompt="cat").json()[
            "image_id"
        ]
        assert first != second
        evicted = httpx.post(f"{server_url}/v1/detect", json={"image_id": first, "prompt": "cat"})
        assert evicted.status_code == 404
        assert "send the image again" in evicted.json()["error"]["message"]
        assert (
            httpx.post(f"{server_url}/v1/detect", json={"image_id": second, "prompt": "cat"}).status_code
            == 200
        )


def test_concurrent_requests_are_batched_and_answer_as_alone(tiny_models: tuple[Path, Path]) -> None:
    prompts = ["cat", "dog . person", "forklift", "red car", "a bird", "table", "cup", "tree"]
    images = [image_bytes(160, 120, seed=i) for i in range(len(prompts))]

    def ask(server_url: str, i: int) -> Any:
        fields: dict[str, Any] = {"prompt": prompts[i], "box_threshold": "0", "max_detections": "3"}
        response = post(server_url, "/v1/segment", image=images[i], **fields)
        assert response.status_code == 200, response.text
        return response.json()["detections"]

    with cli_server(*tiny_models, "--max-batch", "8", "--batch-wait-ms", "50", "--no-warmup") as (
        server_url,
        _,
    ):
        alone = [ask(server_url, i) for i in range(len(prompts))]
        before = stats(server_url)
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda i: ask(server_url, i), range(len(prompts))))
        after = stats(server_url)
    assert together == alone
    batches = after["batches"] - before["batches"]
    assert after["batched_items"] - before["batched_items"] == len(prompts) and batches < len(prompts)


def test_annotate_draws_the_masks_on_an_image_of_the_right_size(url: str) -> None:
    from tunnelvision.masks import decode_rle
    from tunnelvision.schemas import RLE

    fields: dict[str, Any] = {"boxes": "[[20, 20, 100, 90]]"}
    response = post(url, "/v1/annotate", **fields)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and response.headers["x-detections"] == "1"
    drawn = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)
    original = np.asarray(Image.open(io.BytesIO(PNG)).convert("RGB")).astype(int)
    assert drawn.shape == original.shape == (120, 160, 3)
    mask = decode_rle(RLE(**post(url, "/v1/segment", **fields).json()["detections"][0]["mask"]))
    changed = np.abs(drawn - original).sum(axis=2) > 0
    assert mask.any() and changed[mask].mean() > 0.9  # the mask is painted
    far_away = ~mask
    far_away[15:95, 15:105] = False  # leave out the box outline and its label tag
    far_away[:15, :] = False
    assert changed[far_away].mean() < 0.01  # the rest is untouched
    jpeg = post(url, "/v1/annotate", format="jpeg", **fields)
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg.content)).size == (160, 120)


def test_client_decodes_every_mask_format_to_the_same_arrays(url: str) -> None:
    from tunnelvision import Client
    from tunnelvision.client import decode_masks

    with Client(url) as client:
        by_format = {
            fmt: decode_masks(client.segment(PNG, boxes=[[10, 10, 120, 100]], mask_format=fmt))[0]
            for fmt in ("rle", "png", "polygon")
        }
    assert all(mask.shape == (120, 160) and mask.dtype == bool for mask in by_format.values())
    assert np.array_equal(by_format["rle"], by_format["png"])
    overlap = (by_format["rle"] & by_format["polygon"]).sum() / max(
        1, (by_format["rle"] | by_format["polygon"]).sum()
    )
    assert overlap > 0.8  # polygons trace the outer contours only
