#!/usr/bin/env python3
"""Checks the declared MSRV (package.rust-version) against the crate's normal
(non-dev) dependency tree: no dependency may need a newer Rust than we claim.
Only one toolchain can be installed here, so this plus clippy's
`incompatible_msrv` lint (which reads rust-version) is how the MSRV is checked."""
import json
import subprocess
import sys

meta = json.loads(subprocess.check_output(
    ["cargo", "metadata", "--format-version", "1", "--all-features"]))
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
root = next(p for p in meta["packages"] if p["name"] == "upstream-guard")


def version(v):
    parts = [int(x) for x in (v or "0").split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


ours = version(root["rust_version"])
seen, stack, bad = set(), [root["id"]], []
while stack:
    pid = stack.pop()
    if pid in seen:
        continue
    seen.add(pid)
    for dep in nodes[pid]["deps"]:
        if any(k["kind"] is None for k in dep["dep_kinds"]):
            stack.append(dep["pkg"])
for pid in seen:
    p = packages[pid]
    if version(p.get("rust_version")) > ours:
        bad.append(f'{p["name"]} {p["version"]} needs Rust {p["rust_version"]}')
if bad:
    print(f"MSRV {root['rust_version']} is too low for:\n  " + "\n  ".join(bad))
    sys.exit(1)
print(f"MSRV {root['rust_version']}: {len(seen)} normal dependencies agree")
