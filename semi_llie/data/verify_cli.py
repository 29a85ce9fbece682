"""`semi-llie shards verify LOCATION`: re-read every shard and compare it with the manifest.

Reports missing, truncated (shorter than recorded), altered (other bytes, other size) and unreadable
shards, and shards whose samples differ from the manifest's; exits 1 when anything is wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tarfile
from collections import Counter

from tqdm import tqdm
from webdataset.gopen import gopen

from semi_llie.data.manifest import Manifest, ShardEntry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("location", help="shard folder (or URL / pipe: location) holding manifest.json")


def main(args: argparse.Namespace) -> int:
    manifest = Manifest.open(args.location)
    keys_by_shard = Counter(record["shard"] for record in manifest.data["samples"])
    problems = []
    for shard in tqdm(manifest.shards, desc="verify", unit="shard"):
        problem = check_shard(manifest, shard, keys_by_shard[shard.name])
        if problem:
            problems.append(problem)
    for problem in problems:
        print(f"BAD {problem}")
    total = sum(s.samples for s in manifest.shards)
    status = f"{len(problems)} bad shard(s)" if problems else "all shards OK"
    print(f"verified {len(manifest.shards)} shards, {total} samples at {args.location}: {status}")
    return 1 if problems else 0


def check_shard(manifest: Manifest, shard: ShardEntry, recorded_samples: int) -> str | None:
    """A one-line description of what is wrong with `shard`, or None when it matches the manifest."""
    url = manifest.url(shard)
    try:
        with gopen(url, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        return f"{url}: missing"
    except OSError as err:
        return f"{url}: unreadable ({err})"
    if len(data) < shard.bytes:
        return f"{url}: truncated ({len(data)} of {shard.bytes} bytes)"
    if len(data) != shard.bytes or hashlib.sha256(data).hexdigest() != shard.sha256:
        return f"{url}: altered (sha256 or size differs from the manifest)"
    samples = _count_samples(data)
    if samples is None:
        return f"{url}: not a readable tar file"
    if samples != shard.samples or samples != recorded_samples:
        return f"{url}: holds {samples} samples, the manifest lists {shard.samples}"
    return None


def _count_samples(data: bytes) -> int | None:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            return len({member.name.split(".", 1)[0] for member in tar.getmembers() if member.isfile()})
    except tarfile.TarError:
        return None
