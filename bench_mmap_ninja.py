"""Benchmark for mmap_ninja.py: each operation next to its floor and to one-file-per-sample.

    python bench_mmap_ninja.py            # about 40 seconds; prints a markdown table
    python bench_mmap_ninja.py --quick    # a few seconds (CI smoke run)
    python bench_mmap_ninja.py --scale 4  # 4x more samples
    python bench_mmap_ninja.py --published DIR  # also the published package installed in DIR
                                                # (pip install --no-deps --target DIR mmap_ninja==0.8.2 tqdm)
Writes the figures to bench_results.json (see --json). Standard library + numpy only.
"""
import argparse
import bisect
import gc
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

import mmap_ninja as mn


def best(fn, repeat=9, number=1):
    """Best wall time of fn over `repeat` runs of `number` calls, in seconds per call."""
    return best_each([fn], repeat, number)[0]


def best_each(fns, repeat=9, number=1):
    """best() of each function, their runs interleaved so that other load on this shared
    machine falls on all of them alike (a ratio of two figures is then fair)."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, runs in zip(fns, times):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            runs.append((time.perf_counter() - t0) / number)
    return [min(runs) for runs in times]


def best_of_each(writers, where, repeat=7):
    """Best times of functions that write to the path they are given, run round-robin so that
    other load falls on all of them alike, each round starting one writer later: on this VM a
    write's place in the round moved its speed by up to 2x (the same f.write ran at 4.5 GB/s
    second and 2.3 GB/s fourth). Like a real conversion, each run writes a new path, after
    dirty pages are flushed. Earlier runs' outputs are deleted only at the end: on this VM's
    ext4 (mounted with discard), deleting just before a timed write made that write wait for
    the discards, by up to 3x. Returns the best times and the paths of the last runs."""
    out = tempfile.mkdtemp(prefix="best-", dir=where)
    times, paths = [[] for _ in writers], [[] for _ in writers]
    for run in range(repeat):
        for k in [(run + j) % len(writers) for j in range(len(writers))]:
            write = writers[k]
            paths[k].append(os.path.join(out, f"{k}-{run}"))
            if hasattr(os, "sync"):
                os.sync()
            t0 = time.perf_counter()
            write(paths[k][-1])
            times[k].append(time.perf_counter() - t0)
    for path in (p for runs in paths for p in runs[:-1]):
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    return [min(t) for t in times], [runs[-1] for runs in paths]


class Table:
    def __init__(self):
        self.rows = []

    def add(self, store, op, ours, floor=None, floor_name="", per_file=None, unit="µs", target=""):
        self.rows.append(dict(store=store, op=op, ours=ours, floor=floor, floor_name=floor_name,
                              per_file=per_file, unit=unit, target=target))

    def markdown(self):
        def fmt(v):
            return "" if v is None else (f"{v:,.2f}" if v < 100 else f"{v:,.0f}")
        lines = ["| store | operation | mmap_ninja | floor | ratio | one file per sample | target |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            ratio = ""
            if r["floor"]:
                ratio = f"{r['ours'] / r['floor']:.2f}×" if r["unit"] != "MB/s" else f"{r['ours'] / r['floor']:.0%}"
            floor = f"{fmt(r['floor'])} ({r['floor_name']})" if r["floor"] is not None else ""
            per_file = f"{fmt(r['per_file'])} {r['unit']}" if r["per_file"] is not None else ""
            lines.append(f"| {r['store']} | {r['op']} | {fmt(r['ours'])} {r['unit']} | {floor} | {ratio} | {per_file} | {r['target']} |")
        return "\n".join(lines)


def image_samples(n):
    rng = np.random.default_rng(0)
    shapes = [(int(rng.integers(8, 24)), int(rng.integers(8, 24)), 3) for _ in range(n)]  # ~1-2 KB images
    return shapes, [rng.integers(0, 255, s, dtype=np.uint8) for s in shapes]


def row_samples(n):
    rng = np.random.default_rng(0)
    return [rng.random(512, dtype=np.float32) for _ in range(n)]  # 2 KB rows


def string_samples(n):
    rnd = random.Random(0)
    return ["".join(rnd.choices("abcdefghij klmnopqrstuvwxyzü", k=rnd.randint(30, 70))) for _ in range(n)]


# The same workloads through the published package (its import paths are ours too), run in a
# subprocess whose PYTHONPATH is the published install; prints its figures as JSON.
PUBLISHED = """
import json, sys, time, timeit, numpy as np
sys.path.append(sys.argv[1])  # after the published install: only bench_mmap_ninja comes from here
import bench_mmap_ninja as bench
from mmap_ninja.ragged import RaggedMmap
from mmap_ninja.string import StringsMmap
import mmap_ninja
assert not mmap_ninja.__file__.endswith("mmap_ninja.py"), mmap_ninja.__file__
n, tmp = int(sys.argv[2]), sys.argv[3]
shapes, samples = bench.image_samples(n)
words = bench.string_samples(n * 5)
out = {}
(t,), (rd,) = bench.best_of_each([lambda p: RaggedMmap.from_generator(p, iter(samples), 4096)], tmp)
out['ragged_create'] = sum(s.nbytes for s in samples) / t / 1e6
(t,), (sd,) = bench.best_of_each([lambda p: StringsMmap.from_generator(p, iter(words), 4096)], tmp)
out['strings_create'] = sum(len(w.encode()) for w in words) / t / 1e6
r, s = RaggedMmap(rd), StringsMmap(sd)
idx = [int(i) for i in np.random.default_rng(1).integers(0, n, 2048)]
out['ragged_get'] = bench.best(lambda: [r[i] for i in idx]) / len(idx) * 1e6
out['strings_get'] = bench.best(lambda: [s[i] for i in idx]) / len(idx) * 1e6
out['ragged_append'] = bench.best(lambda: r.append(np.zeros((4, 4, 3), np.uint8)), 3, 20) * 1e6
from mmap_ninja import numpy as np_ninja
rows = bench.row_samples(n)
(t,), _ = bench.best_of_each([lambda p: np_ninja.from_generator(p, iter(rows), 4096)], tmp)
out['numpy_create'] = sum(r.nbytes for r in rows) / t / 1e6
print(json.dumps(out))
"""


def published_figures(path, n, tmp):
    """The published package's figures for the same workloads, or None when it cannot run."""
    here = os.path.dirname(os.path.abspath(__file__))
    work = tempfile.mkdtemp(dir=tmp)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path))  # the published package, not ours
    result = subprocess.run([sys.executable, "-c", PUBLISHED, here, str(n), work], env=env, cwd=work,
                            capture_output=True, text=True)
    if result.returncode != 0:
        print(f"note: the published package in {path} did not run:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def ragged_bench(tmp, table, n, rng, published=None):
    _, samples = image_samples(n)
    nbytes = sum(s.nbytes for s in samples)
    (t, write_floor), (d, _) = best_of_each([lambda p: mn.RaggedMmap.from_generator(p, iter(samples), 4096),
                                             lambda p: plain_write(p, samples)], tmp)
    per_file_dir = os.path.join(tmp, "npy")
    os.makedirs(per_file_dir, exist_ok=True)
    k = min(n, 2000)
    t_files = best(lambda: [np.save(os.path.join(per_file_dir, f"{i}.npy"), samples[i]) for i in range(k)], repeat=1)
    table.add("ragged (images)", "create from generator", nbytes / t / 1e6, nbytes / write_floor / 1e6,
              "plain f.write", per_file=samples[0].nbytes * k / t_files / 1e6 if k else None, unit="MB/s")
    if published:
        table.add("ragged (images)", "create from generator vs 0.8.2", nbytes / t / 1e6,
                  published["ragged_create"], "published", unit="MB/s", target="≥300%")
    store = mn.RaggedMmap(d)
    idx = [int(i) for i in rng.integers(0, n, 4096)]

    def files_get():
        for i in idx[:500]:
            np.load(os.path.join(per_file_dir, f"{i % k}.npy"))
    ours, floor = random_gets(store, samples, idx)
    table.add("ragged (images)", "random get", ours, floor, "in-memory slice",
              per_file=best(files_get, repeat=3) / 500 * 1e6, target="≤1.5×")
    # the same with the trailing axes fixed (here (h, 8, 3); resized images, spectrograms (t, 80),
    # boxes (k, 4)): the hot path reshapes every sample to one tuple (RaggedMmap._narrow_tail)
    fixed = [np.ascontiguousarray(x[:, :8]) for x in samples]  # (widths are 8 to 23)
    with mn.RaggedMmap.from_lists(os.path.join(tmp, "fixed-width"), fixed) as fixed_store:
        table.add("ragged (images, fixed width)", "random get", *random_gets(fixed_store, fixed, idx),
                  "in-memory slice", target="≤1.5×")
    if published:
        table.add("ragged (images)", "random get vs 0.8.2", ours, published["ragged_get"], "published")
        table.add("ragged (images)", "append 1 sample vs 0.8.2", published["ragged_append_ours"],
                  published["ragged_append"], "published")
    table.add("ragged (images)", "sequential iteration",
              *per_sample(n, lambda: consume(store), slice_floor(samples, range(n)), number=1), "in-memory slice")
    batch = np.asarray(idx[:256])  # the floors below are measured on the same 256 samples
    table.add("ragged (images)", "batch get (256 idx)",
              *per_sample(256, lambda: store[batch], slice_floor(samples, batch)), "in-memory slice", target="≤1×")
    padded, floor, pad_floor = per_sample(256, lambda: store.get_padded(batch), slice_floor(samples, batch),
                                          padded_floor(samples, batch))
    table.add("ragged (images)", "get_padded (256 idx)", padded, floor, "in-memory slice", target="≤1×")
    table.add("ragged (images)", "get_padded vs a collate_fn", padded, pad_floor, "in-memory pad + copy")
    sharded_bench(tmp, table, samples, batch)
    flat_samples = [rng.integers(0, 1000, int(rng.integers(20, 200)), dtype=np.int32) for _ in range(n)]
    flat_store = mn.RaggedMmap.from_lists(os.path.join(tmp, "ragged_flat"), flat_samples, mode="r")
    ours, floor = random_gets(flat_store, flat_samples, idx)
    table.add("ragged (1-D)", "random get", ours, floor, "in-memory slice", target="≤1.5×")
    table.add("ragged (1-D)", "batch get (256 idx)",
              *per_sample(256, lambda: flat_store[batch], slice_floor(flat_samples, batch)), "in-memory slice",
              target="≤1×")
    table.add("ragged (1-D)", "get_padded (256 idx)",
              *per_sample(256, lambda: flat_store.get_padded(batch), slice_floor(flat_samples, batch)),
              "in-memory slice", target="≤1×")
    shutil.rmtree(per_file_dir)


def sharded_bench(tmp, table, samples, batch):
    """ShardedMmap over two halves of the images. Its floor is the in-memory slice over the same
    two shards: find the shard (bisect), then slice its flat array."""
    half = len(samples) // 2
    parts = [samples[:half], samples[half:]]
    for k, part in enumerate(parts):
        mn.RaggedMmap.from_generator(os.path.join(tmp, "sharded", str(k)), iter(part), 4096)
    store = mn.ShardedMmap(os.path.join(tmp, "sharded"))
    bounds = [0, half, len(samples)]
    flats = [np.concatenate([s.reshape(-1) for s in part]) for part in parts]
    offsets = [np.concatenate([[0], np.cumsum([s.size for s in part])]) for part in parts]
    shapes = [[s.shape for s in part] for part in parts]
    idx = [int(i) for i in batch]

    def floor_get():
        for i in idx:
            k = bisect.bisect_right(bounds, i) - 1
            j, offs = i - bounds[k], offsets[k]
            flats[k][offs[j]:offs[j + 1]].reshape(shapes[k][j])
    ours, floor, flat_floor = per_sample(256, lambda: store[batch], floor_get, slice_floor(samples, batch))
    table.add("sharded (2 image shards)", "batch get (256 idx)", ours, floor, "in-memory slice, 2 shards",
              target="≤1×")
    table.add("sharded (2 image shards)", "batch get vs one array", ours, flat_floor, "in-memory slice")


def consume(iterable):
    """Iterate as a training loop does: each item is dropped before the next arrives."""
    for _ in iterable:
        pass


def per_sample(count, *fns, number=20, repeat=9):
    """µs per sample of functions that each handle `count` samples (timed interleaved)."""
    return [t / count * 1e6 for t in best_each(fns, repeat, number)]


def slice_floor(samples, idx):
    """The in-memory floor: flat[offs[i]:offs[i+1]].reshape(shape_i) for each i in idx."""
    flat = np.concatenate([s.reshape(-1) for s in samples])
    offs = np.concatenate([[0], np.cumsum([s.size for s in samples])])
    shapes = [s.shape for s in samples]
    idx = [int(i) for i in idx]

    def floor_get():
        for i in idx:
            flat[offs[i]:offs[i + 1]].reshape(shapes[i])
    return floor_get


def random_gets(store, samples, idx):
    """µs per store[i] and per in-memory floor, for random i."""
    def ours_get():
        for i in idx:
            store[i]
    # one run is only a few ms, so the best of many: noise from other tenants moves a best of 9
    # by ±10%
    return per_sample(len(idx), ours_get, slice_floor(samples, idx), number=1, repeat=25)


def padded_floor(samples, idx):
    """get_padded's result built from in-memory arrays: a padded batch filled by one slice
    assignment per sample (what a collate_fn does)."""
    chosen = [samples[i] for i in idx]
    max_shape = tuple(np.max([s.shape for s in chosen], axis=0))

    def pad():
        batch = np.zeros((len(chosen),) + max_shape, chosen[0].dtype)
        for k, s in enumerate(chosen):
            batch[(k,) + tuple(map(slice, s.shape))] = s
    return pad


def plain_write(path, samples):
    with open(path, "wb") as f:
        for s in samples:
            f.write(s)


def large_sample_bench(tmp, table, count):
    rng = np.random.default_rng(5)
    samples = [rng.integers(0, 255, 1 << 20, dtype=np.uint8) for _ in range(count)]  # 1 MB samples
    nbytes = count << 20
    (floor, ragged, numpy_t), _ = best_of_each([
        lambda p: plain_write(p, samples),
        lambda p: mn.RaggedMmap.from_generator(p, iter(samples), 64),
        lambda p: mn.np_from_generator(p, iter(samples), 64)], tmp)
    table.add("ragged (1 MB samples)", "create from generator", nbytes / ragged / 1e6, nbytes / floor / 1e6,
              "plain f.write", unit="MB/s", target="≥25%")
    table.add("numpy (1 MB rows)", "create from generator", nbytes / numpy_t / 1e6, nbytes / floor / 1e6,
              "plain f.write", unit="MB/s", target="≥25%")
    # 1 MB strings of the same text as the small ones. Writing a str means encoding it: the
    # floor is f.write of the same strings to a UTF-8 text file; the second row shows f.write
    # of bytes encoded beforehand, which leaves the encoding (~850 MB/s here) out
    alphabet = np.array([ord(ch) for ch in "abcdefghij klmnopqrstuvwxyzü"], np.uint32)
    texts = [alphabet[rng.integers(0, len(alphabet), 1 << 20)].tobytes().decode("utf-32-le") for _ in range(count)]
    encoded = [t.encode() for t in texts]
    tbytes = sum(map(len, encoded))

    def text_write(path):
        with open(path, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(t)
    (t_strings, text_floor, bytes_floor), _ = best_of_each([
        lambda p: mn.StringsMmap.from_generator(p, iter(texts), 64), text_write,
        lambda p: plain_write(p, encoded)], tmp)
    table.add("strings (1 MB)", "create from generator", tbytes / t_strings / 1e6, tbytes / text_floor / 1e6,
              "f.write to a text file", unit="MB/s", target="≥25%")
    table.add("strings (1 MB)", "create vs writing pre-encoded bytes", tbytes / t_strings / 1e6,
              tbytes / bytes_floor / 1e6, "plain f.write", unit="MB/s")
    # memory: peak traced allocations while converting, in batches of 16 samples (16 MB)
    def gen():
        for _ in range(count):
            yield rng.integers(0, 255, 1 << 20, dtype=np.uint8)
    tracemalloc.start()
    mn.RaggedMmap.from_generator(os.path.join(tmp, "bigm"), gen(), 16)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    table.add("ragged (1 MB samples)", "peak memory / one batch", peak / (16 << 20), None, unit="×",
              target="≤2.5×")


def strings_bench(tmp, table, n, rng, published=None):
    words = string_samples(n)
    nbytes = sum(len(w.encode()) for w in words)
    encoded = [w.encode() for w in words]
    (t, floor_w), (d, _) = best_of_each([lambda p: mn.StringsMmap.from_generator(p, iter(words), 4096),
                                         lambda p: plain_write(p, encoded)], tmp)
    txt_dir = os.path.join(tmp, "txt")
    os.makedirs(txt_dir, exist_ok=True)
    k = min(n, 2000)

    def write_txt():
        for i in range(k):
            with open(os.path.join(txt_dir, f"{i}.txt"), "w", encoding="utf-8") as f:
                f.write(words[i])
    t_txt = best(write_txt, repeat=1)
    table.add("strings (~50 B)", "create from generator", nbytes / t / 1e6, nbytes / floor_w / 1e6,
              "plain f.write", per_file=nbytes / n * k / t_txt / 1e6, unit="MB/s")
    if published:
        table.add("strings (~50 B)", "create from generator vs 0.8.2", nbytes / t / 1e6,
                  published["strings_create"], "published", unit="MB/s", target="≥300%")
    store = mn.StringsMmap(d)
    buf = b"".join(encoded)
    offs = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).tolist()
    idx = [int(i) for i in rng.integers(0, n, 4096)]

    def floor_get():
        for i in idx:
            buf[offs[i]:offs[i + 1]].decode()

    def ours_get():
        for i in idx:
            store[i]

    def files_get():
        for i in idx[:500]:
            with open(os.path.join(txt_dir, f"{i % k}.txt"), encoding="utf-8") as f:
                f.read()
    ours, floor = per_sample(len(idx), ours_get, floor_get, number=1, repeat=25)  # (see random_gets)
    table.add("strings (~50 B)", "random get", ours, floor,
              "bytes slice + decode", per_file=best(files_get, repeat=3) / 500 * 1e6, target="≤1.5×")
    if published:
        table.add("strings (~50 B)", "random get vs 0.8.2", ours, published["strings_get"], "published")
    few = idx[:256]

    def floor_few():
        for i in few:
            buf[offs[i]:offs[i + 1]].decode()
    table.add("strings (~50 B)", "batch get (256 idx)", *per_sample(256, lambda: store[few], floor_few),
              "bytes slice + decode")

    def floor_all():
        for i in range(n):
            buf[offs[i]:offs[i + 1]].decode()
    table.add("strings (~50 B)", "sequential iteration", *per_sample(n, lambda: consume(store), floor_all, number=1),
              "bytes slice + decode")
    shutil.rmtree(txt_dir)
    # memory: peak traced allocations while converting strings that the generator makes (as a
    # reader of text files would), against one batch of 4096 of them as str objects
    one = sum(map(sys.getsizeof, words[:4096]))
    tracemalloc.start()
    mn.StringsMmap.from_generator(os.path.join(tmp, "strings_memory"), (w.encode().decode() for w in words), 4096)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    table.add("strings (~50 B)", "peak memory / one batch", peak / one, None, unit="×", target="≤2.5×")


def numpy_bench(tmp, table, n, rng, published=None):
    rows = row_samples(n // 5)  # 2 KB each: 40 MB
    nbytes = sum(r.nbytes for r in rows)
    (t, floor), _ = best_of_each([lambda p: mn.np_from_generator(p, iter(rows), 4096),
                                  lambda p: plain_write(p, rows)], tmp)
    table.add("numpy (2 KB rows)", "create from generator", nbytes / t / 1e6, nbytes / floor / 1e6,
              "plain f.write", unit="MB/s")
    if published:
        table.add("numpy (2 KB rows)", "create from generator vs 0.8.2", nbytes / t / 1e6,
                  published["numpy_create"], "published", unit="MB/s")
    arr = rng.random((n, 64), dtype=np.float32)
    (t, floor), (d, _) = best_of_each([lambda p: mn.np_from_ndarray(p, arr), lambda p: plain_write(p, [arr])], tmp)
    table.add("numpy (64 float32 rows)", "create from array", arr.nbytes / t / 1e6, arr.nbytes / floor / 1e6,
              "plain f.write", unit="MB/s")
    m = mn.np_open_existing(d)
    idx = [int(i) for i in rng.integers(0, n, 4096)]

    def ours():
        for i in idx:
            m[i]

    def floor_get():
        for i in idx:
            arr[i]
    table.add("numpy (64 float32 rows)", "random get (np.memmap: numpy's own)",
              *per_sample(len(idx), ours, floor_get, number=1), "in-memory row")
    plain = np.asarray(m)

    def ours_plain():
        for i in idx:
            plain[i]
    table.add("numpy (64 float32 rows)", "random get via np.asarray(memmap)",
              *per_sample(len(idx), ours_plain, floor_get, number=1), "in-memory row")
    table.add("numpy (64 float32 rows)", "sequential iteration via np.asarray(memmap)",
              *per_sample(n, lambda: consume(plain), lambda: consume(arr), number=1), "in-memory rows")
    batch = np.asarray(idx[:256])
    table.add("numpy (64 float32 rows)", "batch get (256 idx, a copy)",
              *per_sample(256, lambda: m[batch], lambda: arr[batch]), "in-memory fancy index")
    row = np.ones((1, 64), np.float32)
    table.add("numpy (64 float32 rows)", "np_extend_dir (1 row)", best(lambda: mn.np_extend_dir(d, row), number=50) * 1e6)


def conversion_bench(tmp, table, n):
    """ShardedMmap.from_indexable from a store (which pickles as its path), on 1 and 2 worker
    processes: a local process pool, as a Dask cluster's executor would run it."""
    from concurrent.futures import ProcessPoolExecutor
    _, samples = image_samples(n)
    source = mn.RaggedMmap.from_generator(os.path.join(tmp, "conv-src"), iter(samples), 4096)
    size = sum(s.nbytes for s in samples) / 1e6

    def convert(workers):
        def run(path):
            with ProcessPoolExecutor(workers) as pool:
                mn.ShardedMmap.from_indexable(path, source, 4, executor=pool)
        return run
    (one, two), _ = best_of_each([convert(1), convert(2)], tmp, repeat=3)
    table.add("sharded conversion (images)", "4 shards, 1 worker process", size / one, unit="MB/s")
    table.add("sharded conversion (images)", "4 shards, 2 worker processes", size / two, size / one,
              "1 worker process", unit="MB/s")


def scaling_bench(tmp, table, small, large):
    """open and append cost at `small` and `large` samples (tiny samples, to keep creation quick)."""
    results = {}
    for n in (small, large):
        d = os.path.join(tmp, f"scale{n}")
        s = os.path.join(tmp, f"scales{n}")
        lengths = np.random.default_rng(n).integers(1, 8, n)
        mn.RaggedMmap.from_generator(d, (np.full(k, 7, np.uint8) for k in lengths), 1 << 16)
        mn.StringsMmap.from_generator(s, ("x" * int(k) for k in lengths), 1 << 16)
        a = os.path.join(tmp, f"scalen{n}")
        mn.np_from_ndarray(a, lengths.astype(np.uint8))
        store, strings = mn.RaggedMmap(d), mn.StringsMmap(s)
        sample = np.arange(10, dtype=np.uint8)
        results[n] = dict(
            open=best(lambda: mn.RaggedMmap(d), number=50) * 1e6,
            append=best(lambda: store.append(sample), number=200) * 1e6,
            open_s=best(lambda: mn.StringsMmap(s), number=50) * 1e6,
            append_s=best(lambda: strings.append("hello world"), number=200) * 1e6,
            open_n=best(lambda: mn.np_open_existing(a), number=50) * 1e6,
            append_n=best(lambda: mn.np_extend_dir(a, sample[:1]), number=200) * 1e6)
        store.close()
        strings.close()
    a, b = results[small], results[large]
    for key, store, op in (("open", "ragged", "open"), ("append", "ragged", "append 1 sample"),
                           ("open_s", "strings", "open"), ("append_s", "strings", "append 1 string"),
                           ("open_n", "numpy", "np_open_existing"), ("append_n", "numpy", "np_extend_dir 1 row")):
        table.add(store, f"{op} at {large:,} samples", b[key], a[key], f"same at {small:,}",
                  target="≤1.5×" + (", <100 µs" if "append" in key else ""))


# ---- Cold reads (--cold): data not in the page cache ------------------------------------------

def store_files(*paths):
    return [os.path.join(r, f) for p in paths for r, _, fs in os.walk(p) for f in fs] + \
        [p for p in paths if os.path.isfile(p)]


def cached_bytes(files):
    """Bytes of files in the page cache (fincore); None when fincore is not installed."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(int(x) for x in out.split())


def evict(*paths):
    """Drop the files under paths from the page cache (no map of them may be open: pages that
    a process maps are not dropped) and check that they are gone; returns the bytes left."""
    files = store_files(*paths)
    gc.collect()
    left = None
    for _ in range(20):  # pages still being read are skipped: try again once their I/O ends
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        left = cached_bytes(files)
        if not left:
            return left
        time.sleep(0.1)
    raise RuntimeError(f"could not evict {paths}: {left} bytes still cached")


def cold_runs(pairs, repeat=3):
    """Median seconds of each (prepare, run) pair, run cold: evict, prepare (open, untimed),
    run (timed). The pairs are interleaved and each round starts one pair later, so that this
    VM's phases fall on all of them alike; a first round is not timed: on this VM, memory left
    free for a few seconds (as eviction leaves it) goes back to the host, and the next large
    read runs at a quarter of its speed while it comes back, whoever reads."""
    times = [[] for _ in pairs]
    for round_ in range(repeat + 1):
        for k in range(len(pairs)):
            k = (k + round_) % len(pairs)
            paths, prepare, run = pairs[k]
            evict(*paths)
            state = prepare()
            t0 = time.perf_counter()
            run(state)
            elapsed = time.perf_counter() - t0
            del state
            if round_:
                times[k].append(elapsed)
    return [sorted(t)[len(t) // 2] for t in times]


def pread_all(path, ranges):
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, stop in ranges:
            os.pread(fd, stop - start, start)
    finally:
        os.close(fd)


def scan_1mb(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)


def cold_bench(tmp, table, scale):
    probe = os.path.join(tmp, "evictable")
    with open(probe, "wb") as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        os.fsync(f.fileno())
    try:
        evict(probe)
    except RuntimeError:  # (tmpfs: the page cache is the file's only copy)
        print(f"cold rows skipped: the page cache cannot be dropped for files in {tmp}", file=sys.stderr)
        return
    rng = np.random.default_rng(7)
    n_img, n_tok = max(400, int(2000 * scale)), max(5000, int(300_000 * scale))  # 184 MB, 600 MB
    images = mn.RaggedMmap.from_generator(os.path.join(tmp, "cold-images"), (
        rng.integers(0, 255, (int(rng.integers(100, 141)), 256, 3), dtype=np.uint8) for _ in range(n_img)), 256)
    tokens = mn.RaggedMmap.from_generator(os.path.join(tmp, "cold-tokens"), (
        rng.integers(0, 50_000, int(rng.integers(300, 701)), dtype=np.int32) for _ in range(n_tok)), 4096)
    texts = mn.StringsMmap.from_generator(os.path.join(tmp, "cold-strings"), (
        "ü" + "x" * int(rng.integers(1000, 3000)) for _ in range(n_tok // 2)), 4096)
    stores = {"images": images, "tokens": tokens, "strings": texts}
    layout = {k: (s.out_dir, os.path.join(s.out_dir, "data.ninja"), (s.starts * s._io.itemsize).tolist(),
                  (s.ends * s._io.itemsize).tolist()) for k, s in stores.items()}
    for s in stores.values():
        s.close()
    files = os.path.join(tmp, "cold-files")  # one .npy per image, for the images read
    os.makedirs(files)
    pick = {k: rng.choice(len(v[2]), 300, replace=False).tolist() for k, v in layout.items()}
    with mn.RaggedMmap(layout["images"][0]) as store:
        for i in pick["images"]:
            np.save(os.path.join(files, f"{i}.npy"), store[i])
    open_store = {"images": mn.RaggedMmap, "tokens": mn.RaggedMmap, "strings": mn.StringsMmap}

    def gets(kind, evicted=None):
        """Random gets, and their floor, with data.ninja dropped from the page cache (a store's
        index, 24 bytes a sample, is read by every access and stays cached in a long run), or
        the paths `evicted`."""
        d, data, starts, ends = layout[kind]
        ranges = [(starts[i], ends[i]) for i in pick[kind]]
        copy = (lambda x: x) if kind == "strings" else np.array
        return [((evicted or data,), lambda: open_store[kind](d), lambda s: consume(copy(s[i]) for i in pick[kind])),
                ((data,), lambda: None, lambda s: pread_all(data, ranges))]

    # single random gets, each sample copied out
    ours, floor, per_file = cold_runs(gets("images") + [((files,), lambda: None, lambda s: consume(
        np.load(os.path.join(files, f"{i}.npy")) for i in pick["images"]))])
    table.add("ragged (images ~92 KB), cold", "random get", ours / 300 * 1e6, floor / 300 * 1e6, "os.pread",
              per_file / 300 * 1e6, target="≤1.3×")
    for kind, label in (("tokens", "ragged (tokens ~2 KB), cold"), ("strings", "strings (~2 KB), cold")):
        ours, floor = cold_runs(gets(kind))
        table.add(label, "random get", ours / 300 * 1e6, floor / 300 * 1e6, "os.pread", target="≤1.3×")
    # the same with the index dropped too, on a fresh open: the first reads also wait for the
    # index files' pages (7 MB here, read once, ~8 us a read over these 300)
    ours, floor = cold_runs(gets("tokens", evicted=layout["tokens"][0]))
    table.add("ragged (tokens ~2 KB), all files cold", "random get", ours / 300 * 1e6, floor / 300 * 1e6, "os.pread")
    # batch reads: store[indices], get_padded, ShardedMmap[indices] (each sample copied out)
    for kind, batch in (("images", 64), ("images", 256), ("tokens", 256), ("strings", 256)):
        d, data, starts, ends = layout[kind]
        idx = rng.choice(len(starts), min(1024, len(starts)), replace=False)
        batches = [idx[b:b + batch] for b in range(0, len(idx), batch)]
        ranges = [(starts[i], ends[i]) for i in idx.tolist()]
        copy = (lambda xs: xs) if kind == "strings" else (lambda xs: consume(map(np.array, xs)))
        runs = [((d,), lambda: open_store[kind](d), lambda s: consume(copy(s[b]) for b in batches)),
                ((data,), lambda: None, lambda s: pread_all(data, ranges))]
        if kind != "strings":
            runs.append(((d,), lambda: open_store[kind](d), lambda s: consume(s.get_padded(b) for b in batches)))
        got = cold_runs(runs)
        name = {"images": "ragged (images), cold", "tokens": "ragged (tokens), cold", "strings": "strings (~2 KB), cold"}[kind]
        table.add(name, f"batch get ({batch} idx)", got[0] / len(idx) * 1e6, got[1] / len(idx) * 1e6,
                  "os.pread", target="≤1×")
        if kind != "strings":
            table.add(name, f"get_padded ({batch} idx)", got[2] / len(idx) * 1e6, got[1] / len(idx) * 1e6,
                      "os.pread", target="≤1×")
    halves = [os.path.join(tmp, f"cold-shard-{k}") for k in (0, 1)]
    with mn.RaggedMmap(layout["images"][0]) as store:
        for k, path in enumerate(halves):
            mn.RaggedMmap.from_lists(path, [np.array(x) for x in store[k::2]]).close()
    idx = rng.choice(len(layout["images"][2]), min(512, len(layout["images"][2])), replace=False)
    half_layout = []
    for path in halves:
        with mn.RaggedMmap(path) as s:
            half_layout.append((os.path.join(path, "data.ninja"), s.starts.tolist(), s.ends.tolist()))
    local = [(k % 2, k // 2) for k in idx.tolist()]
    ours, floor = cold_runs([(halves, lambda: mn.ShardedMmap(halves), lambda s: consume(
        np.array(x) for b in range(0, len(idx), 256) for x in s[idx[b:b + 256]])),
        (halves, lambda: None, lambda s: [pread_all(half_layout[h][0], [(half_layout[h][1][i], half_layout[h][2][i])])
                                          for h, i in local])])
    table.add("sharded (2 image shards), cold", "batch get (256 idx)", ours / len(idx) * 1e6,
              floor / len(idx) * 1e6, "os.pread", target="≤1×")
    # sequential iteration, each sample copied out, against a 1 MB pread scan of the same bytes
    for kind in ("images", "tokens", "strings"):
        d, data, starts, ends = layout[kind]
        copy = (lambda x: x) if kind == "strings" else np.array
        ours, floor = cold_runs([((d,), lambda: open_store[kind](d), lambda s: consume(map(copy, s))),
                                 ((data,), lambda: None, lambda s: scan_1mb(data))])
        size = os.path.getsize(data) / 1e6
        name = {"images": "ragged (images), cold", "tokens": "ragged (tokens), cold", "strings": "strings (~2 KB), cold"}[kind]
        table.add(name, "sequential iteration", size / ours, size / floor, "1 MB os.pread scan", unit="MB/s",
                  target="≥80%")
    # a quasi-random epoch of the tokens, each batch read with store[batch] and each sample
    # copied out: cold, against the same epoch hot and against a sequential scan
    d, data, _, _ = layout["tokens"]
    size = os.path.getsize(data) / 1e6

    def epoch(store):
        for batch in mn.QuasiRandomSampler(store, 256):
            consume(map(np.array, store[batch]))
    cold, scan = cold_runs([((d,), lambda: mn.RaggedMmap(d), epoch), ((data,), lambda: None, lambda s: scan_1mb(data))])
    with mn.RaggedMmap(d) as store:
        epoch(store)  # (warm)
        hot = best(lambda: epoch(store), 3)
    table.add("ragged (tokens), quasi-random epoch", "cold vs the same epoch hot", size / cold, size / hot,
              "hot epoch", unit="MB/s", target="≥80%")
    table.add("ragged (tokens), quasi-random epoch", "cold vs a sequential scan", size / cold, size / scan,
              "1 MB os.pread scan", unit="MB/s", target="≥30%")

    def reopened():  # hot, but mapped afresh, as a DataLoader worker does each epoch by default
        with mn.RaggedMmap(d) as store:
            epoch(store)
    table.add("ragged (tokens), quasi-random epoch", "cold vs the same epoch hot, opened afresh", size / cold,
              size / best(reopened, 3), "hot epoch, new object", unit="MB/s")
    # the same with a training step per batch that the loop waits for (a GPU's, say: 0.7 ms per
    # 256 samples, ~0.6 GB/s hot): whether the I/O hides behind the loop when the loop, not the
    # disk, is the limit (the epoch above, hot, runs about as fast as this disk reads). And a
    # shorter one, the loop near 1 GB/s hot: a cold epoch costs the loop's thread a roughly fixed
    # extra (mapping 600 MB of new pages: ~150 ms here), which a slow loop hides and a fast one shows
    for step in (0.0007, 0.0002):
        def epoch_with_step(store):
            for batch in mn.QuasiRandomSampler(store, 256):
                consume(map(np.array, store[batch]))
                time.sleep(step)
        (cold,) = cold_runs([((d,), lambda: mn.RaggedMmap(d), epoch_with_step)])
        with mn.RaggedMmap(d) as store:
            hot = best(lambda: epoch_with_step(store), 3)
        table.add("ragged (tokens), quasi-random epoch", f"with a {step * 1e3:.1f} ms step per batch: cold vs hot",
                  size / cold, size / hot, "hot epoch", unit="MB/s", target="≥80%" if step == 0.0007 else "")
    with mn.RaggedMmap(d) as store:
        order = np.random.default_rng(3).permutation(len(store))[:2048]

        def random_epoch(s):
            for b in range(0, len(order), 256):
                consume(map(np.array, s[order[b:b + 256]]))
    (rand,) = cold_runs([((d,), lambda: mn.RaggedMmap(d), random_epoch)])
    table.add("ragged (tokens), random order", "cold, store[batch] of 256 (2,048 samples)",
              len(order) * size / n_tok / rand, size / scan, "1 MB os.pread scan", unit="MB/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few seconds")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the sample counts")
    parser.add_argument("--json", default="bench_results.json", help="where to write the figures")
    parser.add_argument("--published", metavar="DIR", help="also run the published package installed in DIR")
    parser.add_argument("--cold", action="store_true", help="add reads of data not in the page cache (Linux, "
                        "needs fincore to check the eviction)")
    parser.add_argument("--only", choices=["cold"], help="run only these rows")
    args = parser.parse_args()
    scale = args.scale * (0.05 if args.quick else 1.0)
    # 100k images (77 MB) and 500k strings (25 MB): large enough that creating the ~50 files of
    # a store (fixed; up to 12 ms when this VM's file system is slow) does not decide the figures
    n = max(500, int(100_000 * scale))
    rng = np.random.default_rng(0)
    random.seed(0)
    table = Table()
    tmp = tempfile.mkdtemp(prefix="ninja-bench-")
    try:
        published = published_figures(args.published, n, tmp) if args.published else None
        if published:
            store = mn.RaggedMmap.from_generator(os.path.join(tmp, "append"), iter(image_samples(n)[1]), 4096)
            published["ragged_append_ours"] = best(lambda: store.append(np.zeros((4, 4, 3), np.uint8)), 3, 20) * 1e6
        if args.only is None:
            ragged_bench(tmp, table, n, rng, published)
            strings_bench(tmp, table, n * 5, rng, published)
            numpy_bench(tmp, table, n, rng, published)
            large_sample_bench(tmp, table, max(8, int(64 * scale)))  # 1 MB samples: 64 MB per run
            scaling_bench(tmp, table, max(200, int(20_000 * scale)), max(2000, int(2_000_000 * scale)))
            conversion_bench(tmp, table, n)
        if args.cold or args.only == "cold":
            cold_bench(tmp, table, scale)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}"
    print(f"mmap_ninja {mn.__version__} on {machine}\n")
    print(table.markdown())
    with open(args.json, "w") as f:
        json.dump({"machine": machine, "version": mn.__version__, "rows": table.rows}, f, indent=1)


if __name__ == "__main__":
    main()
