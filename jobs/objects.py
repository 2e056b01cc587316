"""Where the jobs' images are kept: an object store, so that Redis holds only small records and events.

Two stores behind one interface: a bucket of an S3-compatible service (AWS S3, MinIO, Ceph, GCS's S3 API;
aiobotocore, the asynchronous botocore), named by `s3://bucket/prefix` with the usual AWS credential chain
(environment, shared files, the pod's role), or a local directory for one machine (scripts/serve.sh). Objects
are written from an asynchronous iterable of chunks and read back as one: neither side holds a whole object,
only a part of about PART_BYTES at a time (what S3's multipart upload sends at once).

A job's objects share a prefix of their own (JobObjects), so that they all go with the job: its request, its
result, and whatever else a job keeps (a checkpoint, say) under a name of its own.
"""

import asyncio
import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterable, AsyncIterator
from urllib.parse import urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

PART_BYTES = 5 * 1024 * 1024  # the least S3 takes in a part of a multipart upload (but the last)
READ_CHUNK_BYTES = 256 * 1024
# What an object store answers while it cannot be reached or is overloaded: wait and try again.
OBJECT_STORE_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, asyncio.TimeoutError)


class ObjectMissing(LookupError):
    """No object under that key (never written, or deleted with its job)."""


@dataclass(frozen=True)
class JobObjects:
    """The keys of one job's objects: `<client>/<job id>/<nonce>/<name>`. The nonce is the job's own, so that a
    job submitted under the id of an expired one never meets its objects."""
    prefix: str  # ends with "/"

    @classmethod
    def new(cls, client: str, job_id: str) -> "JobObjects":
        return cls(f"{client}/{job_id}/{uuid.uuid4().hex}/")

    def key(self, name: str) -> str:
        return self.prefix + name


class StoredObject:
    """An object being read: its size and its bytes, chunk by chunk."""

    def __init__(self, size: int, chunks: AsyncIterator[bytes]):
        self.size, self._chunks = size, chunks

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks


class ObjectStore:
    """The interface: S3Objects and LocalObjects."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Write the object from `chunks`; its size. Nothing is left under `key` when it fails."""
        raise NotImplementedError

    def read(self, key: str) -> contextlib.AbstractAsyncContextManager[StoredObject]:
        """`async with store.read(key) as stored`: its size, and `async for chunk in stored`. ObjectMissing
        when there is none."""
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        """Delete the object (none: nothing happens)."""
        raise NotImplementedError

    async def delete_prefix(self, prefix: str) -> None:
        """Delete every object under `prefix` (a folder: it ends with "/"); none: nothing happens."""
        raise NotImplementedError


def object_store(url: str, endpoint_url: str = "", region: str = "") -> ObjectStore:
    """`s3://bucket/prefix` or a directory."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{url}: an S3 object store is s3://BUCKET or s3://BUCKET/PREFIX")
        return S3Objects(parts.netloc, parts.path.strip("/"), endpoint_url or None, region or None)
    if parts.scheme not in ("", "file"):
        raise ValueError(f"{url}: the object store is s3://BUCKET/PREFIX or a directory")
    return LocalObjects(Path(parts.path if parts.scheme == "file" else url).expanduser())


async def parts_of(chunks: AsyncIterable[bytes], size: int) -> AsyncIterator[bytes]:
    """`chunks` regrouped into parts of at least `size` bytes (the last may be shorter; none for no bytes), each
    joined once from the chunks it holds."""
    pending, held = [], 0
    async for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        if held >= size:
            part, pending, held = b"".join(pending), [], 0
            yield part
    if pending:
        yield b"".join(pending)


class S3Objects(ObjectStore):
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, region: str | None):
        self.bucket, self.prefix = bucket, f"{prefix}/" if prefix else ""
        self.endpoint_url, self.region = endpoint_url, region
        self._exit = contextlib.AsyncExitStack()
        self.client = None

    async def start(self) -> None:
        config = AioConfig(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                           max_pool_connections=64)
        self.client = await self._exit.enter_async_context(get_session().create_client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config))

    async def close(self) -> None:
        await self._exit.aclose()

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        name = self.prefix + key
        parts = parts_of(chunks, PART_BYTES)
        first = await anext(parts, b"")
        second = await anext(parts, None)
        if second is None:  # one part: one request
            await self.client.put_object(Bucket=self.bucket, Key=name, Body=first)
            return len(first)
        upload = (await self.client.create_multipart_upload(Bucket=self.bucket, Key=name))["UploadId"]
        try:
            done, size = [], 0

            async def send(number: int, data: bytes) -> None:
                answer = await self.client.upload_part(Bucket=self.bucket, Key=name, UploadId=upload,
                                                       PartNumber=number, Body=data)
                done.append({"PartNumber": number, "ETag": answer["ETag"]})

            for number, data in enumerate((first, second), start=1):
                await send(number, data)
                size += len(data)
            number = 2
            async for data in parts:
                number += 1
                await send(number, data)
                size += len(data)
            await self.client.complete_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload,
                                                        MultipartUpload={"Parts": done})
            return size
        except BaseException:
            with contextlib.suppress(*OBJECT_STORE_ERRORS):
                await asyncio.shield(self.client.abort_multipart_upload(Bucket=self.bucket, Key=name,
                                                                        UploadId=upload))
            raise

    @contextlib.asynccontextmanager
    async def read(self, key: str) -> AsyncIterator[StoredObject]:
        try:
            answer = await self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectMissing(key) from None
            raise
        async with answer["Body"] as body:
            yield StoredObject(answer["ContentLength"], body.iter_chunks(READ_CHUNK_BYTES))

    async def delete(self, key: str) -> None:
        await self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    async def delete_prefix(self, prefix: str) -> None:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        async for page in pages:
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                await self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})


class LocalObjects(ObjectStore):
    """Files under a directory (mode 0700), each written under a temporary name and renamed when complete."""

    def __init__(self, directory: Path):
        self.directory = directory

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, key: str) -> Path:
        path = (self.directory / key).resolve()
        if not path.is_relative_to(self.directory.resolve()):
            raise ValueError(f"{key}: outside the object store")
        return path

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        path = self._path(key)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        size = 0
        file = await asyncio.to_thread(open, partial, "wb")
        try:
            async for part in parts_of(chunks, READ_CHUNK_BYTES * 4):
                await asyncio.to_thread(file.write, part)
                size += len(part)
            await asyncio.to_thread(file.close)
            await asyncio.to_thread(os.replace, partial, path)
        except BaseException:
            file.close()
            partial.unlink(missing_ok=True)
            raise
        return size

    @contextlib.asynccontextmanager
    async def read(self, key: str) -> AsyncIterator[StoredObject]:
        try:
            file = await asyncio.to_thread(open, self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectMissing(key) from None

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await asyncio.to_thread(file.read, READ_CHUNK_BYTES):
                yield chunk

        try:
            yield StoredObject(os.fstat(file.fileno()).st_size, chunks())
        finally:
            file.close()

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    async def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
        for parent in path.parents:  # the job's and its client's folders, once empty
            if parent == self.directory.resolve() or not await asyncio.to_thread(_remove_if_empty, parent):
                break


def _remove_if_empty(directory: Path) -> bool:
    try:
        directory.rmdir()
    except OSError:  # not empty, or gone
        return False
    return True
