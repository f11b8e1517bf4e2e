"""Video clips in and out: probing with limits, FrameReader ranges/seeks/backward in flat memory,
damaged files as domain errors, MOT text, the annotated MP4, the per-object summary."""

from __future__ import annotations

import csv
import io
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnelvision.errors import (
    ImageTooLarge,
    InvalidInput,
    MalformedInput,
    PayloadTooLarge,
    TunnelvisionError,
    UnsupportedMediaType,
)
from tunnelvision.masks import encode_rle
from tunnelvision.video.decode import FrameReader, VideoInfo, VideoLimits, _VideoFile, check_limits, probe
from tunnelvision.video.export import (
    FrameResult,
    TrackedObject,
    color_for_id,
    summarize,
    video_encoder,
    write_mot,
    write_overlay,
)
from tunnelvision.video.synthetic import (
    BACKGROUND,
    square_origin,
    truncate_copy,
    write_frames_zip,
    write_moving_square_clip,
)

W, H, N = 160, 120, 60


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    made = {
        fmt: write_moving_square_clip(folder / f"c.{fmt}", N, W, H, fmt=fmt)
        for fmt in ("mp4", "webm", "mov", "avi")
    }
    made["zip"] = write_frames_zip(folder / "c.zip", N, W, H)
    return made


def square_seen(image: np.ndarray, index: int) -> bool:
    """The white square is where the clip drew it in frame `index` (lossy codecs: roughly white)."""
    x, y = square_origin(index, N, W, H)
    return bool(image[y + 10, x + 10].min() > 200 and image[2, 2].max() < BACKGROUND + 30)


# --- probe and limits --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mp4", "webm", "mov", "avi", "zip"])
def test_probe_reads_every_accepted_kind(clips: dict[str, Path], fmt: str) -> None:
    info = probe(clips[fmt])
    assert (info.width, info.height, info.frames) == (W, H, N)
    assert info.fps == 25.0 and info.duration_s == pytest.approx(N / 25)
    assert info.kind == ("frames-zip" if fmt == "zip" else "video")
    assert not info.frames_estimated


def test_a_count_the_header_lacks_is_an_estimate_until_counted(clips: dict[str, Path]) -> None:
    quick = probe(clips["webm"], count=False)  # Matroska declares no frame count
    assert quick.frames_estimated and quick.frames == N
    assert probe(clips["mp4"], count=False).frames_estimated is False


def test_limits_are_checked_from_headers(clips: dict[str, Path]) -> None:
    with pytest.raises(PayloadTooLarge, match="frames; the limit is 59"):
        probe(clips["mp4"], VideoLimits(max_frames=59))
    with pytest.raises(PayloadTooLarge, match=r"lasts 2\.4 s"):
        probe(clips["webm"], VideoLimits(max_duration_s=2))
    with pytest.raises(PayloadTooLarge, match="bytes; the limit is 100"):
        probe(clips["mp4"], VideoLimits(max_bytes=100))
    with pytest.raises(ImageTooLarge, match="160x120"):
        probe(clips["mp4"], VideoLimits(max_width=100, max_height=100))
    with pytest.raises(MalformedInput, match="zip of frames cannot be read: the archive lists 60 entries"):
        probe(clips["zip"], VideoLimits(max_frames=10))
    with pytest.raises(ImageTooLarge):
        FrameReader(clips["zip"], VideoLimits(max_width=100, max_height=100))


def test_frame_size_limit_holds_either_way_round() -> None:
    limits = VideoLimits()
    portrait = VideoInfo(2160, 3840, 10, 30.0, 0.3, "h264", "video")
    check_limits(portrait, limits)  # a phone held upright
    for width, height in [(3841, 100), (2161, 2161), (0, 100), (100_000, 1)]:
        with pytest.raises((ImageTooLarge, MalformedInput)):
            check_limits(VideoInfo(width, height, 10, 30.0, 0.3, "h264", "video"), limits)


def test_a_real_oversized_stream_is_refused_before_decoding(tmp_path: Path) -> None:
    """A small file (one black frame) whose stream is 4000x2250: refused from its headers."""
    path = write_moving_square_clip(tmp_path / "big.mp4", 1, 4000, 2250, fmt="mp4")
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    with pytest.raises(ImageTooLarge, match="4000x2250"):
        probe(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5_000_000  # no frame-sized array was made


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (b"", MalformedInput, "empty"),
        (b"hello, this is a text file, not a video at all", UnsupportedMediaType, "not a video"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, UnsupportedMediaType, "single PNG image"),
        (b"\0\0\0\x20ftypisom" + b"\0" * 30, MalformedInput, "damaged or truncated"),
        (b"\x1a\x45\xdf\xa3" + b"\x01" * 40, MalformedInput, "damaged or truncated"),
        (b"RIFF\0\0\0\0AVI LIST", MalformedInput, "damaged or truncated"),
        (b"PK\x03\x04garbage", MalformedInput, "zip of frames cannot be read"),
    ],
)
def test_not_a_video_is_a_domain_error(tmp_path: Path, content: bytes, error: type, message: str) -> None:
    path = tmp_path / "upload.bin"
    path.write_bytes(content)
    with pytest.raises(error, match=message):
        probe(path)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    with pytest.raises(MalformedInput, match="no video stream"):
        probe(path)


def test_zero_frames(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height = 64, 48
        out.start_encoding()
    with pytest.raises(MalformedInput):
        probe(path)
    empty_zip = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty_zip, "w") as archive:
        archive.writestr("notes/", b"")
    with pytest.raises(MalformedInput, match="no frames"):
        probe(empty_zip)


def test_zip_with_a_foreign_member_or_mismatched_frame(tmp_path: Path) -> None:
    path = write_frames_zip(tmp_path / "f.zip", 3, W, H)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("readme.txt", b"hi")
    with pytest.raises(MalformedInput, match=r"'readme\.txt' is not a PNG or JPEG frame"):
        probe(path)
    mixed = tmp_path / "mixed.zip"
    with zipfile.ZipFile(mixed, "w") as archive:
        for name, source in (
            ("a_1.png", write_frames_zip(tmp_path / "a.zip", 1, W, H)),
            ("a_2.png", write_frames_zip(tmp_path / "b.zip", 1, 80, 60)),
        ):
            with zipfile.ZipFile(source) as inner:
                archive.writestr(name, inner.read(inner.namelist()[0]))
    with FrameReader(mixed) as reader, pytest.raises(MalformedInput, match=r"frame 1 .* is 80x60"):
        list(reader)


@pytest.mark.parametrize("fmt", ["mp4", "mov"])
def test_truncated_file_is_refused_by_probe_and_readable_up_to_the_break(
    clips: dict[str, Path], tmp_path: Path, fmt: str
) -> None:
    cut = truncate_copy(clips[fmt], tmp_path / f"cut.{fmt}", 0.5)
    with pytest.raises(MalformedInput, match=r"damaged or truncated at frame (\d+)"):
        probe(cut)
    with FrameReader(cut) as reader:
        got: list[int] = []
        with pytest.raises(MalformedInput, match=r"at frame \d+: frames 0 to \d+ could be read") as caught:
            for index, image in reader:
                assert square_seen(image, index)
                got.append(index)
    assert got == list(range(len(got))) and 5 < len(got) < N
    assert reader.last_index == got[-1]
    assert f"at frame {got[-1] + 1}" in str(caught.value)


def test_truncated_header_is_refused(clips: dict[str, Path], tmp_path: Path) -> None:
    cut = truncate_copy(clips["mp4"], tmp_path / "head.mp4", 0.05)
    with pytest.raises(MalformedInput, match=r"headers cannot be read|headers are damaged"):
        probe(cut)
    avi = truncate_copy(clips["avi"], tmp_path / "cut.avi", 0.5)  # its index is at the end
    with pytest.raises(MalformedInput, match="truncated at frame 0: no frame could be read"):
        probe(avi)


# --- FrameReader -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mp4", "webm", "avi", "zip"])
def test_reader_range_stride_and_seek(clips: dict[str, Path], fmt: str) -> None:
    with FrameReader(clips[fmt]) as reader:
        everything = dict(reader.read())
        assert sorted(everything) == list(range(N))
        assert all(square_seen(image, index) for index, image in everything.items())
        assert all(image.shape == (H, W, 3) and image.dtype == np.uint8 for image in everything.values())
        for start, end, stride in [(0, 5, 1), (37, 50, 5), (13, None, 7), (59, None, 1), (25, 25, 1)]:
            got = list(reader.read(start, end, stride))
            assert [i for i, _ in got] == list(range(start, N if end is None else end, stride))
            for index, image in got:  # the same pixels as a read from the top
                assert np.array_equal(image, everything[index])
    with FrameReader(clips[fmt], start=10, end=20, stride=3) as reader:
        assert [i for i, _ in reader] == [10, 13, 16, 19]
    with FrameReader(clips[fmt]) as reader, pytest.raises(InvalidInput):
        list(reader.read(5, 2))


@pytest.mark.parametrize("fmt", ["mp4", "webm", "zip"])
def test_reader_backward(clips: dict[str, Path], fmt: str) -> None:
    with FrameReader(clips[fmt]) as reader:
        forward = dict(reader.read())
        back = list(reader.backward(45, 7, window=8))
        assert [i for i, _ in back] == list(range(45, 6, -1))
        assert all(np.array_equal(image, forward[index]) for index, image in back)
        assert [i for i, _ in reader.backward(200, 57)] == [59, 58, 57]


def test_seeking_decodes_from_the_keyframe_not_the_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With keyframes every 10 frames, reading frame 95 decodes the frames from 90, not from 0."""
    path = write_moving_square_clip(tmp_path / "gop.mp4", 100, W, H, gop=10)
    decoded: list[int | None] = []
    original = _VideoFile._decoded

    def counting(self: _VideoFile) -> Iterator[av.VideoFrame]:
        for frame in original(self):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(_VideoFile, "_decoded", counting)
    with FrameReader(path) as reader:
        assert [i for i, _ in reader.read(95, 96)] == [95]
    assert 6 <= len(decoded) <= 12


def test_reader_memory_stays_flat(tmp_path: Path) -> None:
    """600 frames of 320x240: Python allocations peak at a few frames, and RSS does not grow."""
    path = write_moving_square_clip(tmp_path / "long.mp4", 600, 320, 240, gop=50)
    frame_bytes = 320 * 240 * 3
    with FrameReader(path) as reader:
        frames = reader.read()
        for _ in range(100):
            next(frames)
        rss_at_100 = _rss_bytes()
        tracemalloc.start()
        count = 100 + sum(1 for _ in frames)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss_at_600 = _rss_bytes()
    assert count == 600
    assert peak < 4 * frame_bytes  # never more than a frame or two alive
    assert rss_at_600 - rss_at_100 < 16 * 1024 * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as stats:
        return int(stats.read().split()[1]) * 4096


# --- hostile bytes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("small")
    made = {
        fmt: write_moving_square_clip(folder / f"s.{fmt}", 12, 64, 48, fmt=fmt)
        for fmt in ("mp4", "webm", "avi")
    }
    made["zip"] = write_frames_zip(folder / "s.zip", 4, 64, 48)
    return {fmt: path.read_bytes() for fmt, path in made.items()}


def _read_everything(path: Path) -> None:
    """Probe leniently, then decode every frame: only domain errors may come out."""
    try:
        probe(path, count=False)
        with FrameReader(path) as reader:
            for _ in reader:
                pass
            for _ in reader.backward(3, 0, window=2):
                pass
    except TunnelvisionError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_prefixes_and_corruptions_raise_only_domain_errors(
    small_clips: dict[str, bytes], tmp_path: Path, data: st.DataObject
) -> None:
    clip = small_clips[data.draw(st.sampled_from(sorted(small_clips)))]
    content = bytearray(clip[: data.draw(st.integers(0, len(clip)))])
    for _ in range(data.draw(st.integers(0, 4))):  # flip a few bytes past the signature
        if len(content) > 16:
            content[data.draw(st.integers(16, len(content) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzz.bin"
    path.write_bytes(bytes(content))
    _read_everything(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    head=st.sampled_from(
        [b"", b"\0\0\0\x18ftypmp42", b"\x1a\x45\xdf\xa3", b"RIFF\0\0\0\0AVI ", b"PK\x03\x04"]
    ),
    body=st.binary(max_size=2048),
)
def test_random_bytes_raise_only_domain_errors(tmp_path: Path, head: bytes, body: bytes) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(head + body)
    _read_everything(path)


# --- exports -----------------------------------------------------------------------------------


def tracked_results(frames: int = N, every: int = 2) -> list[FrameResult]:
    """The square as object 1 (with its mask) on every other frame; a label-less object 2."""
    results = []
    for index in range(0, frames, every):
        x, y = square_origin(index, N, W, H)
        mask = np.zeros((H, W), dtype=bool)
        mask[y : y + 24, x : x + 24] = True
        square = TrackedObject(1, "square", 0.8 + index / 1000, (x, y, x + 24, y + 24), encode_rle(mask))
        other = TrackedObject.of({"id": 2, "label": None, "score": None, "box": [0, 0, 10, 20]})
        results.append(FrameResult(index, [square, other] if index < 20 else [square]))
    return results


def test_mot_text_has_ten_columns_one_based(tmp_path: Path) -> None:
    results = tracked_results()
    out = tmp_path / "mot.txt"
    assert write_mot(results, out) == len(results) + 10
    rows = [[float(v) for v in row] for row in csv.reader(out.read_text().splitlines())]
    table = np.array(rows)
    assert table.shape == (len(results) + 10, 10)
    assert table[:, 0].min() == 1 and table[:, 0].max() == N - 1  # frame index 58 -> 59
    assert set(table[:, 1]) == {1.0, 2.0}
    assert (table[:, 7:] == -1).all()
    first = table[(table[:, 0] == 1) & (table[:, 1] == 1)][0]
    x, y = square_origin(0, N, W, H)
    assert list(first[2:7]) == pytest.approx([x + 1, y + 1, 24, 24, 0.8])  # 1-based left/top, w, h, conf
    assert table[table[:, 1] == 2][0, 6] == 1.0  # no score: "consider" flag
    stream = io.StringIO()
    write_mot(results[:1], stream, id_offset=1)
    assert stream.getvalue().startswith("1,2,")
    with pytest.raises(ValueError, match="MOT ids start at 1"):
        write_mot([FrameResult(0, [TrackedObject(0, "a", 1.0, (0, 0, 1, 1))])], io.StringIO())
    with pytest.raises(ValueError, match="ascending"):
        write_mot([FrameResult(3), FrameResult(2)], io.StringIO())


def test_summary_per_object() -> None:
    square, other = summarize(tracked_results())
    assert (square.object_id, square.label, square.first_frame, square.last_frame, square.frames) == (
        1,
        "square",
        0,
        58,
        30,
    )
    assert square.mean_score == pytest.approx(0.8 + 29 / 1000)
    assert (other.first_frame, other.last_frame, other.frames, other.mean_score) == (0, 18, 10, None)


@pytest.mark.parametrize(("width", "height", "fmt"), [(W, H, "mp4"), (161, 121, "mp4"), (W, H, "zip")])
def test_overlay_mp4_decodes_with_the_source_frame_count(
    tmp_path: Path, width: int, height: int, fmt: str
) -> None:
    source = (
        write_frames_zip(tmp_path / "src.zip", N, width, height)
        if fmt == "zip"
        else write_moving_square_clip(tmp_path / "src.mp4", N, width, height, fps=30)
    )
    out = tmp_path / "overlay.mp4"
    assert write_overlay(source, tracked_results(), out, fps=12 if fmt == "zip" else None) == N
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == ("h264" if video_encoder() == "libx264" else "mpeg4")
        assert (stream.codec_context.width, stream.codec_context.height) == (
            width + width % 2,
            height + height % 2,
        )
        assert float(stream.average_rate or 0) == (12 if fmt == "zip" else 30)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert len(frames) == N
    if width == W:  # the square under object 1's translucent colour on frames with a result
        x, y = square_origin(10, N, W, H)
        expected = 255 * 0.55 + np.array(color_for_id(1)) * 0.45
        assert np.abs(frames[10][y + 12, x + 12].astype(int) - expected).max() < 40
        x, y = square_origin(11, N, W, H)
        assert frames[11][y + 12, x + 12].min() > 200  # no result for frame 11: the bare square


def test_object_colours_are_stable_and_distinct() -> None:
    colours = [color_for_id(i) for i in range(1, 13)]
    assert colours == [color_for_id(i) for i in range(1, 13)]
    assert len(set(colours)) == 12
