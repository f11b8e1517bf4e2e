"""Zip archives from untrusted clients: judged from the central directory before anything is
inflated, then each member read through a hard byte cap. Nothing is written to disk here."""

from __future__ import annotations

import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any

from tunnelvision.errors import InvalidInput, MalformedInput, PayloadTooLarge, QuotaExceeded

# zipfile bounds what one read inflates only for deflate; its bzip2 and lzma readers inflate a
# whole compressed chunk at once (177 bytes of bzip2 are 200 MB of zeros), so they are refused.
READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
METADATA_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}  # what OS tools add beside the images
ENTRIES_PER_IMAGE = 4  # room for folders and a macOS `__MACOSX/._name` twin per image
DIRECTORY_BYTES_PER_ENTRY = 256  # a directory record is 46 bytes plus the name and extras
ECD_ENTRIES, ECD_DIRECTORY_BYTES = 4, 5  # zipfile's _ECD_ENTRIES_TOTAL, _ECD_SIZE
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError)
OPEN_ERRORS = (*READ_ERRORS, struct.error, zipfile.LargeZipFile)


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int  # images the archive may bring
    max_member_bytes: int  # one image, inflated
    max_total_bytes: int  # all its images, inflated: what is left of the jobs quota
    max_unpacked_bytes: int  # all its images, inflated: what one request may hold in memory


def read_archive(file: IO[bytes], limits: ArchiveLimits) -> list[tuple[str, bytes]]:
    """(name, bytes) of each file the zip holds, folders and OS metadata skipped. Every limit is
    checked against the directory's declared sizes before a byte is inflated."""
    with open_archive(file, limits) as archive:
        members = [info for info in archive.infolist() if not is_skipped(info)]
        if len(members) > limits.max_members:
            raise InvalidInput(
                f"the archive holds {len(members)} images, "
                f"more than the {limits.max_members} this job can take"
            )
        names = [checked_name(info, limits.max_member_bytes) for info in members]
        check_total(members, limits)
        return [
            (name, read_member(archive, info, limits.max_member_bytes))
            for name, info in zip(names, members, strict=True)
        ]


def open_archive(file: IO[bytes], limits: ArchiveLimits) -> zipfile.ZipFile:
    """The zip's directory, parsed only once its size is known to be sane (zipfile builds an
    object per entry: a 32 MB body of empty entries would cost some 400 MB)."""
    max_entries = ENTRIES_PER_IMAGE * limits.max_members + 16
    try:
        entries, directory_bytes = _directory_size(file)
        if entries > max_entries or directory_bytes > max_entries * DIRECTORY_BYTES_PER_ENTRY:
            raise InvalidInput(
                f"the archive lists {entries} entries; a job takes at most {limits.max_members} images"
            )
        archive = zipfile.ZipFile(file)
    except OPEN_ERRORS:
        raise InvalidInput("'archive' is not a zip file (or it is damaged)") from None
    if len(archive.infolist()) > max_entries:
        archive.close()
        raise InvalidInput(f"the archive holds more than {max_entries} entries")
    return archive


def _directory_size(file: IO[bytes]) -> tuple[int, int]:
    """Entries and bytes of the central directory, from zipfile's own reader of the end record
    (zip64 included), which has no public name."""
    read_end_record = getattr(zipfile, "_EndRecData", None)
    if read_end_record is None:  # a Python without it: zipfile's own parse, counted after
        return 0, 0
    end: list[Any] | None = read_end_record(file)
    if end is None:
        raise zipfile.BadZipFile("no end of central directory")
    return int(end[ECD_ENTRIES]), int(end[ECD_DIRECTORY_BYTES])


def is_skipped(info: zipfile.ZipInfo) -> bool:
    """Folders, and the metadata macOS and Windows leave in zips."""
    path = PurePosixPath(info.filename)
    return (
        info.is_dir() or "__MACOSX" in path.parts or path.name.startswith("._") or path.name in METADATA_NAMES
    )


def checked_name(info: zipfile.ZipInfo, max_bytes: int) -> str:
    """The member's name with '/' separators, once the directory says it may be read."""
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if not path.parts or path.is_absolute() or ".." in path.parts or ":" in path.parts[0] or "\0" in name:
        raise MalformedInput(f"archive member '{info.filename}' has an unsafe name (absolute or '..')")
    if info.flag_bits & 0x1:
        raise MalformedInput(f"archive member '{name}' is encrypted: send a zip without a password")
    if info.compress_type not in READABLE_METHODS:
        raise MalformedInput(
            f"archive member '{name}' uses compression method {info.compress_type}: this server "
            "reads stored or deflate members (what zip tools write by default)"
        )
    if info.file_size > max_bytes:
        raise PayloadTooLarge(
            f"archive member '{name}' is {info.file_size} bytes; an image may be {max_bytes}"
        )
    return name


def check_total(members: list[zipfile.ZipInfo], limits: ArchiveLimits) -> None:
    declared = sum(info.file_size for info in members)
    if declared > limits.max_unpacked_bytes:
        raise PayloadTooLarge(
            f"the archive's images are {declared} bytes once unpacked; one upload may unpack to "
            f"{limits.max_unpacked_bytes} (images compress little: split the archive)"
        )
    if declared > limits.max_total_bytes:
        raise QuotaExceeded(
            f"the archive's images are {declared} bytes once unpacked and jobs have "
            f"{limits.max_total_bytes} bytes of room left: wait for running jobs, or cancel some"
        )


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> bytes:
    """The member's bytes, never more than `max_bytes` inflated (declared sizes can lie; zipfile
    also stops at the declared size, then checks the CRC)."""
    limit = min(info.file_size, max_bytes)  # what one read may inflate, so no more is buffered
    try:
        with archive.open(info) as member:
            data = member.read(limit + 1)
    except READ_ERRORS:
        raise MalformedInput(f"archive member '{info.filename}' is damaged (bad CRC or data)") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"archive member '{info.filename}' is over {limit} bytes")
    return data
