#!/usr/bin/env python
"""Issue 8 probe: every bad input and fault of its sections 2-4 through the real CLI, as a new
user meets them, plus the section 5 behaviours a user sees.

Each bad input runs `python -m builder ...` in a subprocess of this checkout and must give:
exit code 2, exactly one stderr line starting with `error:`, no `Traceback`, a message naming
the file / field / tensor / layer / path, no OUT (and no finished-looking staging directory),
and every input directory byte-identical before and after (sha256 of every file, symlinks
listed with their targets). Faults (kill -9 of `convert --workers 2`, two conversions on one
OUT) are checked by pid. Nothing is mocked: the read-only filesystem is a real read-only
tmpfs mounted in a user+mount namespace (`unshare -rm`).

    PYTHONPATH=$PWD .venv/bin/python scripts/probe_bad_inputs.py [--workdir DIR] [--keep]

Prints one line per probe (PASS/FAIL, seconds, the error line) and a summary; exit 0 only
when every probe passes. `--json FILE` writes the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ENV.pop("FORCE_COLOR", None)


# ---- running the CLI ----------
@dataclass
class Run:
    args: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def cli(*args: object, prefix: Iterable[str] = (), timeout: float = 900, env=None) -> Run:
    argv = [*prefix, PY, "-m", "builder", *[str(a) for a in args]]
    started = time.monotonic()
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env or ENV, timeout=timeout, check=False
    )
    return Run(
        [str(a) for a in args],
        done.returncode,
        done.stdout,
        done.stderr,
        time.monotonic() - started,
    )


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file under root (links followed), and each symlink's target."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key + " ->"] = os.readlink(path)
        if path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# ---- results ----------
@dataclass
class Result:
    section: str
    name: str
    ok: bool
    seconds: float
    detail: str
    problems: list[str] = field(default_factory=list)
    kind: str = "check"


RESULTS: list[Result] = []


def record(
    section: str, name: str, problems: list[str], seconds: float, detail: str, kind="check"
) -> None:
    result = Result(section, name, not problems, round(seconds, 1), detail, problems, kind)
    RESULTS.append(result)
    mark = "PASS" if result.ok else "FAIL"
    print(f"{mark} [{section}] {name} ({result.seconds} s): {detail}", flush=True)
    for problem in problems:
        print(f"     - {problem}", flush=True)


def bad_input(
    section: str,
    name: str,
    args: list[object],
    names: Iterable[str],
    out: Path | None = None,
    guard: Iterable[Path] = (),
    prefix: Iterable[str] = (),
    out_before: dict[str, str] | None = None,
    report: bool = False,
) -> Run:
    """Run a bad input; check exit 2, one error line naming `names`, no traceback, no output
    that looks complete, every `guard` path unchanged. `report`: a report command (check)
    that lists its findings on stdout and ends with one error line; names are looked for in
    both."""
    guard = [Path(g) for g in guard]
    before = {g: tree_hash(g) for g in guard}
    run = cli(*args, prefix=prefix)
    problems = []
    if run.rc != 2:
        problems.append(f"exit code {run.rc}, expected 2")
    if len(run.error_lines) != 1:
        problems.append(f"{len(run.error_lines)} lines start with 'error:' on stderr")
    if "Traceback" in run.stdout + run.stderr:
        problems.append("a Traceback was printed")
    line = run.error_lines[0] if run.error_lines else run.stderr.strip()[-300:]
    named = line + ("\n" + run.stdout if report else "")
    for fragment in names:
        if fragment not in named:
            problems.append(f"error line does not name {fragment!r}")
    if out is not None:
        if out_before is None and (out.exists() or out.is_symlink()):
            problems.append(f"{out} exists after the failed run")
        if out_before is not None and tree_hash(out) != out_before:
            problems.append(f"{out} (there before) was changed")
        stage = out.with_name(f".{out.name}.partial")
        if stage.exists() and (stage / "manifest.json").exists():
            problems.append(f"{stage} holds a manifest.json (looks complete)")
    for g in guard:
        if not g.exists() or tree_hash(g) != before[g]:
            problems.append(f"input {g} was modified or deleted")
    if report:
        line = " | ".join([*run.stdout.strip().splitlines()[-1:], line])
    record(section, name, problems, run.seconds, line, kind="bad input")
    return run


def expect(section: str, name: str, checks: list[tuple[bool, str]], seconds: float, detail: str):
    record(section, name, [what for ok, what in checks if not ok], seconds, detail)


# ---- inputs ----------
def copy_of(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))


def first_shard(ckpt: Path) -> Path:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return ckpt / min(index["weight_map"].values())


def edit_tensor(ckpt: Path, name: str, change) -> None:
    from safetensors.torch import load_file, save_file

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    file = ckpt / index["weight_map"][name]
    tensors = load_file(file)
    change(tensors[name])
    save_file(tensors, str(file), metadata={"format": "pt"})


def block_edit(index: int, part: str | None, **fields):
    def change(config):
        block = config["block_configs"][index]
        (block if part is None else block[part]).update(fields)

    return change


# ---- section 2: config and index ----------
CONFIG_CASES = {
    "config.json is valid JSON but not an object": (lambda c: [c], ["config.json", "an object"]),
    "numeric field given as a string": (
        lambda c: c.update(hidden_size="256"),
        ["config.json", "hidden_size"],
    ),
    "zero attention heads": (
        lambda c: c.update(num_attention_heads=0),
        ["config.json", "num_attention_heads"],
    ),
    "rope_scaling of the wrong type": (
        lambda c: c.update(rope_scaling=[8.0]),
        ["config.json", "rope_scaling"],
    ),
    "block_configs attention entry as a string": (
        block_edit(3, None, attention="no_op"),
        ["config.json", "block_configs[3].attention"],
    ),
    "block_configs ffn entry as a string": (
        block_edit(2, None, ffn="linear"),
        ["config.json", "block_configs[2].ffn"],
    ),
    'unknown key in a block_configs entry ("kind": "mamba")': (
        block_edit(4, None, kind="mamba"),
        ["config.json", "block_configs[4].kind", "unknown field"],
    ),
    "unknown key inside an attention entry": (
        block_edit(4, "attention", kind="mamba"),
        ["config.json", "block_configs[4].attention.kind", "unknown field"],
    ),
    "n_heads_in_group as a string": (
        block_edit(0, "attention", n_heads_in_group="8"),
        ["config.json", "block_configs[0].attention.n_heads_in_group"],
    ),
}

INDEX_CASES = {
    "weight_map of the wrong type": (
        lambda i: i.update(weight_map=["model-00001-of-00002.safetensors"]),
        ["model.safetensors.index.json", "weight_map"],
    ),
    "weight_map with a non-string value": (
        lambda i: i["weight_map"].update({"model.norm.weight": 3}),
        ["model.safetensors.index.json", 'weight_map["model.norm.weight"]'],
    ),
}


def probe_config_and_index(work: Path, mixed: Path) -> None:
    for number, (name, (change, names)) in enumerate(CONFIG_CASES.items()):
        src = copy_of(mixed, work / f"cfg{number}")
        edit_json(src / "config.json", change)
        for command in ("convert", "quantize"):
            out = work / f"cfg{number}-{command}"
            extra = ["--tp", "2"] if command == "convert" else ["--calib-size", "2"]
            bad_input(
                "2", f"{command}: {name}", [command, src, out, *extra], names, out, guard=[src]
            )
        bad_input("2", f"info: {name}", ["info", src], names, guard=[src])
    for number, (name, (change, names)) in enumerate(INDEX_CASES.items()):
        src = copy_of(mixed, work / f"idx{number}")
        edit_json(src / "model.safetensors.index.json", change)
        out = work / f"idx{number}-out"
        bad_input("2", f"convert: {name}", ["convert", src, out, "--tp", "2"], names, out, [src])
        out = work / f"idx{number}-q"
        bad_input("2", f"quantize: {name}", ["quantize", src, out], names, out, [src])


# ---- section 2: output locations the OS refuses ----------
SMALL_CALIB = ["--calib-size", "2", "--calib-seq-len", "16"]


def probe_read_only_and_file_out(work: Path, mixed: Path) -> None:
    ro = work / "ro"
    ro.mkdir()
    # a real read-only mount, visible only inside the command's own namespace
    for command, extra in (("convert", ["--tp", "2"]), ("quantize", SMALL_CALIB)):
        namespace = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o ro none {ro} && exec "$@"']
        bad_input(
            "2",
            f"{command}: OUT on a read-only filesystem (real ro tmpfs)",
            [command, mixed, ro / "out", *extra],
            [str(ro / ".out.partial"), "Read-only file system"],
            guard=[mixed],
            prefix=[*namespace, "sh"],
        )
    for command, extra in (
        ("convert", ["--tp", "2"]),
        ("quantize", SMALL_CALIB),
        ("build", ["--target", "h100x8-bf16", "--backend", "pytorch"]),
        ("reference", []),
    ):
        out = work / f"notes-{command}.txt"
        out.write_text("my notes\n")
        before = tree_hash(out)
        bad_input(
            "2",
            f"{command}: OUT an existing regular file, with --overwrite",
            [command, mixed, out, "--overwrite", *extra],
            [str(out), "file"],
            out,
            guard=[mixed],
            out_before=before,
        )


# ---- section 2: resume state ----------
def probe_resume_records(work: Path, mixed: Path) -> None:
    fresh = work / "resume-fresh"
    cli("convert", mixed, fresh, "--tp", "2")
    for number, (name, text) in enumerate(
        {
            "truncated": '{"rank": 0, "file": "rank0.safetensors", "size": ',
            "wrong type (a list)": "[1, 2, 3]",
            "size as a string": json.dumps({"rank": 0, "file": "rank0.safetensors", "size": "9"}),
        }.items()
    ):
        out = work / f"resume{number}"
        first = cli("convert", mixed, out, "--tp", "2", "--ranks", "0")
        record_file = work / f".resume{number}.partial" / "ranks" / "rank0.json"
        record_file.write_text(text)
        before = tree_hash(mixed)
        run = cli("convert", mixed, out, "--tp", "2", "--resume", "--json")
        statuses = []
        if run.rc == 0:
            statuses = [r["status"] for r in json.loads(run.stdout)["ranks"]]
        same = out.exists() and {
            k: v for k, v in tree_hash(out).items() if k != "manifest.json"
        } == {k: v for k, v in tree_hash(fresh).items() if k != "manifest.json"}
        expect(
            "2",
            f"convert --resume: resume record {name}",
            [
                (first.rc == 0, "the --ranks 0 run failed"),
                (run.rc == 0, f"exit code {run.rc} (design: a bad record is ignored, rank redone)"),
                ("Traceback" not in run.stderr, "a Traceback was printed"),
                (statuses == ["written", "written"], f"rank statuses {statuses}"),
                (same, "output differs from a fresh conversion"),
                (tree_hash(mixed) == before, "source modified"),
            ],
            run.seconds,
            f"exit {run.rc}, ranks {statuses}, byte-identical to a fresh run: {same}",
        )


def probe_quantize_resume_cache(work: Path, mixed: Path) -> None:
    """kill -9 of a real quantize once it saved its activation cache, then the cache is
    truncated (or state.json given a wrong type) and `quantize --resume` must say so."""
    out = work / "qresume"
    calib = work / ".qresume.calib"
    proc = subprocess.Popen(
        [PY, "-m", "builder", "quantize", mixed, out, "--format", "hf", "--save-every", "1"]
        + ["--calib-size", "8", "--calib-seq-len", "64"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    cache = calib / "inputs-rank0.safetensors"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if cache.is_file() and (calib / "state.json").is_file():
            state = json.loads((calib / "state.json").read_text() or "{}")
            if state.get("next_layer", 0) >= 2:
                break
        time.sleep(0.05)
    killed = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if not killed or not cache.is_file():
        record("2", "quantize --resume: truncated activation cache", ["run ended first"], 0, "")
        return
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    resume = ["quantize", mixed, out, "--format", "hf", "--resume", "--save-every", "1"]
    resume += ["--calib-size", "8", "--calib-seq-len", "64"]
    bad_input(
        "2",
        "quantize --resume: truncated calibration-activation cache (after kill -9)",
        resume,
        [str(cache), "--resume"],
        out,
        guard=[mixed],
    )
    edit_json(calib / "state.json", lambda s: s.update(next_layer="four"))
    bad_input(
        "2",
        "quantize --resume: state.json with a wrong-typed field",
        resume,
        [str(calib / "state.json"), "next_layer"],
        out,
        guard=[mixed],
    )


# ---- section 2/3: processes ----------
def alive(pids: Iterable[int]) -> set[int]:
    found = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.add(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def probe_kill_workers(work: Path, big: Path) -> None:
    """kill -9 of `convert --workers 2` while its workers write: every process it started is
    gone within 10 s (by pid), and --resume completes to an output `check` accepts."""
    out = work / "killed"
    stage = work / ".killed.partial"
    before = tree_hash(big)
    argv = [PY, "-m", "builder", "convert", big, out, "--tp", "4", "--pp", "2", "--workers", "2"]
    proc = subprocess.Popen(
        argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    me = psutil.Process(proc.pid)
    started: set[int] = set()
    deadline = time.monotonic() + 300
    writing = False
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            kids = me.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        started |= {k.pid for k in kids}
        workers = [k for k in kids if k.ppid() != proc.pid]
        writing = len(workers) >= 2 and any(stage.glob("rank*.tmp"))
        if writing:
            break
        time.sleep(0.02)
    if not writing:
        os.killpg(proc.pid, signal.SIGKILL)
        record("3", "kill -9 of convert --workers 2", ["never saw 2 workers writing"], 0, "")
        return
    started |= {k.pid for k in me.children(recursive=True)}
    os.kill(proc.pid, signal.SIGKILL)  # the parent only, as a user's kill -9 <pid>
    proc.wait()
    t0 = time.monotonic()
    left = alive(started)
    while left and time.monotonic() - t0 < 10:
        time.sleep(0.05)
        left = alive(left)
    gone_after = time.monotonic() - t0
    for pid in left:  # never leave them behind, whatever the verdict
        os.kill(pid, signal.SIGKILL)
    resumed = cli("convert", big, out, "--tp", "4", "--pp", "2", "--resume", "--json")
    checked = cli("check", out, "--source", big)
    expect(
        "3",
        "kill -9 of convert --workers 2: no orphan (by pid), then --resume completes",
        [
            (not left, f"processes outlived the killed conversion: {sorted(left)}"),
            (resumed.rc == 0, f"--resume exit {resumed.rc}: {resumed.stderr[-300:]}"),
            (checked.rc == 0, f"check exit {checked.rc}: {checked.stderr[-300:]}"),
            (tree_hash(big) == before, "source modified"),
        ],
        gone_after + resumed.seconds,
        f"{len(started)} child pids {sorted(started)} all gone {gone_after:.2f} s after the kill; "
        f"--resume exit {resumed.rc}, check exit {checked.rc}",
    )


def probe_two_conversions(work: Path, big: Path) -> None:
    """Two conversions on one OUT at once. The first is paused (SIGSTOP) once it holds the
    staging directory, so the overlap does not depend on the machine's speed."""
    out = work / "twice"
    stage = work / ".twice.partial"
    argv = [PY, "-m", "builder", "convert", big, out, "--tp", "2", "--json"]
    first = subprocess.Popen(
        argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(stage.glob("rank*.tmp")):
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = bad_input(
            "2",
            "convert: a second conversion on the same OUT while the first runs",
            ["convert", big, out, "--tp", "2", "--overwrite"],
            [str(stage), f"pid {first.pid}"],
            guard=[big],
        )
        del second
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=600)
    checked = cli("check", out, "--source", big, "--quick")
    expect(
        "2",
        "convert: the first of two conversions then finishes",
        [
            (first.returncode == 0, f"first run exit {first.returncode}: {stderr[-300:]}"),
            (checked.rc == 0, f"check exit {checked.rc}"),
        ],
        0,
        f"first run exit {first.returncode}, check exit {checked.rc}",
    )


# ---- section 3: OUT over an input ----------
def probe_out_over_input(work: Path, mixed: Path, trtllm: Path, golden_src: Path) -> None:
    build_dir = work / "where-build"
    cli("build", trtllm, build_dir, "--target", "h100x8-bf16", "--tp", "2", "--dry-run")
    commands = {
        "convert": lambda s, o: ["convert", s, o, "--tp", "2", "--overwrite"],
        "convert --dry-run": lambda s, o: [
            "convert",
            s,
            o,
            "--tp",
            "2",
            "--dry-run",
            "--overwrite",
        ],
        "quantize": lambda s, o: ["quantize", s, o, "--overwrite", *SMALL_CALIB],
        "build (engine, --dry-run)": lambda s, o: [
            *("build", s, o, "--target", "h100x8-bf16", "--tp", "2", "--dry-run", "--overwrite"),
        ],
        "build --backend pytorch": lambda s, o: [
            *("build", s, o, "--target", "h100x8-bf16", "--backend", "pytorch", "--overwrite"),
        ],
        "reference": lambda s, o: [
            *("reference", s, o, "--windows", "1", "--seq-len", "16", "--chat-prompts", "1"),
            *("--continuation", "2", "--probe-len", "4", "--overwrite"),
        ],
        "triton": lambda s, o: ["triton", s, o, "--tokenizer", mixed, "--overwrite"],
    }
    inputs = {
        "convert": mixed,
        "convert --dry-run": mixed,
        "quantize": mixed,
        "build (engine, --dry-run)": trtllm,
        "build --backend pytorch": mixed,
        "reference": golden_src,
        "triton": build_dir,
    }
    for command, argv in commands.items():
        for where in ("is the input", "contains the input", "lies inside the input"):
            # each case on its own copy, in its own parent: a failure deletes only the copy
            slug = "".join(c if c.isalnum() else "-" for c in command)
            parent = work / f"over-{slug}-{where.split()[0]}"
            parent.mkdir(exist_ok=True)
            src = copy_of(inputs[command], parent / "input")
            out = {"is the input": src, "contains the input": parent}.get(where, src / "sub")
            bad_input(
                "3",
                f"{command}: OUT {where}, --overwrite",
                argv(src, out),
                [str(out), where],
                guard=[parent],
            )


# ---- section 3: casts and non-finite outputs ---------------------------------------------------
def probe_casts_and_check(work: Path, mixed: Path) -> None:
    def big_value(t):
        t[3, 5] = 99840.0

    src = copy_of(mixed, work / "overflow")
    edit_tensor(src, "model.layers.0.mlp.down_proj.weight", big_value)
    out = work / "overflow-out"
    bad_input(
        "3",
        "convert --dtype float16: finite bf16 99840 overflows",
        ["convert", src, out, "--tp", "2", "--dtype", "float16"],
        ["'model.layers.0.mlp.down_proj.weight'", "99840", "overflows float16"],
        out,
        [src],
    )

    def norm_value(t):
        t[7] = 99840.0

    src = copy_of(mixed, work / "overflow-norm")
    edit_tensor(src, "model.norm.weight", norm_value)
    out = work / "overflow-q"
    bad_input(
        "3",
        "quantize --dtype float16: finite bf16 99840 overflows (unquantized norm)",
        ["quantize", src, out, "--dtype", "float16", "--format", "hf", *SMALL_CALIB],
        ["'model.norm.weight'", "99840", "overflows float16"],
        out,
        [src],
    )

    def flush(t):
        t.fill_(1e-7)
        t[3, 5] = 2.5e-8

    src = copy_of(mixed, work / "underflow")
    edit_tensor(src, "model.layers.0.mlp.down_proj.weight", flush)
    out = work / "underflow-out"
    bad_input(
        "3",
        "convert --dtype float16: a tensor of float16 subnormals flushed to zero",
        ["convert", src, out, "--tp", "2", "--dtype", "float16"],
        ["'model.layers.0.mlp.down_proj.weight'", "becomes 0 in float16"],
        out,
        [src],
    )
    # check: a non-finite value in an output (manifest resealed, so only the scan can see it)
    from builder.io.manifest import build_manifest, read_manifest, write_manifest
    from builder.io.safetensors_stream import read_header

    out = work / "inf-trt"
    cli("convert", mixed, out, "--tp", "2")
    file = out / "rank1.safetensors"
    start, header = read_header(file)
    name = next(n for n, e in sorted(header.items()) if e.get("dtype") == "BF16" and "layers." in n)
    entry = header[name]
    with open(file, "r+b") as handle:
        handle.seek(start + entry["data_offsets"][0])
        handle.write(b"\x80\x7f")  # bf16 +inf, little endian
    old = read_manifest(out)
    fields = {k: v for k, v in old.items() if k not in ("files", "kind", "tool", "created")}
    write_manifest(out, build_manifest(out, old["kind"], **fields))
    bad_input(
        "3",
        "check: +inf in a TensorRT-LLM rank file (manifest resealed)",
        ["check", out],
        [name, "non-finite"],
        guard=[out],
        report=True,
    )


# ---- section 4: layouts ----------
def hub_cache(src: Path, cache: Path, outside: Path | None = None) -> Path:
    repo = cache / "models--nvidia--mixed"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for file in sorted(src.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    if outside is not None:
        name = first_shard(src).name
        (snapshot / name).unlink()
        (snapshot / name).symlink_to(outside)
    return snapshot


def probe_layouts(work: Path, mixed: Path, plain_trt: Path) -> None:
    snapshot = hub_cache(mixed, work / "hub")
    out = work / "hub-out"
    run = cli("convert", snapshot, out, "--tp", "2")
    same = out.exists() and all(
        (out / f"rank{r}.safetensors").read_bytes()
        == (plain_trt / f"rank{r}.safetensors").read_bytes()
        for r in (0, 1)
    )
    expect(
        "4",
        "convert: HF hub cache snapshot (symlinks to ../../blobs) accepted",
        [(run.rc == 0, f"exit {run.rc}: {run.stderr[-300:]}"), (same, "ranks differ")],
        run.seconds,
        f"exit {run.rc}, rank files byte-identical to the plain directory's: {same}",
    )
    outside = work / "elsewhere.safetensors"
    shutil.copy(first_shard(mixed), outside)
    snapshot = hub_cache(mixed, work / "hub2", outside=outside)
    out = work / "hub2-out"
    bad_input(
        "4",
        "convert: hub snapshot with a link leaving the repository folder",
        ["convert", snapshot, out, "--tp", "2"],
        [str(outside), "outside the checkpoint directory"],
        out,
        [work / "hub2"],
    )
    import torch
    from safetensors.torch import load_file

    pickled = work / "pickled"
    pickled.mkdir()
    shutil.copy(mixed / "config.json", pickled / "config.json")
    tensors = {}
    for file in sorted(mixed.glob("*.safetensors")):
        tensors.update(load_file(file))
    torch.save(tensors, pickled / "pytorch_model.bin")
    for command, extra in (("convert", ["--tp", "2"]), ("quantize", SMALL_CALIB)):
        out = work / f"pickled-{command}"
        run = bad_input(
            "4",
            f"{command}: pickle weights refused, naming a flag it has",
            [command, pickled, out, *extra],
            ["pytorch_model.bin", "--allow-pickle"],
            out,
            [pickled],
        )
        del run
    out = work / "pickled-allowed"
    run = cli("convert", pickled, out, "--tp", "2", "--allow-pickle")
    same = (
        out.exists()
        and (out / "rank0.safetensors").read_bytes()
        == (plain_trt / "rank0.safetensors").read_bytes()
    )
    expect(
        "4",
        "convert --allow-pickle reads the same weights",
        [(run.rc == 0, f"exit {run.rc}: {run.stderr[-300:]}"), (same, "rank0 differs")],
        run.seconds,
        f"exit {run.rc}, rank0 byte-identical to the safetensors conversion: {same}",
    )


# ---- section 5: what a new user sees ----------
def probe_section5(work: Path, mixed: Path, trtllm: Path) -> None:
    plan = "plan", "--preset", "ultra-253b", "--target", "h100x4-fp8"
    fits, small, impossible = cli(*plan), cli(*plan, "--tp", "2"), cli(*plan, "--tp", "3")
    unknown = cli("plan", "--preset", "ultra-253b", "--target", "no-such-target")
    header = " ".join(small.stdout.splitlines()[:3])
    expect(
        "5",
        "plan: exit 0 fits / 1 does not fit / 1 impossible split / 2 bad input; TP2 header",
        [
            (fits.rc == 0, f"fits: exit {fits.rc}"),
            (small.rc == 1, f"--tp 2: exit {small.rc}"),
            (impossible.rc == 1, f"--tp 3: exit {impossible.rc}"),
            (unknown.rc == 2 and len(unknown.error_lines) == 1, f"unknown: exit {unknown.rc}"),
            ("TP2" in header and "TP4" not in header, f"header: {header[:120]}"),
            ("batch 0" not in small.stdout and "= 0 tok/s" not in small.stdout, "batch 0 row"),
        ],
        fits.seconds + small.seconds + impossible.seconds + unknown.seconds,
        f"exits {fits.rc}/{small.rc}/{impossible.rc}/{unknown.rc}; "
        + next((line.strip() for line in small.stdout.splitlines() if "KV" in line), "")[:100],
    )
    out = work / "dry"
    run = cli("build", trtllm, out, "--target", "h100x8-bf16", "--tp", "2", "--dry-run", "--json")
    command = json.loads(run.stdout)["command"] if run.rc == 0 else []
    output_dir = command[command.index("--output_dir") + 1] if "--output_dir" in command else ""
    workers = command[command.index("--workers") + 1] if "--workers" in command else ""
    scripts = (
        "".join(p.read_text() for p in sorted((out / "launch").glob("*"))) if out.exists() else ""
    )
    expect(
        "5",
        "build --dry-run: --output_dir inside OUT, --workers follows --tp, absolute paths",
        [
            (run.rc == 0, f"exit {run.rc}"),
            (Path(output_dir).resolve() == out.resolve(), f"--output_dir {output_dir}"),
            (workers == "2", f"--workers {workers}"),
            (not (work / "dry-engine").exists(), "a sibling dry-engine was written"),
            (str(trtllm.resolve()) in scripts, "launch scripts do not hold the absolute source"),
        ],
        run.seconds,
        f"--output_dir {output_dir}, --workers {workers}",
    )
    fp8 = work / "fp8"
    q = subprocess.Popen(
        [PY, "-m", "builder", "quantize", mixed, fp8, "--tp", "2", *SMALL_CALIB],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stamps, lines = [], []
    started = time.monotonic()
    for line in q.stderr:
        stamps.append(time.monotonic() - started)
        lines.append(line.rstrip())
    q.wait()
    progress = [s for s, line in zip(stamps, lines, strict=True) if line.startswith("quantize:")]
    gaps = [b - a for a, b in zip(progress, progress[1:], strict=False)]
    calib = next((line for line in lines if "calibrating" in line), "")
    expect(
        "5",
        "quantize outside a TTY: progress lines with done/total and ETA, <= ~10 s apart",
        [
            (q.returncode == 0, f"exit {q.returncode}"),
            (any("ETA" in line for line in lines), "no line with an ETA"),
            (not gaps or max(gaps) <= 12, f"largest gap between progress lines {max(gaps):.1f} s"),
        ],
        stamps[-1] if stamps else 0,
        f"{len(progress)} progress lines in {stamps[-1] if stamps else 0:.0f} s, largest gap "
        "between two "
        f"{max(gaps) if gaps else 0:.1f} s; e.g. {calib[:110]!r}",
    )
    fp8_mismatch = cli(
        "build", fp8 / "trtllm", work / "dry-fp8", "--target", "h100x4-fp8", "--dry-run"
    )
    expect(
        "5",
        "build: FP8 tp mismatch advice names quantize",
        [
            (fp8_mismatch.rc == 2, f"exit {fp8_mismatch.rc}"),
            ("builder quantize" in fp8_mismatch.stderr, "does not name quantize"),
            ("convert again" not in fp8_mismatch.stderr, "says convert again"),
        ],
        fp8_mismatch.seconds,
        (fp8_mismatch.error_lines or [""])[0][:160],
    )
    smollm2 = work / "smollm2"
    imported = cli("import-smollm2", smollm2)
    pytorch_build = work / "pt-build"
    cli("build", mixed, pytorch_build, "--target", "h100x8-bf16", "--backend", "pytorch")
    artifacts = {
        "hf-checkpoint (synth)": mixed,
        "hf-checkpoint (import-smollm2)": smollm2,
        "fp8-quantization (quantize root)": fp8,
        "hf-fp8-checkpoint (quantize OUT/hf)": fp8 / "hf",
        "trtllm-checkpoint FP8 (quantize OUT/trtllm)": fp8 / "trtllm",
        "trtllm-checkpoint BF16 (convert)": trtllm,
        "build output (--dry-run)": out,
        "build output (--backend pytorch)": pytorch_build,
    }
    for name, path in artifacts.items():
        run = cli("check", path)
        said = next((line for line in run.stdout.splitlines() if line.startswith("ok ")), "")
        expect(
            "5",
            f"check {name}",
            [(run.rc == 0, f"exit {run.rc}: {run.stderr[-200:]}"), (bool(said), "no ok line")],
            run.seconds,
            said[:170],
        )
    rt = cli("check", trtllm, "--source", mixed, "--roundtrip")
    expect(
        "5",
        "check --roundtrip outside a TTY prints progress lines",
        [(rt.rc == 0, f"exit {rt.rc}"), ("ETA" in rt.stderr, "no progress line with an ETA")],
        rt.seconds,
        next((line for line in rt.stderr.splitlines() if "ETA" in line), "")[:150],
    )
    info = cli("info", "--preset", "mixed", "--tp", "2", "--no-layers")
    expect(
        "5",
        "info --tp 2 prints per-rank shapes in the human output",
        [(info.rc == 0, f"exit {info.rc}"), ("Tensor shapes of ranks" in info.stdout, "none")],
        info.seconds,
        next((line for line in info.stdout.splitlines() if "Tensor shapes" in line), ""),
    )
    env = {k: v for k, v in ENV.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    gen = cli("generate", mixed, "--prompt", "Hi", "--max-new-tokens", "4", env=env)
    expect(
        "5",
        "generate on a synth checkpoint: says weights are random, no HF bar, printable",
        [
            (gen.rc == 0, f"exit {gen.rc}"),
            ("random" in gen.stderr, "no word that the weights are random"),
            ("Loading weights" not in gen.stdout + gen.stderr, "transformers bar leaked"),
            (gen.stdout.rstrip("\n").isprintable(), "reply not printable"),
        ],
        gen.seconds,
        next((line for line in gen.stderr.splitlines() if "random" in line), "")[:150],
    )
    modes = {}
    for directory in (mixed, smollm2, trtllm, fp8, fp8 / "trtllm", fp8 / "hf", out):
        for p in directory.iterdir():
            if p.is_file():
                modes[str(p.relative_to(work))] = stat.S_IMODE(p.stat().st_mode)
    odd = {k: oct(v) for k, v in modes.items() if v != (0o755 if k.endswith(".sh") else 0o644)}
    expect(
        "5",
        "synth, import-smollm2, convert, quantize, build: files 0644 (scripts 0755)",
        [(imported.rc == 0, f"import exit {imported.rc}"), (not odd, f"not 0644: {odd}")],
        imported.seconds,
        f"{len(modes)} files, modes {sorted({oct(v) for v in modes.values()})}",
    )
    snippet = (
        "import builder\n"
        "from transformers import pipeline\n"
        f"pipe = pipeline('text-generation', model={str(smollm2)!r}, device='cpu')\n"
        "for thinking in ('on', 'off'):\n"
        "    messages = [{'role': 'system', 'content': f'detailed thinking {thinking}'},\n"
        "                {'role': 'user', 'content': 'What is the capital of France?'}]\n"
        "    print(repr(pipe(messages, max_new_tokens=12, do_sample=False)[0]"
        "['generated_text'][-1]['content']))\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        [PY, "-c", snippet], env=ENV, capture_output=True, text=True, timeout=600, check=False
    )
    expect(
        "5",
        "model card snippet: import builder, transformers.pipeline, no trust_remote_code",
        [(done.returncode == 0, done.stderr[-300:]), ("Paris" in done.stdout, done.stdout[:200])],
        time.monotonic() - started,
        " | ".join(done.stdout.split("\n"))[:170],
    )


# ---- main ----------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--skip-section5", action="store_true")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="probe-bad-inputs-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        mixed = work / "mixed"
        big = work / "big"
        trtllm = work / "mixed-trt-tp2"
        golden_src = work / "golden-src"
        for step in (
            ("synth", "--preset", "mixed", mixed),
            ("synth", "--preset", "ultra-253b", "--hidden", "128", "--layers", "0-23")
            + ("--target-size", "300MB", big),
            ("convert", mixed, trtllm, "--tp", "2"),
            ("synth", "--preset", "ultra-253b", "--hidden", "64", "--layers", "0-5", golden_src),
        ):
            run = cli(*step)
            if run.rc != 0:
                print(f"setup failed: {step}: {run.stderr}", file=sys.stderr)
                return 1
        print(f"inputs ready in {work} ({time.monotonic() - started:.0f} s)", flush=True)
        probe_config_and_index(work, mixed)
        probe_read_only_and_file_out(work, mixed)
        probe_resume_records(work, mixed)
        probe_quantize_resume_cache(work, mixed)
        probe_two_conversions(work, big)
        probe_kill_workers(work, big)
        probe_out_over_input(work, mixed, trtllm, golden_src)
        probe_casts_and_check(work, mixed)
        probe_layouts(work, mixed, trtllm)
        if not args.skip_section5:
            probe_section5(work, mixed, trtllm)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in RESULTS if r.kind == "bad input"]
    bad_ok = [r for r in bad if r.ok]
    failed = [r for r in RESULTS if not r.ok]
    print(
        f"\n{len(RESULTS)} probes, {len(RESULTS) - len(failed)} pass, {len(failed)} fail; "
        f"{len(bad_ok)}/{len(bad)} bad inputs ended with exit 2, one error line, no traceback, "
        "nothing complete-looking, inputs unchanged "
        f"({time.monotonic() - started:.0f} s)"
    )
    for r in failed:
        print(f"FAIL [{r.section}] {r.name}: {'; '.join(r.problems)}")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in RESULTS], indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
