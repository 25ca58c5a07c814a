"""The activation store: round trip, atomic resume after SIGKILL, checksums, refusals, bounded-memory reads."""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from safedig_core.formats import store as store_mod
from safedig_core.formats.prompts import PromptRecord
from safedig_core.formats.store import ActivationStore, StoreError, StoreWriter, summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POS = ["double.0.img", "single.3.txt"]
WIDTHS = {"double.0.img": 16, "single.3.txt": 16}
CONFIG = {"steps": 4, "record_steps": [0, 2], "token_budget": 3, "seed": 0, "runner": {"model": "synthetic"}}


def records(n: int) -> list[PromptRecord]:
    return [PromptRecord(f"p{i}", f"prompt {i}", "unsafe" if i % 3 == 0 else "safe", "nudity" if i % 3 == 0 else "",
                         "target" if i % 4 == 3 else "source", None, {"n": i}) for i in range(n)]


def synthetic(i: int, names=POS, widths=WIDTHS, steps=(0, 2), budget=3):
    """Deterministic activations of prompt i: rows {name: (x, step, token)}, pooled {name: (x, step)}."""
    g = torch.Generator().manual_seed(1000 + i)
    rows, pooled = {}, {}
    for n in names:
        d = widths[n]
        rows[n] = (torch.randn(len(steps) * budget, d, generator=g),
                   torch.tensor(steps).repeat_interleave(budget), torch.arange(budget).repeat(len(steps)))
        pooled[n] = (torch.randn(len(steps), d, generator=g), torch.tensor(steps))
    return rows, pooled


def write_store(path, n=7, pps=2, **kw):
    with StoreWriter(path, "flux", POS, WIDTHS, records(n), CONFIG, prompts_per_shard=pps, **kw) as w:
        for i in range(n):
            w.add(i, *synthetic(i))
    return path


def files(path) -> dict:
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def test_round_trip(tmp_path):
    path = write_store(str(tmp_path / "s"))
    s = ActivationStore(path)
    assert s.family == "flux" and [p.name for p in s.positions] == POS and s.complete and s.dtype == "float16"
    assert [r.id for r in s.prompts] == [f"p{i}" for i in range(7)] and s.prompts[3].extra == {"n": 3}
    assert s.rows("double.0.img") == 7 * 6 and s.width("single.3.txt") == 16
    for name in POS:
        want_x = torch.cat([synthetic(i)[0][name][0] for i in range(7)]).half().float()
        got = list(s.iter_batches(name, 5))
        assert [len(b.x) for b in got] == [5] * 8 + [2]
        x = torch.cat([b.x for b in got])
        assert x.dtype == torch.float32 and torch.equal(x, want_x)
        assert torch.cat([b.prompt for b in got]).tolist() == [i for i in range(7) for _ in range(6)]
        assert torch.cat([b.step for b in got]).tolist() == [0, 0, 0, 2, 2, 2] * 7
        assert torch.cat([b.token for b in got]).tolist() == [0, 1, 2] * 14
        pooled = s.pooled(name)
        assert torch.equal(pooled.x, torch.cat([synthetic(i)[1][name][0] for i in range(7)]))
        assert pooled.prompt.tolist() == [i for i in range(7) for _ in range(2)] and pooled.step.tolist() == [0, 2] * 7
    # a prompt subset, and a shuffle that keeps every row exactly once
    sub = torch.cat([b.prompt for b in s.iter_batches("double.0.img", 4, prompts={1, 4, 6})])
    assert sorted(set(sub.tolist())) == [1, 4, 6] and len(sub) == 18
    assert s.pooled("double.0.img", prompts=[5]).prompt.tolist() == [5, 5]
    shuf = list(s.iter_batches("double.0.img", 8, shuffle=True, seed=3))
    keys = sorted(zip(torch.cat([b.prompt for b in shuf]).tolist(), torch.cat([b.step for b in shuf]).tolist(),
                      torch.cat([b.token for b in shuf]).tolist()))
    assert keys == sorted((i, st, t) for i in range(7) for st in (0, 2) for t in range(3))
    assert torch.cat([b.prompt for b in shuf]).tolist() != sorted(torch.cat([b.prompt for b in shuf]).tolist())
    assert "complete" in summary(s) and "double.0.img: width 16, 42 token rows" in summary(s)
    shard = load_file(os.path.join(path, "shard-000000.safetensors"))  # a plain safetensors file for any tool
    assert shard["double.0.img"].dtype == torch.float16 and shard["double.0.img.prompt"].tolist() == [0] * 6 + [1] * 6
    with pytest.raises(StoreError, match="was not collected"):
        s.rows("double.1.img")


def test_bfloat16_and_pooled_only(tmp_path):
    path = str(tmp_path / "b")
    with StoreWriter(path, "sd3", ["joint.0.img"], {"joint.0.img": 8}, records(3), CONFIG, prompts_per_shard=2,
                     dtype="bfloat16") as w:
        for i in range(3):
            w.add(i, {"joint.0.img": (torch.zeros(0, 8), torch.zeros(0), torch.zeros(0))},
                  {"joint.0.img": (torch.full((1, 8), float(i)), torch.tensor([1]))})
    s = ActivationStore(path)
    assert s.dtype == "bfloat16" and s.rows("joint.0.img") == 0 and list(s.iter_batches("joint.0.img", 4)) == []
    assert s.pooled("joint.0.img").x[:, 0].tolist() == [0.0, 1.0, 2.0]


# --- resume after SIGKILL ------------------------------------------------------------------------------

BIG = dict(n=24, pps=2, rows=384, d=128)


def write_big(path):
    """24 prompts, 12 shards of about 0.4 MB: slow enough that a kill lands inside writes."""
    n, pps, rows, d = BIG["n"], BIG["pps"], BIG["rows"], BIG["d"]
    widths = {p: d for p in POS}
    with StoreWriter(path, "flux", POS, widths, records(n), CONFIG, prompts_per_shard=pps) as w:
        for i in range(n):
            if w.done(i):
                continue
            g = torch.Generator().manual_seed(i)
            w.add(i, {p: (torch.randn(rows, d, generator=g), torch.zeros(rows), torch.arange(rows)) for p in POS},
                  {p: (torch.randn(1, d, generator=g), torch.zeros(1)) for p in POS})


def _write_big_child(path):
    torch.set_num_threads(1)  # no OpenMP parallel region in a forked child (libgomp is not fork-safe)
    write_big(path)


def test_resume_after_sigkill_is_byte_identical(tmp_path):
    """A writer process (forked: no interpreter start-up per attempt) is SIGKILLed at random moments, and
    resumed each time; the final store equals an uninterrupted run's byte for byte."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ctx = multiprocessing.get_context("fork")
    procs = []

    def start(path):
        proc = ctx.Process(target=_write_big_child, args=(path,), daemon=True)
        proc.start()
        procs.append(proc)
        return proc

    try:
        ref = str(tmp_path / "ref")
        t0 = time.perf_counter()
        write_big(ref)
        duration = time.perf_counter() - t0
        path = str(tmp_path / "killed")
        rng = random.Random(1234)
        shards = BIG["n"] // BIG["pps"]
        kills, done = 0, 0
        for attempt in range(30):
            if done == shards:  # finished before a kill landed: start over, so that enough kills land
                shutil.rmtree(path)
                done = 0
            proc = start(path)
            time.sleep(rng.uniform(0.0, 0.7 * duration * (shards - done) / shards))  # within the work left
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(30)
            kills += proc.exitcode == -signal.SIGKILL
            if os.path.exists(os.path.join(path, "manifest.json")):
                s = ActivationStore(path)  # every intermediate state is a valid store
                s.verify()
                done = len(s.shards)
            if kills >= 6:
                break
        assert kills >= 3, kills
        proc = start(path)
        proc.join(60)
        assert proc.exitcode == 0, f"the resuming writer ended with {proc.exitcode}"
        assert files(path) == files(ref)  # shards, manifest and prompt list byte for byte; no stray files
    finally:
        torch.set_num_threads(threads)
        for proc in procs:  # never leave a child behind (multiprocessing would wait for it at exit)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(5)


class Crash(BaseException):
    pass


def test_resume_after_crash_at_every_file_operation(tmp_path, monkeypatch):
    """In-process complement of the SIGKILL test: die at the k-th file replacement, for every k."""
    ref = write_store(str(tmp_path / "ref"), n=5, pps=2)
    real_replace, real_write = os.replace, store_mod._write_safetensors
    calls = {"n": 0}
    ops = None
    k = 0
    while True:
        path = str(tmp_path / f"crash{k}")
        calls["n"] = 0

        def replace(a, b, _k=k):
            calls["n"] += 1
            if calls["n"] > _k:
                raise Crash
            return real_replace(a, b)

        def write(path, tensors, metadata, _k=k):
            out = real_write(path, tensors, metadata)
            if calls["n"] >= _k:  # the crash comes next: leave a half-written temporary file too
                with open(path, "r+b") as f:
                    f.truncate(out[1] // 2)
            return out

        monkeypatch.setattr(store_mod.os, "replace", replace)
        monkeypatch.setattr(store_mod, "_write_safetensors", write)
        try:
            write_store(path, n=5, pps=2)
            ops = calls["n"]
        except Crash:
            pass
        monkeypatch.setattr(store_mod.os, "replace", real_replace)
        monkeypatch.setattr(store_mod, "_write_safetensors", real_write)
        with StoreWriter(path, "flux", POS, WIDTHS, records(5), CONFIG, prompts_per_shard=2) as w:
            for i in range(5):
                if not w.done(i):
                    w.add(i, *synthetic(i))
        assert files(path) == files(ref), k
        if ops is not None:
            break
        k += 1
    assert ops is not None and ops >= 5


# --- damage and refusals -------------------------------------------------------------------------------

def test_corrupt_shard_is_named(tmp_path):
    path = write_store(str(tmp_path / "s"))
    shard = os.path.join(path, "shard-000001.safetensors")
    data = bytearray(open(shard, "rb").read())
    data[-5] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    s = ActivationStore(path)
    with pytest.raises(StoreError, match=r"shard shard-000001\.safetensors is corrupt"):
        list(s.iter_batches("double.0.img", 4))
    with pytest.raises(StoreError, match=r"shard-000001\.safetensors"):
        s.pooled("single.3.txt")
    assert len(list(s.iter_batches("double.0.img", 4, prompts=[0, 1]))) == 3  # other shards still read
    with pytest.raises(StoreError, match=r"shard shard-000001\.safetensors is corrupt"):  # resume checks sizes
        open(shard, "ab").write(b"x")
        StoreWriter(path, "flux", POS, WIDTHS, records(7), CONFIG, prompts_per_shard=2)
    os.remove(shard)
    with pytest.raises(StoreError, match=r"shard shard-000001\.safetensors is missing"):
        ActivationStore(path).verify()
    with StoreWriter(path, "flux", POS, WIDTHS, records(7), CONFIG, prompts_per_shard=2) as w:  # recollected
        assert [i for i in range(7) if not w.done(i)] == [2, 3]
        for i in (2, 3):
            w.add(i, *synthetic(i))
    assert files(path) == files(write_store(str(tmp_path / "ref")))


def test_garbage_header_is_named(tmp_path):
    path = write_store(str(tmp_path / "s"))
    m = json.load(open(os.path.join(path, "manifest.json")))
    shard = os.path.join(path, "shard-000002.safetensors")
    open(shard, "wb").write(b"\xff" * 64)
    m["shards"][2]["sha256"] = store_mod._sha256(shard)  # even with a matching checksum the file is refused
    open(os.path.join(path, "manifest.json"), "w").write(json.dumps(m))
    with pytest.raises(StoreError, match=r"shard shard-000002\.safetensors is corrupt"):
        list(ActivationStore(path).iter_batches("double.0.img", 100))


@pytest.mark.parametrize("change,word", [
    ({"config": {**CONFIG, "steps": 8}}, "config.steps: the store has 4, this run 8"),
    ({"config": {**CONFIG, "runner": {"model": "other"}}}, "config.runner.model"),
    ({"positions": ["double.0.img"]}, "positions"),
    ({"prompts_per_shard": 3}, "prompts_per_shard"),
    ({"dtype": "bfloat16"}, "dtype"),
    ({"prompts": records(6)}, "different prompt list (the store has 7 prompts, this run 6)"),
    ({"prompts": records(6) + [PromptRecord("q", "other", "safe", "")]}, "prompt #6 differs in id"),
])
def test_different_settings_are_refused(tmp_path, change, word):
    path = write_store(str(tmp_path / "s"))
    before = files(path)
    args = dict(path=path, family="flux", positions=POS, widths=WIDTHS, prompts=records(7), config=CONFIG,
                prompts_per_shard=2)
    args.update(change)
    with pytest.raises(StoreError) as e:
        StoreWriter(**args)
    assert word in str(e.value) and "another output folder" in str(e.value), str(e.value)
    assert files(path) == before


def test_bad_input_is_refused(tmp_path):
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an activation store"):
        StoreWriter(str(folder), "flux", POS, WIDTHS, records(2), CONFIG)
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore(str(folder))
    w = StoreWriter(str(tmp_path / "s"), "flux", POS, WIDTHS, records(2), CONFIG)
    rows, pooled = synthetic(0)
    bad = dict(rows)
    bad["double.0.img"] = (torch.randn(6, 8), rows["double.0.img"][1], rows["double.0.img"][2])
    with pytest.raises(StoreError, match="width is 16"):
        w.add(0, bad, pooled)
    bad["double.0.img"] = (torch.full((6, 16), float("nan")), rows["double.0.img"][1], rows["double.0.img"][2])
    with pytest.raises(StoreError, match="NaN"):
        w.add(0, bad, pooled)
    bad["double.0.img"] = (torch.full((6, 16), 1e6), rows["double.0.img"][1], rows["double.0.img"][2])
    with pytest.raises(StoreError, match="overflow float16.*bfloat16"):
        w.add(0, bad, pooled)
    with pytest.raises(StoreError, match="activations for"):
        w.add(0, {"double.0.img": rows["double.0.img"]}, pooled)
    w.add(0, rows, pooled)
    with pytest.raises(StoreError, match="already stored"):
        w.add(0, rows, pooled)
    w.close()
    with pytest.raises(StoreError, match="dtype"):
        StoreWriter(str(tmp_path / "t"), "flux", POS, WIDTHS, records(2), CONFIG, dtype="float32")


# --- bounded memory ------------------------------------------------------------------------------------

READER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    import torch
    from safedig_core.formats.store import ActivationStore

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def peak_of(fn):
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = status("VmRSS")
        rows = fn()
        return status("VmHWM") - before, rows

    def stream(path):
        n = 0
        for b in ActivationStore(path).iter_batches("double.0.img", 1024):
            n += len(b.x)
        return n

    def hold(path):  # the control: keep every batch, as a reader without streaming would
        xs = [b.x for b in ActivationStore(path).iter_batches("double.0.img", 1024)]
        return sum(len(x) for x in xs)

    small, large = sys.argv[1:]
    stream(small)  # warm-up: first-use allocations of torch and the reader are not the store's
    print(json.dumps({{"small": peak_of(lambda: stream(small)), "large": peak_of(lambda: stream(large)),
                      "hold": peak_of(lambda: hold(small))}}))
""")


def _big_store(path, shards, rows_per_shard=2048, d=512):
    """`shards` shards of 2 MiB (fp16 token rows of one position); data made shard by shard."""
    name = "double.0.img"
    with StoreWriter(path, "flux", [name], {name: d}, records(shards), CONFIG, prompts_per_shard=1) as w:
        for i in range(shards):
            x = torch.full((rows_per_shard, d), float(i % 7), dtype=torch.float16)
            z = torch.zeros(rows_per_shard)
            w.add(i, {name: (x, z, z)}, {name: (torch.zeros(1, d), torch.zeros(1))})
    return path


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_streaming_memory_does_not_grow_with_the_store(tmp_path):
    small = _big_store(str(tmp_path / "x1"), 8)  # 16 MiB of token rows
    large = _big_store(str(tmp_path / "x4"), 32)  # 64 MiB
    # a fixed glibc mmap threshold: freed buffers go back to the system at once, so RSS tracks live memory
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run([sys.executable, "-c", READER.format(repo=REPO), small, large], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    (peak1, rows1), (peak4, rows4), (held, _) = out["small"], out["large"], out["hold"]
    assert (rows1, rows4) == (8 * 2048, 32 * 2048)
    mib = {k: round(v[0] / 2 ** 20, 1) for k, v in out.items()}
    # the instrument sees growth: holding the small store's rows (32 MiB as float32) shows up
    assert held > 28 << 20, mib
    # streaming 4x the rows costs what streaming 1x does (48 MiB more would be read into memory otherwise),
    # and no more than a few 2 MiB shards
    assert peak4 - peak1 < 1 << 20, mib
    assert peak4 < 12 << 20, mib
