"""/v1/jobs over HTTP: submit, follow, COCO result, cancel, ownership, quota and bad input."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from pycocotools.coco import COCO

from support import FakeBackend, ThreadServer, image_bytes, make_settings, wait_for
from tunnelvision.security.keys import KeyStore


def images(count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"img{i}.png", image_bytes(40 + i, 30, seed=i), "image/png")) for i in range(count)]


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def submit(url: str, files: Any, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/jobs", files=files, data={"prompt": "cat . dog", **fields}, headers=headers)


def wait_done(url: str, job_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers).json()["status"] == "done")
    status: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers).json()
    return status


def test_a_job_runs_to_a_coco_result(server: ThreadServer, tmp_path: Path) -> None:
    created = submit(server.url, images(3))
    assert created.status_code == 202, created.text
    body = created.json()
    assert body["total"] == 3 and body["status"] in ("queued", "running", "done")
    assert created.headers["location"] == f"/v1/jobs/{body['id']}"
    status = wait_done(server.url, body["id"])
    assert (status["done"], status["failed"], status["progress"]) == (3, 0, 1.0)
    result = httpx.get(f"{server.url}/v1/jobs/{body['id']}/result")
    path = tmp_path / "coco.json"
    path.write_text(result.text)
    coco = COCO(str(path))
    assert sorted(i["file_name"] for i in coco.loadImgs(coco.getImgIds())) == [
        "img0.png",
        "img1.png",
        "img2.png",
    ]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "dog"]
    assert result.headers["x-job-status"] == "done"


def test_a_zip_is_a_job_too(server: ThreadServer) -> None:
    archive = zipped({"a/one.png": image_bytes(seed=1), "two.jpg": image_bytes(fmt="JPEG", seed=2)})
    created = submit(server.url, {"archive": ("photos.zip", archive, "application/zip")})
    assert created.status_code == 202, created.text
    wait_done(server.url, created.json()["id"])
    coco = httpx.get(f"{server.url}/v1/jobs/{created.json()['id']}/result").json()
    assert sorted(i["file_name"] for i in coco["images"]) == ["a/one.png", "two.jpg"]


def test_cancel_stops_a_job(server: ThreadServer, fake: FakeBackend) -> None:
    fake.cost_s = 0.3
    job_id = submit(server.url, images(10)).json()["id"]
    wait_for(lambda: httpx.get(f"{server.url}/v1/jobs/{job_id}").json()["done"] >= 1)
    cancelled = httpx.delete(f"{server.url}/v1/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert server.state.jobs.bytes_used() == 0  # its uploads are gone: the quota is free again
    time.sleep(0.8)
    assert httpx.get(f"{server.url}/v1/jobs/{job_id}").json()["done"] < 10


def test_jobs_yield_to_interactive_requests(server: ThreadServer, fake: FakeBackend) -> None:
    fake.cost_s = 0.3
    job_id = submit(server.url, images(8)).json()["id"]
    wait_for(lambda: httpx.get(f"{server.url}/v1/jobs/{job_id}").json()["done"] >= 1)
    began = time.monotonic()
    interactive = httpx.post(
        f"{server.url}/v1/detect", files={"image": ("i.png", image_bytes())}, data={"prompt": "cat"}
    )
    assert interactive.status_code == 200
    assert time.monotonic() - began < 1.0  # at most the job image on the device ahead of it
    assert httpx.get(f"{server.url}/v1/jobs/{job_id}").json()["done"] < 8


def test_a_key_sees_only_its_own_jobs(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    store = KeyStore(keys)
    alice, bob = {"X-API-Key": store.add("alice")}, {"X-API-Key": store.add("bob")}
    with ThreadServer(make_settings(keys_file=keys, rate_limit_per_minute=0), FakeBackend()) as srv:
        job_id = submit(srv.url, images(1), headers=alice).json()["id"]
        assert httpx.get(f"{srv.url}/v1/jobs/{job_id}", headers=alice).status_code == 200
        for call in (
            httpx.get(f"{srv.url}/v1/jobs/{job_id}", headers=bob),
            httpx.get(f"{srv.url}/v1/jobs/{job_id}/result", headers=bob),
            httpx.delete(f"{srv.url}/v1/jobs/{job_id}", headers=bob),
        ):
            assert call.status_code == 404 and call.json()["error"]["code"] == "not_found"


def test_a_key_lists_its_own_jobs_newest_first_a_page_at_a_time(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    store = KeyStore(keys)
    alice, bob = {"X-API-Key": store.add("alice")}, {"X-API-Key": store.add("bob")}
    with ThreadServer(make_settings(keys_file=keys, rate_limit_per_minute=0), FakeBackend()) as srv:
        mine = [submit(srv.url, images(1), headers=alice).json()["id"] for _ in range(5)]
        theirs = submit(srv.url, images(1), headers=bob).json()["id"]
        seen: list[str] = []
        after: str | None = None
        for _ in range(5):  # pages of 2: 2, 2, 1
            params: dict[str, str | int] = {"limit": 2, **({"after": after} if after else {})}
            page = httpx.get(f"{srv.url}/v1/jobs", params=params, headers=alice)
            assert page.status_code == 200, page.text
            seen += [job["id"] for job in page.json()["jobs"]]
            after = page.json()["next"]
            if after is None:
                break
        assert seen == mine[::-1] and theirs not in seen
        assert [j["id"] for j in httpx.get(f"{srv.url}/v1/jobs", headers=bob).json()["jobs"]] == [theirs]
        for bad in ({"limit": 0}, {"limit": 101}, {"after": "yesterday"}):
            answer = httpx.get(f"{srv.url}/v1/jobs", params=bad, headers=alice)
            assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_input", bad


def test_the_job_upload_form_is_documented_for_docs() -> None:
    from tunnelvision.api.app import create_app

    schema = create_app(make_settings(), lambda _settings: [FakeBackend()]).openapi()
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["images"]["items"]["format"] == "binary"
    assert {"archive", "prompt", "model"} <= body["properties"].keys()


def test_quota_is_enforced(fake: FakeBackend) -> None:
    with ThreadServer(make_settings(jobs_quota_bytes=500), fake) as srv:
        refused = submit(srv.url, images(2))
        assert refused.status_code == 507 and refused.json()["error"]["code"] == "quota_exceeded"
        assert [p for p in srv.state.jobs.folder.iterdir() if p.is_dir()] == []  # nothing left behind


@pytest.mark.parametrize(
    ("files", "fields", "status", "words"),
    [
        ({"archive": ("e.zip", zipped({}), "application/zip")}, {}, 422, "no images"),
        (
            {
                "archive": (
                    "x.zip",
                    zipped({"ok.png": image_bytes(), "notes.txt": b"hello"}),
                    "application/zip",
                )
            },
            {},
            400,
            "'notes.txt' is not an image",
        ),
        ({"archive": ("x.zip", b"not a zip", "application/zip")}, {}, 422, "not a zip"),
        ({"images": ("bad.png", b"garbage", "image/png")}, {}, 400, "'bad.png' is not an image"),
        ({"other": ("o.txt", b"x", "text/plain")}, {}, 422, "no images"),
        (images(1), {"prompt": ""}, 422, "give a prompt"),
        (images(1), {"prompt": "", "boxes": "[[0, 0, 5, 5]]"}, 422, "text prompt"),
        (images(1), {"box_threshold": "7"}, 422, "box_threshold"),
    ],
    ids=[
        "empty-zip",
        "zip-with-non-image",
        "not-a-zip",
        "not-an-image",
        "no-images",
        "no-prompt",
        "boxes-only",
        "threshold",
    ],
)
def test_bad_job_input(
    server: ThreadServer, files: Any, fields: dict[str, Any], status: int, words: str
) -> None:
    response = submit(server.url, files, **fields)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]


def test_unknown_job_ids_are_404(server: ThreadServer) -> None:
    for call in (httpx.get, httpx.delete):
        response = call(f"{server.url}/v1/jobs/nope")
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server.url}/v1/jobs/nope/result").status_code == 404
    assert json.loads(httpx.get(f"{server.url}/healthz").text) == {"status": "ok"}


def test_a_job_whose_every_image_fails_is_failed(server: ThreadServer) -> None:
    truncated = image_bytes(64, 48)[:200]  # headers intact (accepted at upload), pixel data cut short
    files = [("images", ("truncated.png", truncated, "image/png"))]
    job_id = submit(server.url, files).json()["id"]
    wait_for(lambda: httpx.get(f"{server.url}/v1/jobs/{job_id}").json()["status"] == "failed")
    status = httpx.get(f"{server.url}/v1/jobs/{job_id}").json()
    assert (status["done"], status["failed"]) == (0, 1)


def test_a_wrong_method_names_every_method_the_path_serves(server: ThreadServer) -> None:
    answer = httpx.request("PUT", f"{server.url}/v1/jobs")
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "GET, POST"
