"""`semi-llie shards merge OUT`: join the part manifests of a `--part I/N` build into OUT/manifest.json.

Checks that all N parts are present, that they were built with the same arguments, that no key appears
twice, and runs the leak guard over the whole dataset (parts only see their own samples).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from semi_llie.data.build import check_overlaps, manifest_dict
from semi_llie.data.build_cli import statistics_lines
from semi_llie.data.manifest import MANIFEST_NAME, part_manifest_name, read_json
from semi_llie.data.sources import SPLITS
from semi_llie.errors import UserError
from semi_llie.fileio import write_json_atomic

_PART_NAME = re.compile(r"manifest\.part-(\d+)-of-(\d+)\.json$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out", type=Path, help="folder holding the parts' shards and manifest.part-I-of-N.json"
    )


def main(args: argparse.Namespace) -> int:
    manifest = merge_parts(args.out)
    print(
        f"merged {manifest['builder']['merged_parts']} parts: {len(manifest['samples'])} samples in "
        f"{len(manifest['shards'])} shards -> {args.out / MANIFEST_NAME}"
    )
    for line in statistics_lines(manifest):
        print(line)
    return 0


def merge_parts(out: Path) -> dict:
    found = {
        (int(m[1]), int(m[2])): p
        for p in sorted(out.glob("manifest.part-*.json"))
        if (m := _PART_NAME.match(p.name))
    }
    if not found:
        raise UserError(f"no manifest.part-I-of-N.json in {out}; build the parts with --part I/N --out {out}")
    counts = {count for _, count in found}
    if len(counts) > 1:
        raise UserError(
            f"{out} holds parts of different N ({sorted(counts)}); remove the stale part manifests"
        )
    count = counts.pop()
    missing = [part_manifest_name(i, count) for i in range(1, count + 1) if (i, count) not in found]
    if missing:
        raise UserError(f"{out} is missing {', '.join(missing)}; build those parts before merging")

    parts = [read_json(found[(i, count)]) for i in range(1, count + 1)]
    reference = parts[0]["builder"]["arguments"]
    for index, part in enumerate(parts[1:], start=2):
        differing = sorted(
            k
            for k in reference.keys() | part["builder"]["arguments"].keys()
            if reference.get(k) != part["builder"]["arguments"].get(k)
        )
        if differing:
            raise UserError(
                f"{part_manifest_name(index, count)} was built with other arguments than part 1 "
                f"({', '.join(differing)}); rebuild it with the same arguments"
            )

    records = [record for part in parts for record in part["samples"]]
    seen: dict[str, int] = {}
    for index, part in enumerate(parts, start=1):
        for record in part["samples"]:
            if record["key"] in seen:
                raise UserError(
                    f"sample {record['key']!r} is in parts {seen[record['key']]} and {index}; rebuild"
                )
            seen[record["key"]] = index
    if not reference["allow_overlap"]:
        check_overlaps(records, reference["overlap_distance"])

    shards = sorted(
        (s for part in parts for s in part["shards"]), key=lambda s: (SPLITS.index(s["split"]), s["name"])
    )
    manifest = manifest_dict(
        reference,
        None,
        shards,
        records,
        [r for part in parts for r in part["skipped"]],
        [p for part in parts for p in part["ignored"]],
        parts=count,
    )
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest
