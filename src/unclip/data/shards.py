"""Shard specifications -> lists of shard URLs, with the checks that can be made cheaply up front.

A specification is a string or a list of strings, each one of:
    "data/{00000..00099}.tar"          brace pattern (webdataset syntax, "::" joins several)
    "data/train-*.tar"                 local glob (sorted)
    "pipe:aws s3 cp s3://b/{0..9}.tar -"  a shell command whose stdout is a tar
    "https://host/{000..009}.tar"      any URL scheme webdataset's gopen knows

`read_tar_samples` reads one local shard whole, for the offline tools (probes, subsets) that need every
sample of a few shards rather than a stream.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Sequence
from urllib.parse import urlparse

from webdataset.gopen import gopen_schemes
from webdataset.shardlists import expand_urls

GLOB_CHARS = ("*", "?", "[")


def is_local(url: str) -> bool:
    """True for plain paths and file: URLs (the ones we can check for existence)."""
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand braces, "::" lists and (local) globs; local paths become absolute.

    Raises ValueError naming the pattern when it matches nothing, when a local shard does not exist, or
    when a URL scheme has no webdataset opener. Remote shards are not opened here: checking them means a
    network round trip per shard, so a missing remote shard shows up as an "unreadable_shard" count.
    """
    patterns = [spec] if isinstance(spec, str) else [str(p) for p in spec]
    urls: list[str] = []
    for pattern in patterns:
        found = [u for part in expand_urls(pattern) for u in _resolve(part, pattern)]
        if not found:
            raise ValueError(f"shard pattern {pattern!r} matches no shard")
        urls.extend(found)
    if not urls:
        raise ValueError(f"shard specification {spec!r} is empty")
    return urls


def _resolve(url: str, pattern: str) -> list[str]:
    if not is_local(url):
        scheme = urlparse(url).scheme
        if scheme not in gopen_schemes:
            hint = f" (use 'pipe:aws s3 cp {url} -')" if scheme == "s3" else ""
            raise ValueError(
                f"shard pattern {pattern!r}: webdataset has no opener for '{scheme}:' URLs{hint}; "
                f"known schemes: {sorted(k for k in gopen_schemes if not k.startswith('_'))}"
            )
        return [url]
    path = os.path.abspath(os.path.expanduser(_local_path(url)))
    if any(c in path for c in GLOB_CHARS):
        return sorted(glob.glob(path))
    if not os.path.isfile(path):
        raise ValueError(f"shard pattern {pattern!r}: local shard {path} does not exist")
    return [path]


def read_tar_samples(path: str) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of every file in one WebDataset tar shard, keys split from extensions as the
    training loader splits them (webdataset's `base_plus_ext`: the first dot of the file name, so "./0001.jpg"
    and "a.b/0001.jpg" are read too). Raises ValueError naming the shard when it is not a readable tar
    (empty, truncated)."""
    from webdataset.tariterators import base_plus_ext

    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name) if member.isfile() else (None, None)
                if key is not None:
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
            end = tar.offset  # where tarfile stopped: a whole archive ends in a zero block there
        with open(path, "rb") as f:
            f.seek(end)
            block = f.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE or block.strip(b"\0"):  # tarfile ends quietly on a cut header
            raise tarfile.ReadError(f"truncated after {len(samples)} samples")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable tar shard ({err})") from err
    return samples
