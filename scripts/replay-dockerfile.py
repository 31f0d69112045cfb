#!/usr/bin/env python3
"""Replays the Dockerfile's build stage without a container engine, so CI proves the
image can be built from exactly what the Dockerfile copies.

Usage: replay-dockerfile.py [--dockerfile FILE] [--context DIR] [--keep]

It reads the Dockerfile (so the replay cannot drift from it), finds the stages that a
later stage copies from (`COPY --from=NAME`), and for each one:
  - gives it an empty directory standing for the image's filesystem root;
  - follows its WORKDIR, ENV and ARG lines;
  - copies what each COPY line copies from the build context, honouring .dockerignore,
    and nothing else;
  - runs each RUN line there, in the stage's WORKDIR, and fails when one fails.
Then it checks that every `COPY --from=` of the later stages names a path the replayed
stage produced, and that every plain COPY source exists in the context.

What it cannot replay it refuses, naming the line, instead of guessing: ADD, SHELL,
heredocs, RUN --mount, a stage built on another stage, and absolute paths in a RUN line
(the stage's root is a temporary directory, so `RUN build /out` would write to the
host's /out: build into a directory under WORKDIR instead).

The base image is not fetched: its tools come from this machine (for the build stage,
the Rust toolchain on PATH). The environment of each RUN is this process's environment
plus the stage's ARG and ENV values, so CARGO_TARGET_DIR may point at a warm target
directory to reuse compiled dependencies; the crate itself is still compiled from the
copied sources, whose files are new.
"""
import argparse
import fnmatch
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Instructions that change nothing a later COPY --from can see; the replay skips them.
NO_FILESYSTEM_EFFECT = {"LABEL", "EXPOSE", "CMD", "ENTRYPOINT", "HEALTHCHECK", "STOPSIGNAL",
                        "VOLUME", "MAINTAINER", "USER", "ONBUILD"}


class ReplayError(Exception):
    pass


class Instruction:
    def __init__(self, lineno, keyword, args):
        self.lineno = lineno
        self.keyword = keyword
        self.args = args

    def __str__(self):
        return f"line {self.lineno}: {self.keyword} {self.args}"


def parse_dockerfile(text):
    """Instructions with continuation lines joined and comments dropped."""
    lines = text.splitlines()
    for line in lines:
        m = re.match(r"#\s*escape\s*=\s*(\S)", line)
        if m and m.group(1) != "\\":
            raise ReplayError("a custom escape character is not supported")
        if not line.startswith("#"):
            break
    out = []
    i = 0
    while i < len(lines):
        start = i
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        parts = []
        while line.endswith("\\"):
            parts.append(line[:-1])
            # Comment and blank lines inside a continuation are dropped, as Docker does.
            while i < len(lines) and (not lines[i].strip() or lines[i].strip().startswith("#")):
                i += 1
            if i >= len(lines):
                line = ""
                break
            line = lines[i].strip()
            i += 1
        parts.append(line)
        joined = " ".join(p.strip() for p in parts).strip()
        keyword, _, args = joined.partition(" ")
        if "<<" in args and keyword.upper() in ("RUN", "COPY"):
            raise ReplayError(f"line {start + 1}: heredocs are not supported by the replay")
        out.append(Instruction(start + 1, keyword.upper(), args.strip()))
    return out


class Stage:
    def __init__(self, index, base, name, lineno):
        self.index = index
        self.base = base
        self.name = name
        self.lineno = lineno
        self.instructions = []
        self.root = None  # the replayed filesystem root, for replayed stages

    def label(self):
        return self.name or str(self.index)


def split_stages(instructions):
    stages = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = None
            if len(words) == 3 and words[1].lower() == "as":
                name = words[2]
            elif len(words) != 1:
                raise ReplayError(f"{ins}: cannot parse")
            stages.append(Stage(len(stages), words[0], name, ins.lineno))
        elif not stages:
            if ins.keyword != "ARG":
                raise ReplayError(f"{ins}: before the first FROM")
        else:
            stages[-1].instructions.append(ins)
    if not stages:
        raise ReplayError("no FROM line")
    return stages


def take_flags(args):
    """Splits leading --flag[=value] words from a COPY/RUN argument string."""
    flags = {}
    rest = args
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        name, _, value = word[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    return flags, rest


def copy_operands(ins):
    flags, rest = take_flags(ins.args)
    if rest.startswith("["):
        try:
            words = json.loads(rest)
        except json.JSONDecodeError as e:
            raise ReplayError(f"{ins}: bad JSON form: {e}") from e
    else:
        words = shlex.split(rest)
    if len(words) < 2:
        raise ReplayError(f"{ins}: needs a source and a destination")
    return flags, words[:-1], words[-1]


def stage_by_ref(stages, ref, ins):
    for s in stages:
        if s.name == ref or str(s.index) == ref:
            return s
    return None


class DockerIgnore:
    """The context filter of .dockerignore: Go filepath.Match patterns plus `**`; a path
    is excluded when the last pattern matching it or one of its parent directories is
    not an exception (`!`)."""

    def __init__(self, context):
        self.rules = []
        path = context / ".dockerignore"
        if path.is_file():
            for raw in path.read_text().splitlines():
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                negate = line.startswith("!")
                if negate:
                    line = line[1:].strip()
                pattern = posixpath.normpath(line.lstrip("/"))
                self.rules.append((self._regex(pattern), negate))

    @staticmethod
    def _regex(pattern):
        out = []
        i = 0
        while i < len(pattern):
            c = pattern[i]
            if pattern.startswith("**", i):
                out.append(".*")
                i += 2
                if pattern.startswith("/", i):
                    out[-1] = "(?:.*/)?"
                    i += 1
                continue
            if c == "*":
                out.append("[^/]*")
            elif c == "?":
                out.append("[^/]")
            elif c == "[":
                end = pattern.find("]", i + 1)
                if end < 0:
                    out.append(re.escape(c))
                else:
                    cls = pattern[i + 1:end]
                    if cls.startswith("^"):
                        cls = "!" + cls[1:]
                    out.append("[" + ("^" + cls[1:] if cls.startswith("!") else cls) + "]")
                    i = end
            elif c == "\\" and i + 1 < len(pattern):
                i += 1
                out.append(re.escape(pattern[i]))
            else:
                out.append(re.escape(c))
            i += 1
        return re.compile("".join(out) + r"\Z")

    def excluded(self, rel):
        """rel: a path relative to the context, with '/' separators."""
        candidates = []
        parts = rel.split("/")
        for n in range(1, len(parts) + 1):
            candidates.append("/".join(parts[:n]))
        excluded = False
        for regex, negate in self.rules:
            if any(regex.match(c) for c in candidates):
                excluded = not negate
        return excluded

    def prunable(self, rel):
        """A directory that is excluded and that no exception can bring back."""
        return self.excluded(rel) and not any(negate for _, negate in self.rules)


def resolve_in_root(root, container_path):
    """The host path of an absolute container path inside a stage's root."""
    clean = posixpath.normpath("/" + container_path.lstrip("/"))
    return root / clean.lstrip("/") if clean != "/" else root


def context_sources(context, ignore, src, ins):
    """The context entries a COPY source names (wildcards expanded), minus .dockerignore."""
    clean = posixpath.normpath(src)
    if clean.startswith("..") or clean.startswith("/"):
        clean = posixpath.normpath(clean.lstrip("/"))
        if clean.startswith(".."):
            raise ReplayError(f"{ins}: source {src} is outside the build context")
    if any(ch in clean for ch in "*?["):
        matches = []
        parent = posixpath.dirname(clean)
        base = context / parent if parent else context
        if base.is_dir() and not any(ch in parent for ch in "*?["):
            for entry in sorted(os.listdir(base)):
                rel = posixpath.join(parent, entry) if parent else entry
                if fnmatch.fnmatchcase(rel, clean) and not ignore.excluded(rel):
                    matches.append(rel)
        else:
            raise ReplayError(f"{ins}: wildcards in directory names are not supported")
        return matches
    if clean == ".":
        return ["."]
    path = context / clean
    if not (path.exists() or path.is_symlink()) or ignore.excluded(clean):
        return []
    return [clean]


def copy_tree(context, ignore, rel, dest):
    """Copies a context directory's contents (not the directory itself) into dest."""
    copied = 0
    top = context / rel if rel != "." else context
    dest.mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        rel_here = here.relative_to(context).as_posix()
        keep = []
        for d in sorted(dirnames):
            rel_d = d if rel_here == "." else f"{rel_here}/{d}"
            if ignore.prunable(rel_d):
                continue
            if (here / d).is_symlink():
                if not ignore.excluded(rel_d):
                    copy_one(here / d, dest / (here / d).relative_to(top))
                    copied += 1
                continue
            keep.append(d)
            (dest / (here / d).relative_to(top)).mkdir(parents=True, exist_ok=True)
        dirnames[:] = keep
        for f in sorted(filenames):
            rel_f = f if rel_here == "." else f"{rel_here}/{f}"
            if ignore.excluded(rel_f):
                continue
            copy_one(here / f, dest / (here / f).relative_to(top))
            copied += 1
    return copied


def copy_one(src, dest):
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        os.symlink(os.readlink(src), dest)
    else:
        # Content and mode, and a new mtime: cargo then compiles the copy instead of
        # taking the crate from a shared target directory whose build saw the same times.
        shutil.copy(src, dest)


def run_copy(stage, ins, context, ignore, workdir):
    flags, sources, dest = copy_operands(ins)
    unsupported = set(flags) - {"chown", "chmod", "link"}
    if unsupported:
        raise ReplayError(f"{ins}: --{', --'.join(sorted(unsupported))} is not supported by the replay")
    dest_path = dest if dest.startswith("/") else posixpath.join(workdir, dest)
    expanded = []
    for src in sources:
        found = context_sources(context, ignore, src, ins)
        if not found:
            raise ReplayError(f"{ins}: {src} is not in the build context (missing, or excluded by .dockerignore)")
        expanded.extend(found)
    into_dir = dest.endswith("/") or len(expanded) > 1 or any(ch in s for s in sources for ch in "*?[")
    host_dest = resolve_in_root(stage.root, dest_path)
    copied = 0
    for rel in expanded:
        src_path = context / rel if rel != "." else context
        if src_path.is_dir() and not src_path.is_symlink():
            copied += copy_tree(context, ignore, rel, host_dest)
        else:
            target = host_dest / posixpath.basename(rel) if into_dir or host_dest.is_dir() else host_dest
            copy_one(src_path, target)
            copied += 1
    return copied


# Paths of the base image's own tools, which the replay takes from this machine.
HOST_PATHS = ("/dev/", "/bin/", "/usr/bin/")


def check_relative(ins, words):
    for w in words:
        if w.startswith("/") and not w.startswith(HOST_PATHS):
            raise ReplayError(
                f"{ins}: {w} is an absolute path; the replay runs in a temporary root and can "
                "follow only paths relative to WORKDIR")


def run_run(stage, ins, workdir, env):
    flags, rest = take_flags(ins.args)
    if flags:
        raise ReplayError(f"{ins}: RUN --{', --'.join(sorted(flags))} is not supported by the replay")
    if rest.startswith("["):
        argv = json.loads(rest)
        check_relative(ins, argv)
    else:
        check_relative(ins, shlex.split(rest, comments=True))
        argv = ["/bin/sh", "-c", rest]
    cwd = resolve_in_root(stage.root, workdir)
    cwd.mkdir(parents=True, exist_ok=True)
    print(f"replay-dockerfile: [{stage.label()}] RUN {rest}  (in {workdir})", flush=True)
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, env=env)
    took = time.monotonic() - started
    if proc.returncode != 0:
        raise ReplayError(f"{ins}: exited {proc.returncode} after {took:.0f}s")
    print(f"replay-dockerfile: [{stage.label()}] RUN ok in {took:.0f}s", flush=True)


def parse_env(args, ins):
    words = shlex.split(args)
    if words and "=" not in words[0]:
        # Legacy form: ENV NAME value with spaces
        return {words[0]: args.split(None, 1)[1] if len(args.split(None, 1)) > 1 else ""}
    out = {}
    for w in words:
        if "=" not in w:
            raise ReplayError(f"{ins}: cannot parse {w}")
        k, _, v = w.partition("=")
        out[k] = v
    return out


def replay_stage(stage, stages, context, ignore, tmp):
    if stage_by_ref(stages, stage.base, None) is not None:
        raise ReplayError(f"line {stage.lineno}: a stage built on another stage is not supported by the replay")
    stage.root = tmp / f"stage-{stage.label()}"
    stage.root.mkdir()
    workdir = "/"
    env = dict(os.environ)
    copied = runs = 0
    for ins in stage.instructions:
        if "$" in ins.args and ins.keyword in ("WORKDIR", "COPY"):
            raise ReplayError(f"{ins}: variables in {ins.keyword} are not supported by the replay")
        if ins.keyword == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, ins.args))
            resolve_in_root(stage.root, workdir).mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            flags, _, _ = copy_operands(ins)
            if "from" in flags:
                raise ReplayError(f"{ins}: COPY --from inside a replayed stage is not supported")
            copied += run_copy(stage, ins, context, ignore, workdir)
        elif ins.keyword == "RUN":
            run_run(stage, ins, workdir, env)
            runs += 1
        elif ins.keyword == "ENV":
            env.update(parse_env(ins.args, ins))
        elif ins.keyword == "ARG":
            name, eq, default = ins.args.partition("=")
            if eq:
                env[name] = default.strip('"')
        elif ins.keyword in NO_FILESYSTEM_EFFECT:
            continue
        else:
            raise ReplayError(f"{ins}: {ins.keyword} is not supported by the replay")
    if runs == 0:
        raise ReplayError(f"stage {stage.label()}: no RUN line, nothing was built")
    return copied, runs


def check_later_stage(stage, stages, context, ignore):
    checked = []
    for ins in stage.instructions:
        if ins.keyword == "ADD":
            raise ReplayError(f"{ins}: ADD is not supported by the replay; use COPY")
        if ins.keyword != "COPY":
            continue
        flags, sources, _ = copy_operands(ins)
        ref = flags.get("from")
        if ref is None:
            for src in sources:
                if not context_sources(context, ignore, src, ins):
                    raise ReplayError(f"{ins}: {src} is not in the build context")
                checked.append(src)
            continue
        source_stage = stage_by_ref(stages, ref, ins)
        if source_stage is None or source_stage.root is None:
            raise ReplayError(f"{ins}: --from={ref} is not a replayed stage of this Dockerfile")
        for src in sources:
            if not src.startswith("/"):
                raise ReplayError(f"{ins}: {src}: use an absolute path in COPY --from")
            host = resolve_in_root(source_stage.root, src)
            if not (host.exists() or host.is_symlink()):
                raise ReplayError(f"{ins}: {src} was not produced by stage {source_stage.label()}")
            checked.append(f"{ref}:{src}")
    return checked


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dockerfile", type=Path, default=ROOT / "Dockerfile")
    parser.add_argument("--context", type=Path, default=ROOT)
    parser.add_argument("--keep", action="store_true", help="keep the replay directory and print its path")
    args = parser.parse_args()
    context = args.context.resolve()

    try:
        stages = split_stages(parse_dockerfile(args.dockerfile.read_text()))
        referenced = []
        for later in stages:
            for ins in later.instructions:
                if ins.keyword == "COPY":
                    ref = copy_operands(ins)[0].get("from")
                    src_stage = stage_by_ref(stages, ref, ins) if ref else None
                    if src_stage is not None and src_stage not in referenced:
                        if src_stage.index >= later.index:
                            raise ReplayError(f"{ins}: copies from a later stage")
                        referenced.append(src_stage)
        if not referenced:
            raise ReplayError("no stage is copied from: nothing to replay")
        ignore = DockerIgnore(context)
        tmp = Path(tempfile.mkdtemp(prefix="replay-dockerfile-"))
        try:
            summary = []
            for stage in sorted(referenced, key=lambda s: s.index):
                copied, runs = replay_stage(stage, stages, context, ignore, tmp)
                summary.append(f"stage {stage.label()}: {copied} files copied, {runs} RUN")
            for stage in stages:
                if stage not in referenced:
                    checked = check_later_stage(stage, stages, context, ignore)
                    summary.append(f"stage {stage.label()}: {len(checked)} COPY sources present")
        finally:
            if args.keep:
                print(f"replay-dockerfile: kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    except ReplayError as e:
        print(f"replay-dockerfile: FAIL {args.dockerfile.name} {e}", file=sys.stderr)
        sys.exit(1)
    print(f"replay-dockerfile: ok ({'; '.join(summary)})")


if __name__ == "__main__":
    main()
