"""The moto S3 fixture is a real endpoint: s3fs writes, lists and reads through it."""

from __future__ import annotations

import s3fs


def test_s3_bucket_roundtrip(s3_bucket):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe(f"{s3_bucket}/a/b.txt", b"hello")
    assert fs.cat(f"{s3_bucket}/a/b.txt") == b"hello"
    assert fs.ls(f"{s3_bucket}/a", detail=False) == [f"{s3_bucket[5:]}/a/b.txt"]
