#!/usr/bin/env python3
"""The crate's rust-version must be at least the highest rust-version that any
locked dependency declares: that is the true minimum, since cargo refuses to
build a dependency with an older compiler. (No older toolchain can be installed
on these machines to try it, so it is derived from the lock file instead.)"""
import json
import pathlib
import re
import subprocess
import sys

root = pathlib.Path(__file__).resolve().parent.parent
meta = json.loads(subprocess.run(
    ["cargo", "metadata", "--format-version", "1", "--locked"],
    cwd=root, check=True, capture_output=True, text=True).stdout)


def version(text):
    parts = [int(x) for x in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


ours = None
needed, by = (0,), "nothing"
for package in meta["packages"]:
    declared = package.get("rust_version")
    if package["source"] is None and package["name"] == "line-retry-proxy":
        ours = declared
    elif declared and version(declared) > needed:
        needed, by = version(declared), f"{package['name']} {package['version']}"

if ours is None:
    sys.exit("check-msrv: Cargo.toml declares no rust-version")
if version(ours) < needed:
    sys.exit(f"check-msrv: rust-version {ours} is below {'.'.join(map(str, needed))}, "
             f"which {by} needs")
print(f"check-msrv: rust-version {ours} (highest a locked dependency needs: "
      f"{'.'.join(map(str, needed))}, {by})")
