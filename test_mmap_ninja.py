"""Tests for mmap_ninja.py. Needs only numpy and pytest: python -m pytest -q"""
import bisect
import errno
import gc
import json
import mmap
import os
import pathlib
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import mmap_ninja
from mmap_ninja import RaggedMmap, ShardedMmap, StringsMmap, Wrapped, open_existing
from mmap_ninja import numpy as np_ninja

HERE = pathlib.Path(__file__).resolve().parent
LEGACY = HERE / "testdata" / "legacy-stores"
HAS_ZSTD = mmap_ninja._zstd_module() is not None
needs_zstd = pytest.mark.skipif(not HAS_ZSTD, reason="no zstd module (Python 3.14+ or zstandard)")
HAS_TORCH = __import__("importlib").util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")


def run_python(code, cwd=HERE, env=None, **kwargs):
    full_env = dict(os.environ, PYTHONPATH=str(HERE))
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, **kwargs)


def snapshot(path):
    """Every file under path with its bytes: a refused write must leave this unchanged."""
    path = pathlib.Path(path)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_samples(actual, expected):
    """Samples equal in values, dtypes and shapes; a scalar sample reads as a Python scalar
    (as the published package returns it), equal to the expected 0-d array's item()."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        e = np.asarray(e)
        if e.ndim == 0:
            assert type(a) is type(e.item()) and a == e.item(), (a, e)
            continue
        assert isinstance(a, np.ndarray)
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(a, e)


# ---------------------------------------------------------------------------------------------
# Helpers shared by several sections
# ---------------------------------------------------------------------------------------------

def make_store(kind, path):
    if kind == "numpy":
        return np_ninja.from_ndarray(path, np.arange(6).reshape(3, 2))
    if kind == "ragged":
        return RaggedMmap.from_lists(path, [np.arange(3), np.arange(4).reshape(2, 2), np.array(7)])
    return StringsMmap.from_strings(path, ["a", "bé", "", "cd"])


def failing_generator(sample):
    yield sample
    yield sample
    raise RuntimeError("the source broke halfway")


def hidden_leftovers(path):
    """What builds of new stores left beside or inside path (nothing, when all went well)."""
    path = pathlib.Path(path)
    where = [path.parent] + ([path] if path.is_dir() else [])
    return [p.name for d in where for p in d.iterdir() if ".ninja-new-" in p.name]


def write_int64(path, index, value):
    with open(path, "r+b") as f:
        f.seek(8 * index)
        f.write(np.array([value], "<i8").tobytes())


def verify_all(kind, d):
    store = np_ninja.open_existing(d) if kind == "numpy" else open_existing(d)
    for k in range(len(store)):
        got, want = store[k], expected_sample(kind, k)
        if kind == "strings":
            assert got == want, (k, got, want)
        else:
            assert got.shape == want.shape and (got == want).all(), (k, got, want)
    return len(store)


def expected_sample(kind, k):
    if kind == "ragged":
        return np.full((2, k % 4 + 1), k, np.int64) if k % 3 == 0 else np.full(k % 5, k, np.int64)
    if kind == "strings":
        return str(k) * (k % 5)
    return np.arange(k, k + 3)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mmap_ninja", *map(str, args)], cwd=HERE,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(HERE)))


def readme_block(start):
    text = (HERE / "README.md").read_text(encoding="utf-8")
    code = text[text.index(start):]
    return code[:code.index("```")]


# ---------------------------------------------------------------------------------------------
# Format I/O: the files of a store, read and written with clear errors
# ---------------------------------------------------------------------------------------------

def _legacy_cases():
    for version in ("0.8.2", "0.9.0"):
        expected = json.loads((LEGACY / version / "expected.json").read_text())["stores"]
        for name, spec in expected.items():
            yield pytest.param(version, name, spec, id=f"{version}-{name}")


def legacy_cases():
    return list(_legacy_cases())


def check_against_expected(store, spec):
    if spec["type"] == "numpy":
        arr = spec["array"]
        assert isinstance(store, np.memmap)
        assert store.dtype == np.dtype(arr["dtype"]) and store.shape == tuple(arr["shape"])
        np.testing.assert_array_equal(store, np.array(arr["values"], arr["dtype"]).reshape(arr["shape"]))
    elif spec["type"] == "ragged" and "scalars" in spec:
        assert list(store) == spec["scalars"]  # Python scalars, as the published package reads them
        assert all(type(s) is type(e) for s, e in zip(store, spec["scalars"]))
    elif spec["type"] == "ragged":
        assert_same_samples(list(store), [np.array(s["values"], s["dtype"]).reshape(s["shape"])
                                          for s in spec["samples"]])
    else:
        assert isinstance(store, StringsMmap)
        assert list(store) == spec["strings"]


@pytest.mark.parametrize("version, name, spec", legacy_cases())
def test_legacy_store_opens_and_matches(version, name, spec):
    if name.startswith("strings_zstd") and not HAS_ZSTD:
        with pytest.raises(ModuleNotFoundError, match="zstandard"):
            open_existing(LEGACY / version / name)
        pytest.skip("zstd store: no zstd module here")
    check_against_expected(open_existing(LEGACY / version / name), spec)


@pytest.mark.parametrize("version, name, spec", legacy_cases())
def test_legacy_store_accepts_appends(version, name, spec, tmp_path):
    if name.startswith("strings_zstd") and not HAS_ZSTD:
        pytest.skip("zstd store: no zstd module here")
    import shutil
    store_dir = tmp_path / name
    shutil.copytree(LEGACY / version / name, store_dir)
    if spec["type"] == "numpy":
        if open_existing(store_dir).flags.f_contiguous and len(spec["array"]["shape"]) > 1:
            before = snapshot(store_dir)
            with pytest.raises(ValueError, match="Fortran-order store of 2 dimensions would rewrite every byte"):
                np_ninja.extend_dir(store_dir, np.zeros((1,) + tuple(spec["array"]["shape"][1:]), np.int16))
            assert snapshot(store_dir) == before
            return
        before = np.array(open_existing(store_dir))
        row = np.ones_like(before[:1])
        assert np_ninja.extend_dir(store_dir, row) is None  # as published
        np.testing.assert_array_equal(np_ninja.open_existing(store_dir), np.concatenate([before, row]))
    elif spec["type"] == "ragged":
        store = RaggedMmap(store_dir)
        before = [np.array(s) for s in store]
        extra = np.ones(3, store.dtype)
        store.append(extra)
        assert_same_samples(RaggedMmap(store_dir), before + [extra])
    else:
        store = StringsMmap(store_dir)
        before = list(store)
        store.extend(["new", "ünï"])
        assert list(StringsMmap(store_dir)) == before + ["new", "ünï"]


def test_writers_never_follow_symlinks_out_of_the_store(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 3)  # as long as the data it stands for: opening works
    d = tmp_path / "r"
    RaggedMmap.from_lists(d, [np.arange(3)])
    (d / "data.ninja").unlink()
    (d / "data.ninja").symlink_to(victim)
    with pytest.raises(PermissionError, match="data.ninja is a symbolic link: mmap_ninja never writes through links"):
        RaggedMmap(d).append(np.arange(2))
    with pytest.raises(PermissionError, match="never writes through links"):
        RaggedMmap(d, mode="r+")[0] = [1, 2, 3]
    assert victim.read_bytes() == b"precious" * 3
    other = tmp_path / "elsewhere"  # a symlinked part: starts/ leads outside
    RaggedMmap.from_lists(tmp_path / "s", [np.arange(3)])
    shutil.copytree(tmp_path / "s" / "starts", other)
    shutil.rmtree(tmp_path / "s" / "starts")
    (tmp_path / "s" / "starts").symlink_to(other, target_is_directory=True)
    before = snapshot(other)
    with pytest.raises(PermissionError, match="leads outside the store"):
        RaggedMmap(tmp_path / "s").append(np.arange(2))
    assert snapshot(other) == before
    np_ninja.from_ndarray(tmp_path / "n", np.arange(3))
    (tmp_path / "n" / "data.ninja").unlink()
    (tmp_path / "n" / "data.ninja").symlink_to(victim)
    for attempt in (lambda: np_ninja.extend_dir(tmp_path / "n", np.arange(1)),
                    lambda: np_ninja.open_existing(tmp_path / "n", mode="r+")):
        with pytest.raises(PermissionError, match="never writes through links"):
            attempt()
    assert victim.read_bytes() == b"precious" * 3


def test_temporary_names_cannot_be_planted(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = tmp_path / "r"
    RaggedMmap.from_lists(d, [])  # float64, empty: the first append rewrites dtype.ninja
    for pid in range(os.getpid() - 5, os.getpid() + 50):  # the old, predictable names
        (d / f"dtype.ninja.tmp-{pid}").symlink_to(victim)
    RaggedMmap(d).append(np.arange(2, dtype=np.int16))
    assert victim.read_bytes() == b"precious" and RaggedMmap(d).dtype == np.int16
    names = {mmap_ninja._unique("x") for _ in range(100)}
    assert len(names) == 100 and all(n.startswith(f"x{os.getpid()}-") for n in names)


HOSTILE_FILES = """
import os, sys, numpy as np, mmap_ninja as mn
root = sys.argv[1]
def report(label, fn):
    try:
        fn()
        print(label, "no error")
    except (ValueError, OSError) as e:
        print(label, type(e).__name__, "ok" if root in str(e) else "NO PATH: " + str(e))
for kind, name in [("r", "type.ninja"), ("r", "dtype.ninja"), ("r", "shape.ninja"), ("r", "data.ninja"),
                   ("n", "data.ninja"), ("s", "data.ninja"), ("r", "starts/shape.ninja")]:
    d = os.path.join(root, kind + name.replace("/", "_"))
    {"r": lambda: mn.RaggedMmap.from_lists(d, [np.arange(3)]), "n": lambda: mn.np_from_ndarray(d, np.arange(3)),
     "s": lambda: mn.StringsMmap.from_strings(d, ["abc"])}[kind]()
    os.remove(os.path.join(d, name))
    os.mkfifo(os.path.join(d, name))
    report(f"fifo {kind} {name} open", lambda: len(mn.open_existing(d)))
    report(f"fifo {kind} {name} append", lambda: mn.RaggedMmap(d).append(np.arange(2)) if kind == "r" else None)
    print(f"fifo {kind} {name} verify", "ok" if mn._verify(d) else "NOTHING FOUND")
    report(f"fifo {kind} {name} info", lambda: mn._store_report(d))
d = os.path.join(root, "zero")
mn.RaggedMmap.from_lists(d, [np.arange(3)])
os.remove(os.path.join(d, "dtype.ninja"))
os.symlink("/dev/zero", os.path.join(d, "dtype.ninja"))
report("zero dtype open", lambda: mn.RaggedMmap(d))
print("zero dtype verify", "ok" if mn._verify(d) else "NOTHING FOUND")
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_and_devices_never_hang(tmp_path):
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE_FILES)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, PYTHONPATH=str(HERE)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 7 * 4 + 2
    for line in lines:  # opens and verify always find the damage; no error ever lacks the path
        assert line.endswith(" ok") or line.endswith("no error") and (" append" in line or " info" in line), line
    assert "fifo r type.ninja open ValueError ok" in lines and "zero dtype open ValueError ok" in lines


def limited_memory_python(code, limit_mb, tmp_path):
    """Run code in a Python whose address space is capped at limit_mb more than it needs to
    start (an unbounded allocation then fails instead of swapping)."""
    prelude = f"""
        import resource, numpy, mmap_ninja
        with open('/proc/self/statm') as f:
            base = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (base + {limit_mb} * 2**20,) * 2)
        """
    return run_python(textwrap.dedent(prelude) + textwrap.dedent(code), cwd=tmp_path,
                      env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}, timeout=60)


@linux_only
def test_huge_metadata_is_refused_quickly_in_bounded_memory(tmp_path):
    RaggedMmap.from_lists(tmp_path / "r", [np.arange(3)])
    (tmp_path / "r" / "dtype.ninja").write_text("[" + "1," * 1_000_000 + "]")
    np_ninja.from_ndarray(tmp_path / "n", np.arange(3))
    (tmp_path / "n" / "shape.ninja").write_bytes(b"\xff" * 8 * 1000)
    result = limited_memory_python(f"""
        import time
        for d in ({str(tmp_path / 'r')!r}, {str(tmp_path / 'n')!r}):
            t0 = time.perf_counter()
            try:
                mmap_ninja.open_existing(d)
            except ValueError as e:
                assert "larger than" in str(e) and d in str(e), e
            assert time.perf_counter() - t0 < 2
            assert mmap_ninja._verify(d) and time.perf_counter() - t0 < 4
        print("ok")""", 64, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_paths_that_are_files_are_refused(tmp_path):
    (tmp_path / "afile.txt").write_text("hello")
    np.save(tmp_path / "arr.npy", np.arange(3))
    for attempt in (lambda: RaggedMmap(tmp_path / "afile.txt"), lambda: StringsMmap(tmp_path / "afile.txt"),
                    lambda: open_existing(tmp_path / "afile.txt"), lambda: RaggedMmap.from_lists(tmp_path / "afile.txt", [])):
        with pytest.raises(NotADirectoryError, match="afile.txt is a file"):
            attempt()
    with pytest.raises(NotADirectoryError, match="arr.npy is a file.*np.load it, or convert it with python -m mmap_ninja from-npy"):
        np_ninja.open_existing(tmp_path / "arr.npy")
    assert (tmp_path / "afile.txt").read_text() == "hello"
    missing = RaggedMmap(tmp_path / "missing")  # a missing directory stays an empty store
    assert len(missing) == 0 and "empty: no store there yet" in repr(missing)
    assert "empty: no store there yet" in repr(StringsMmap(tmp_path / "missing2"))


def test_disk_full_names_the_store_and_keeps_it(tmp_path, monkeypatch):
    stores = [make_store(kind, tmp_path / kind) for kind in ("ragged", "strings", "numpy")]
    before = {kind: snapshot(tmp_path / kind) for kind in ("ragged", "strings", "numpy")}

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "writev", full)
    monkeypatch.setattr(os, "pwrite", full)
    for path, attempt in [(tmp_path / "ragged", lambda: stores[0].append(np.arange(5))),
                          (tmp_path / "strings", lambda: stores[1].append("more")),
                          (tmp_path / "numpy", lambda: np_ninja.extend_dir(tmp_path / "numpy", [[1, 2]])),
                          (tmp_path / "ragged", lambda: RaggedMmap(tmp_path / "ragged", mode="r+").__setitem__(0, [1, 1, 1]))]:
        with pytest.raises(OSError, match=f"No space left on device: cannot write to the store {path}") as raised:
            attempt()
        assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert {kind: snapshot(tmp_path / kind) for kind in ("ragged", "strings", "numpy")} == before
    stores[0].append(np.arange(5))  # and it carries on once there is space
    assert open_existing(tmp_path / "ragged")[-1].tolist() == [0, 1, 2, 3, 4]


def test_short_writes_are_completed(tmp_path, monkeypatch):
    """Linux writes at most 0x7ffff000 bytes per call; every write loop carries on after a short one."""
    real_write, real_pwrite = os.write, os.pwrite
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, memoryview(data)[:7]))
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real_pwrite(fd, memoryview(data)[:7], offset))
    monkeypatch.setattr(os, "writev", lambda fd, buffers: real_write(fd, memoryview(buffers[0]).cast("B")[:7]))
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(50), np.arange(6).reshape(2, 3)])
    store.append(np.arange(20, dtype=np.int64))
    store[0] = np.arange(50)[::-1]
    strings = StringsMmap.from_strings(tmp_path / "s", ["ünïcode " * 10] * 3)
    strings[1] = "x" * len(("ünïcode " * 10).encode())
    np_ninja.from_ndarray(tmp_path / "n", np.arange(30).reshape(10, 3))
    np_ninja.extend_dir(tmp_path / "n", np.arange(9).reshape(3, 3))
    monkeypatch.undo()
    assert_same_samples(RaggedMmap(tmp_path / "r"), [np.arange(50)[::-1], np.arange(6).reshape(2, 3), np.arange(20)])
    assert list(StringsMmap(tmp_path / "s")) == ["ünïcode " * 10, "x" * 100, "ünïcode " * 10]
    assert np_ninja.open_existing(tmp_path / "n").tolist() == np.concatenate([np.arange(30), np.arange(9)]).reshape(13, 3).tolist()


def test_read_only_stores_refuse_writes(tmp_path):
    RaggedMmap.from_lists(tmp_path / "r", [np.arange(3)])
    StringsMmap.from_strings(tmp_path / "s", ["abc"])
    np_ninja.from_ndarray(tmp_path / "n", np.arange(3))
    before = {name: snapshot(tmp_path / name) for name in "rsn"}
    attempts = [lambda: RaggedMmap(tmp_path / "r", mode="r").__setitem__(0, [1, 2, 3]),
                lambda: StringsMmap(tmp_path / "s", mode="r").__setitem__(0, "xyz"),
                lambda: np_ninja.open_existing(tmp_path / "n").__setitem__(0, 5)]
    for attempt, error in zip(attempts, ["open read-only.*mode='r\\+'"] * 2 + ["read-only"]):
        with pytest.raises(ValueError, match=error):
            attempt()
    assert {name: snapshot(tmp_path / name) for name in "rsn"} == before
    # appends work in any mode, as published: they write the store, not the map
    snapshot_view = np_ninja.open_existing(tmp_path / "n")
    np_ninja.append(snapshot_view, 5)
    np_ninja.extend(snapshot_view, [6, 7])
    RaggedMmap(tmp_path / "r", mode="r").append(np.arange(2))
    assert np_ninja.open_existing(tmp_path / "n").tolist() == [0, 1, 2, 5, 6, 7] and snapshot_view.tolist() == [0, 1, 2]
    assert [s.tolist() for s in RaggedMmap(tmp_path / "r")] == [[0, 1, 2], [0, 1]]
    RaggedMmap.from_lists(tmp_path / "r", [np.arange(3)])
    private = RaggedMmap(tmp_path / "r", mode="c")  # copy-on-write: this process's map only
    private[0] = [7, 7, 7]
    assert private[0].tolist() == [7, 7, 7] and snapshot(tmp_path / "r") == before["r"]


def _make_read_only(root):
    for path, dirs, files in os.walk(root):
        os.chmod(path, 0o555)
        for name in files:
            os.chmod(os.path.join(path, name), 0o444)


def test_read_only_user_opens_everything(tmp_path):
    import tempfile
    root = tempfile.mkdtemp(prefix="ninja-ro-", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        np_ninja.from_ndarray(os.path.join(root, "n"), np.arange(4))
        RaggedMmap.from_lists(os.path.join(root, "r"), [np.arange(3)])
        StringsMmap.from_strings(os.path.join(root, "s"), ["abc"])
        RaggedMmap.from_lists(os.path.join(root, "u"), [np.arange(3)])
        _make_read_only(root)
        os.chmod(os.path.join(root, "u", "dtype.ninja"), 0)  # unreadable metadata
        os.chmod(root, 0o755)
        code = f"""
            import os, numpy as np, mmap_ninja as mn
            if os.geteuid() == 0:  # root ignores file permissions: become nobody
                os.setgid(65534)
                os.setuid(65534)
            r = {root!r}
            assert mn.np_open_existing(r + '/n').tolist() == [0, 1, 2, 3]
            assert mn.RaggedMmap(r + '/r')[0].tolist() == [0, 1, 2]
            assert mn.StringsMmap(r + '/s')[0] == 'abc'
            assert [len(mn.open_existing(r + '/' + k)) for k in 'nrs'] == [4, 1, 1]
            for attempt in (lambda: mn.RaggedMmap(r + '/r').append(np.arange(2)),
                            lambda: mn.StringsMmap(r + '/s').append('x'),
                            lambda: mn.np_extend_dir(r + '/n', np.arange(2))):
                try:
                    attempt()
                except PermissionError as e:
                    assert r in str(e), e
                else:
                    raise AssertionError('write to a read-only store succeeded')
            try:
                mn.RaggedMmap(r + '/u')
            except PermissionError as e:
                assert "cannot read dtype " + r + "/u/dtype.ninja" in str(e), e
            else:
                raise AssertionError('an unreadable dtype.ninja opened')
            print('ok')
            """
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                                text=True, cwd="/", env=dict(os.environ, PYTHONPATH=str(HERE)))
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    finally:
        for path, dirs, files in os.walk(root):
            os.chmod(path, 0o755)
        import shutil
        shutil.rmtree(root)


@linux_only
def test_failed_extends_leak_no_descriptors(tmp_path):
    np_ninja.from_ndarray(tmp_path / "n", np.arange(3))
    (tmp_path / "n" / "shape.ninja").rename(tmp_path / "shape.ninja")
    (tmp_path / "n" / "shape.ninja").mkdir()

    def count():  # (earlier tests' objects that wait for the cycle collector, or prefetch
        for _ in range(500):  # threads that have not ended yet, hold descriptors)
            if not mmap_ninja._ASIDE_FDS:
                break
            time.sleep(0.01)
        gc.collect()
        return len(os.listdir("/proc/self/fd"))
    before = count()
    for _ in range(50):
        with pytest.raises(ValueError):
            np_ninja.extend_dir(tmp_path / "n", np.arange(1))
    assert count() == before


@linux_only
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_running_out_of_descriptors_names_the_store_and_the_remedy(tmp_path):
    for k in range(4):
        RaggedMmap.from_lists(tmp_path / "shards" / f"s{k}", [np.ones((2, 2)), np.ones((3, 2))])
    result = run_python(f"""
        import os, resource, mmap_ninja
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 10, hard))
        try:
            mmap_ninja.ShardedMmap({str(tmp_path / "shards")!r})
        except OSError as e:
            print(e.errno, e)""")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"24 \[Errno 24\] {re.escape(str(tmp_path / 'shards'))}/s\d: this process has no file "
                        rf"descriptor left to open the store with \((cannot open .*: )?Too many open files\): an "
                        rf"open store holds a few .* raise it \(ulimit -n; .*\) or close the stores you are "
                        rf"done with", result.stdout.strip()), result.stdout


def test_no_leaked_descriptors(tmp_path):
    RaggedMmap.from_lists(tmp_path / "r", [np.arange(3), np.ones((2, 2), int)])
    StringsMmap.from_strings(tmp_path / "s", ["a", "b"])
    np_ninja.from_ndarray(tmp_path / "n", np.arange(3))

    def count():  # (objects of earlier tests that wait for the cycle collector hold descriptors)
        gc.collect()
        return len(os.listdir("/proc/self/fd"))
    for _ in range(20):  # warm up caches
        RaggedMmap(tmp_path / "r").close()
    before = count()
    for _ in range(1000):
        with RaggedMmap(tmp_path / "r") as r:
            r[1]
        with StringsMmap(tmp_path / "s") as s:
            s[0]
        np_ninja.open_existing(tmp_path / "n")
    assert count() == before
    store = RaggedMmap(tmp_path / "r")
    for i in range(1000):
        store.append(np.arange(i % 7))
        StringsMmap(tmp_path / "s").append("x")
        if i % 100 == 0:
            store[len(store) - 1]
    np_ninja.extend_dir(tmp_path / "n", np.arange(2))
    store.close()
    assert count() == before


@pytest.fixture
def ragged_dir(tmp_path):
    RaggedMmap.from_lists(tmp_path / "r", [np.arange(4), np.arange(2)])
    return tmp_path / "r"


def test_damaged_data_file_shorter_than_metadata(ragged_dir):
    with open(ragged_dir / "data.ninja", "r+b") as f:
        f.truncate(20)
    with pytest.raises(ValueError, match=r"data.ninja holds 20 bytes but its metadata needs 48"):
        RaggedMmap(ragged_dir)


def test_damaged_offsets_past_data(ragged_dir):
    (ragged_dir / "ends" / "data.ninja").write_bytes(np.array([4, 60], "<i8").tobytes())
    with pytest.raises(ValueError, match=r"r: sample 1 ends at element 60 but the data holds 6"):
        RaggedMmap(ragged_dir)
    assert any("offsets reach element 60" in p for p in mmap_ninja._verify(str(ragged_dir)))


def test_damaged_missing_metadata(ragged_dir):
    os.remove(ragged_dir / "dtype.ninja")
    with pytest.raises(FileNotFoundError, match=r"dtype is missing: .*dtype.ninja does not exist"):
        RaggedMmap(ragged_dir)


def test_damaged_unknown_type_and_dtype(ragged_dir):
    (ragged_dir / "dtype.ninja").write_text("__import__('os').system('echo pwned')")
    with pytest.raises(ValueError, match=r"cannot parse dtype \"__import__"):
        RaggedMmap(ragged_dir)
    (ragged_dir / "dtype.ninja").write_text("[('a', 'O')]")
    with pytest.raises(ValueError, match="holds Python objects"):
        RaggedMmap(ragged_dir)
    (ragged_dir / "type.ninja").write_text("tensor")
    with pytest.raises(ValueError, match="unknown store type 'tensor'"):
        open_existing(ragged_dir)


def test_damaged_shape_file(tmp_path):
    np_ninja.from_ndarray(tmp_path / "n", np.arange(3))
    (tmp_path / "n" / "shape.ninja").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not a multiple of 8"):
        np_ninja.open_existing(tmp_path / "n")
    np_ninja.from_ndarray(tmp_path / "m", np.arange(3))
    (tmp_path / "m" / "shape.ninja").write_bytes(np.array([9], "<u8").tobytes())
    with pytest.raises(ValueError, match=r"data.ninja holds 24 bytes but shape.ninja says \(9,\) of int64, 72 bytes"):
        np_ninja.open_existing(tmp_path / "m")


def test_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a mmap_ninja store"):
        open_existing(tmp_path)


FUZZ = """
import os, pathlib, random, resource, shutil, sys, numpy as np, mmap_ninja as mn
kind, root, seed = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
with open('/proc/self/statm') as f:  # an unbounded allocation fails here instead of swapping
    resource.setrlimit(resource.RLIMIT_AS, (int(f.read().split()[0]) * resource.getpagesize() + (512 << 20),) * 2)
rng = random.Random(seed)
outside = root / "outside"
outside.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))

def build(d):
    if kind == "numpy":
        mn.np_from_ndarray(d, np.arange(24, dtype=np.int32).reshape(8, 3))
    elif kind == "flat":
        mn.RaggedMmap.from_lists(d, [np.arange(k, dtype=np.int16) for k in range(6)] + [np.array(9, np.int16)])
    elif kind == "nested":
        mn.RaggedMmap.from_lists(d, [np.full((k % 3 + 1, 2), k, np.float32) for k in range(6)] + [np.array(1, np.float32)])
    elif kind == "strings":
        mn.StringsMmap.from_strings(d, ["", "a", "bé", "çde", "f" * 40])
    else:
        mn.StringsMmap.from_strings(d, ["zstd text %d ü" % k for k in range(20)], zstd_level=3, zstd_train_dictionary_size=256)

def read_all(d):
    store = mn.np_open_existing(d) if kind == "numpy" else mn.open_existing(d)
    return store, [store[i] for i in range(len(store))]

def read_each(d):  # each sample, or None where reading it fails
    try:
        store = mn.np_open_existing(d) if kind == "numpy" else mn.open_existing(d)
    except Exception:
        return []
    got = []
    for i in range(len(store)):
        try:
            got.append(store[i])
        except Exception:
            got.append(None)
    return got

def same(a, b):
    if isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and (a == b).all()
    return type(a) is type(b) and a == b

def damage(path, how, rel):
    if how == "missing":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif how == "directory":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        path.mkdir()
    elif how == "fifo":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.mkfifo(path)
    elif how in ("zero", "outside"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        path.symlink_to("/dev/zero" if how == "zero" else outside)
    else:
        raw = bytearray(path.read_bytes())
        if how == "truncate":
            raw = raw[:rng.randrange(len(raw))] if raw else raw
            if kind == "numpy" and str(rel) == "shape.ninja" and len(raw) % 8 == 0:
                raw = raw[:-1]  # (whole axes lost make another valid shape: nothing can tell)
        elif how == "extend":
            raw += bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 8, 4096])))
        elif how == "flip" and raw:
            for _ in range(rng.choice([1, 1, 3])):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        path.write_bytes(raw)

pristine = root / "pristine"
build(pristine)
_, expected = read_all(pristine)
extra = "appended" if kind in ("strings", "zstd") else np.ones((3,) if kind == "numpy" else 2, {"numpy": np.int32, "flat": np.int16, "nested": np.float32}[kind])
cases = problems = 0
entries = sorted(pristine.rglob("*"))
for entry in entries:
    rel = entry.relative_to(pristine)
    for how in (["truncate", "extend", "flip", "flip", "flip", "missing", "directory", "fifo", "zero", "outside"]
                if entry.is_file() else ["missing", "outside"]):
        if how in ("flip", "outside") and str(rel) == "data.ninja":
            continue  # other sample bytes are other values: nothing can tell them apart
        cases += 1
        d = root / f"case{cases}"
        shutil.copytree(pristine, d, symlinks=True)
        damage(d / rel, how, rel)
        label = f"{rel} {how}:"

        def clear(e):  # a standard exception that names the store
            global problems
            if not isinstance(e, (ValueError, OSError, TypeError)) or str(d) not in str(e):
                problems += 1
                print(label, "UNCLEAR", type(e).__name__, e)
        # The count is the commit point: lowered by damage, it reads as the store before its
        # last appends (a prefix of the samples), which appends then overwrite; nothing can tell.
        counts = str(rel) in ("starts/shape.ninja", "shape.ninja" if kind == "numpy" else "")
        try:
            store, got = read_all(d)
        except Exception as e:
            clear(e)
        else:
            if len(got) > len(expected) or len(got) < len(expected) and not counts or \
                    not all(same(a, b) for a, b in zip(got, expected)):
                problems += 1
                print(label, "WRONG DATA", len(got), len(expected))
        found = mn._verify(str(d))
        if not isinstance(found, list) or any(str(d) not in p for p in found):
            problems += 1
            print(label, "VERIFY", found)
        readable = read_each(d)
        try:
            if kind == "numpy":
                mn.np_extend_dir(d, extra[None])
            else:
                (mn.StringsMmap(d) if kind in ("strings", "zstd") else mn.RaggedMmap(d)).append(extra)
        except Exception as e:
            clear(e)
        else:  # accepted: every sample that read right still does, and a sound store stays sound
            after = read_each(d)
            kept = (len(after) == len(expected) + 1 or counts and len(after) <= len(expected)) and all(
                same(a, b) for a, b, r in zip(after[:-1], expected, readable) if r is not None and same(r, b))
            if not kept or (not found and (mn._verify(str(d)) or not same(after[-1], extra))):
                problems += 1
                print(label, "APPEND LOST DATA", kept, found, mn._verify(str(d)))
        shutil.rmtree(d, ignore_errors=True)
print("cases", cases, "problems", problems)
"""


@linux_only
@pytest.mark.parametrize("kind", ["numpy", "flat", "nested", "strings", "zstd"])
def test_fuzz_damaged_files_give_the_right_data_or_a_clear_error(kind, tmp_path):
    """Every file (and directory) of every store kind damaged in seeded ways: truncated,
    extended, bits flipped, removed, replaced by a directory, a FIFO or a symlink. Opening,
    reading every sample, verify and append then give the right data or a standard exception
    naming the store: never wrong data, a hang, a signal or an unbounded allocation."""
    if kind == "zstd" and not HAS_ZSTD:
        pytest.skip("no zstd module")
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ)
    (tmp_path / "work").mkdir()
    result = subprocess.run([sys.executable, str(script), kind, str(tmp_path / "work"), "2024"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(HERE), OPENBLAS_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.splitlines()[-1].endswith("problems 0"), result.stdout[-5000:]
    assert int(result.stdout.split()[-3]) > 40  # cases run


def misuse_cases(tmp_path):
    """(what, call): misuses that must raise a standard error naming the store."""
    r = RaggedMmap.from_lists(tmp_path / "r", [np.arange(3, dtype=np.uint8), np.arange(2, dtype=np.uint8)])
    RaggedMmap.from_lists(tmp_path / "g", [np.arange(2)] * 2)
    gone = pickle.loads(pickle.dumps(RaggedMmap(tmp_path / "g")))  # (maps on its first read)
    RaggedMmap.from_lists(tmp_path / "g", [])
    np_ninja.from_ndarray(tmp_path / "zero_d", np.array(5))
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    cases = [
        ("r[()]", lambda: r[()], TypeError, "got the tuple"),
        ("r[[1, 2**70]]", lambda: r[[1, 2**70]], IndexError, "index 1180591620717411303424 is out of range"),
        ("r[uint64 2**64-1]", lambda: r[np.array([2**64 - 1], np.uint64)], IndexError, "out of range"),
        ("pad -1 in uint8", lambda: r.get_padded([0, 1], pad_value=-1), TypeError, "pad_value=-1 would change"),
        ("pad 0.5 in uint8", lambda: r.get_padded([0, 1], pad_value=0.5), TypeError, "pad_value=0.5 would change"),
        ("pad nan in uint8", lambda: r.get_padded([0, 1], pad_value=np.nan), TypeError, "pad_value=nan would change"),
        ("shard of a 0-d store", lambda: ShardedMmap([tmp_path / "zero_d"]), ValueError, "0-d numpy store"),
        ("dangling symlink", lambda: RaggedMmap(tmp_path / "dangling"), FileNotFoundError, "symlink to nothing"),
        ("a sample gone", lambda: gone[0], IndexError, "sample 0 is gone: the store now holds 0 samples"),
    ]
    if hasattr(np.dtypes, "StringDType"):
        cases.append(("StringDType", lambda: r.append(np.array(["a"], dtype=np.dtypes.StringDType())),
                      TypeError, "variable-width StringDType"))
    if HAS_ZSTD:
        cases.append(("zstd level 23", lambda: StringsMmap.from_strings(tmp_path / "z", ["a"], zstd_level=23),
                      ValueError, "zstd cannot compress at zstd_level=23"))
    return cases


def test_misuse_gives_clear_errors(tmp_path):
    for what, call, error, message in misuse_cases(tmp_path):
        with pytest.raises(error, match=message) as e:
            call()
        assert str(tmp_path) in str(e.value), what
    assert not (tmp_path / "z").exists()


# ---------------------------------------------------------------------------------------------
# Samples: what can be stored, and the one cast policy
# ---------------------------------------------------------------------------------------------

ALIGNED = np.dtype([("a", "i1"), ("b", "i8")], align=True)  # no text form round-trips it: refused


CASTS = [  # (store dtype, value appended, stored exactly as, or None: refused)
    (np.uint8, [1, 2], [1, 2]),
    (np.uint8, np.array([255], np.uint16), [255]),
    (np.uint8, np.array([256], np.uint16), None),
    (np.int16, np.array([-300, 300], np.int64), [-300, 300]),
    (np.int16, np.array([40000], np.int64), None),
    (np.float32, [0.1], [np.float32(0.1)]),  # rounding a float: accepted
    (np.float32, [1e300], None),  # a finite float that overflows
    (np.float32, [2**40 + 1], None),  # an integer float32 cannot hold exactly
    (np.float64, [2**62 + 1], None),
    (np.float64, [np.nan, -np.inf], [np.nan, -np.inf]),
    (np.int64, [3.0, -2.0], [3, -2]),  # whole numbers in range fit
    (np.int64, [3.5], None),
    (np.float64, [1 + 0j], [1.0]),
    (np.float64, [1 + 1j], None),
    (np.dtype("U3"), ["abc"], ["abc"]),
    (np.dtype("U3"), ["abcd"], None),
    (np.dtype("M8[s]"), np.array(["2020-01-01T00:00:01"], "M8[ms]"), [np.datetime64("2020-01-01T00:00:01")]),
    (np.dtype("M8[s]"), np.array(["2020-01-01T00:00:01.5"], "M8[ms]"), None),
    (np.int64, ["5"], None),  # a str is not a number
]


@pytest.mark.parametrize("dtype, value, stored", CASTS, ids=lambda x: str(x)[:20])
def test_one_cast_policy_everywhere(dtype, value, stored, tmp_path):
    dtype = np.dtype(dtype)
    seed = np.zeros(len(value), dtype)
    ragged = RaggedMmap.from_lists(tmp_path / "r", [seed])
    np_ninja.from_ndarray(tmp_path / "n", seed[None])
    writes = {  # how: (the store's directory, write, read back)
        "append": ("r", lambda: ragged.append(value), lambda: RaggedMmap(tmp_path / "r")[-1]),
        "setitem": ("r", lambda: ragged.__setitem__(0, value), lambda: RaggedMmap(tmp_path / "r")[0]),
        "extend_dir": ("n", lambda: np_ninja.extend_dir(tmp_path / "n", [value]),
                       lambda: np_ninja.open_existing(tmp_path / "n")[-1]),
        "from_lists": ("f", lambda: RaggedMmap.from_lists(tmp_path / "f", [seed, value]),
                       lambda: RaggedMmap(tmp_path / "f")[-1]),
    }
    for how, (name, write, read) in writes.items():
        path = tmp_path / name
        before = snapshot(path) if path.exists() else None
        if stored is None:
            with pytest.raises(TypeError, match="without losing values|cannot store values of dtype"):
                write()
            assert (snapshot(path) if path.exists() else None) == before, how
        else:
            write()
            got = read()
            assert got.dtype == dtype, how
            np.testing.assert_array_equal(got, np.array(stored, dtype), err_msg=how)


@pytest.mark.parametrize("batch_size", [1, 10])
def test_the_first_sample_chooses_the_dtype_whatever_the_batch_size(batch_size, tmp_path):
    store = RaggedMmap.from_generator(tmp_path / "ok", iter([np.arange(2), np.array([2.0, 3.0])]), batch_size)
    assert store.dtype == np.int64 and store[1].tolist() == [2, 3]
    with pytest.raises(TypeError, match="dtype float64 in a store of dtype int64 without losing"):
        RaggedMmap.from_generator(tmp_path / "no", iter([np.arange(2), np.array([2.5])]), batch_size)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("samples", [[], [np.zeros(0), np.zeros(0)], [np.zeros((3, 0, 2))]], ids=["none", "empty", "3x0x2"])
def test_stores_without_data(samples, tmp_path):
    d = tmp_path / "r"
    store = RaggedMmap.from_lists(d, samples)
    with RaggedMmap(d) as again:
        assert len(again) == len(samples)
    store.close()
    assert mmap_ninja._verify(str(d)) == [] and "samples:  %d" % len(samples) in "\n".join(mmap_ninja._store_report(str(d))[1])
    reader = RaggedMmap(d)
    reader.append(np.zeros((0,) * max(1, np.ndim(samples[0]) if samples else 1)))
    assert len(reader) == len(samples) + 1 and reader[-1].size == 0
    reader.close()
    sharded = ShardedMmap([d, d])
    assert sharded[[]] == [] and sharded[np.array([], np.int64)] == [] and sharded[np.zeros(len(sharded), bool)] == []


def test_zero_size_dtypes_are_refused(tmp_path):
    with pytest.raises(TypeError, match="has size 0"):
        np_ninja.from_ndarray(tmp_path / "n", np.zeros(3, np.dtype([])))
    assert not (tmp_path / "n").exists()
    RaggedMmap.from_lists(tmp_path / "r", [np.array([b"ab"], "S2")])
    (tmp_path / "r" / "dtype.ninja").write_text("S0")
    with pytest.raises(ValueError, match="dtype 'S0' has size 0"):
        RaggedMmap(tmp_path / "r")
    assert any("has size 0" in p for p in mmap_ninja._verify(str(tmp_path / "r")))


EXACT_DTYPES = [">f4", ">i8", "<U7", "S5", "bool", "float16", "complex64", ">c16",
                "datetime64[ns]", "timedelta64[s]", "M8[D]",
                [("x", "<i4"), ("y", ">f8", (2,)), ("name", "U3")]]


def sample_values(dtype, n):
    dtype = np.dtype(dtype)
    raw = np.arange(n * dtype.itemsize, dtype=np.uint8) % 7
    values = raw.view(dtype) if dtype.kind not in "USMmb" else None
    if dtype.kind == "U":
        values = np.array([f"ü{i}"[: dtype.itemsize // 4] for i in range(n)], dtype)
    elif dtype.kind == "S":
        values = np.array([f"b{i}".encode() for i in range(n)], dtype)
    elif dtype.kind in "Mm":
        values = np.arange(n).astype(dtype)
    elif dtype.kind == "b":
        values = np.arange(n) % 2 == 0
    return np.ascontiguousarray(values)


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_exact_dtypes_round_trip_everywhere(dtype, tmp_path):
    dtype = np.dtype(dtype)
    values = sample_values(dtype, 6)
    assert values.dtype == dtype
    m = np_ninja.from_ndarray(tmp_path / "n", values.reshape(3, 2))
    np_ninja.extend_dir(tmp_path / "n", values[:2].reshape(1, 2))
    reopened = np_ninja.open_existing(tmp_path / "n")
    assert reopened.dtype == dtype and m.dtype == dtype
    np.testing.assert_array_equal(reopened, np.concatenate([values.reshape(3, 2), values[:2].reshape(1, 2)]))
    ragged = RaggedMmap.from_lists(tmp_path / "r", [values[:1], values[1:4].reshape(3, 1)])
    ragged.append(values[4:])
    assert_same_samples(RaggedMmap(tmp_path / "r"), [values[:1], values[1:4].reshape(3, 1), values[4:]])
    text = (tmp_path / "n" / "dtype.ninja").read_text()
    if text.startswith("["):  # structured: old readers' np.dtype(text) fails loudly, never misreads
        import ast
        with pytest.raises(TypeError):
            np.dtype(text)
        assert np.dtype(ast.literal_eval(text)) == dtype
    else:
        assert np.dtype(text) == dtype  # what old readers do: exact


def test_native_dtypes_keep_published_names(tmp_path):
    for dtype, text in [(np.float32, "float32"), (np.int64, "int64"), (np.uint8, "uint8"), (bool, "bool")]:
        np_ninja.from_ndarray(tmp_path / text, np.zeros(2, dtype))
        assert (tmp_path / text / "dtype.ninja").read_text() == text


def test_object_dtype_is_refused(tmp_path):
    with pytest.raises(TypeError, match="object dtype"):
        np_ninja.from_ndarray(tmp_path / "o", np.array([1, "a", None], dtype=object))
    with pytest.raises(TypeError, match="not array-like"):
        RaggedMmap.from_lists(tmp_path / "r", [{"a": 1}])


@pytest.mark.parametrize("how", ["from_lists", "from_generator", "from_indexable"])
@pytest.mark.parametrize("value, dtype", [([300, 1000], np.uint8), ([1.5, 2.7], np.int32), ([-1], np.uint16),
                                          ([2**62 + 1], np.float64), (["hello"], "<U2")])
def test_the_dtype_argument_follows_the_cast_policy(how, value, dtype, tmp_path):
    """from_*(dtype=...) casts as appends do: values that would change are refused (TypeError),
    and the old store stays; values that fit are stored exactly."""
    d = tmp_path / "r"
    RaggedMmap.from_lists(d, [np.arange(3)])
    before = snapshot(d)
    write = {"from_lists": lambda samples: RaggedMmap.from_lists(d, samples, dtype=dtype),
             "from_generator": lambda samples: RaggedMmap.from_generator(d, iter(samples), 2, dtype=dtype),
             "from_indexable": lambda samples: RaggedMmap.from_indexable(d, samples, 2, dtype=dtype)}[how]
    with pytest.raises(TypeError, match="without losing values|cannot store"):
        write([np.asarray(value)])
    assert snapshot(d) == before and hidden_leftovers(d) == []
    fitting = np.asarray(value[:0] + [1] if np.dtype(dtype).kind != "U" else ["he"])
    stored = write([fitting])
    assert stored[0].dtype == np.dtype(dtype) and stored[0].tolist() == fitting.astype(dtype).tolist()


# ---------------------------------------------------------------------------------------------
# Writers: one at a time per store; new stores built aside and swapped in
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["numpy", "ragged", "strings"])
def test_recreating_keeps_the_old_store_until_the_new_one_is_complete(kind, tmp_path):
    d = tmp_path / "s"
    make_store(kind, d)
    before = snapshot(d)
    attempts = {
        "numpy": [(TypeError, lambda: np_ninja.from_ndarray(d, np.zeros(3, ALIGNED))),
                  (RuntimeError, lambda: np_ninja.from_generator(d, failing_generator(np.zeros(2)), 1))],
        "ragged": [(TypeError, lambda: RaggedMmap.from_lists(d, [np.zeros(3, ALIGNED)])),
                   (RuntimeError, lambda: RaggedMmap.from_generator(d, failing_generator(np.zeros(2)), 1))],
        "strings": [(TypeError, lambda: StringsMmap.from_strings(d, ["x", 5])),
                    (RuntimeError, lambda: StringsMmap.from_generator(d, failing_generator("x"), 1))],
    }[kind]
    for error, attempt in attempts:
        with pytest.raises(error):
            attempt()
        assert snapshot(d) == before and hidden_leftovers(d) == []
    assert mmap_ninja._verify(str(d)) == []


def test_recreating_a_store_replaces_it(tmp_path):
    RaggedMmap.from_lists(tmp_path / "s", [np.arange(3), np.ones((2, 2))])
    np_ninja.from_ndarray(tmp_path / "s", np.arange(4))  # a numpy store where a ragged one was
    assert open_existing(tmp_path / "s").tolist() == [0, 1, 2, 3]
    assert sorted(os.listdir(tmp_path / "s")) == ["data.ninja", "dtype.ninja", "order.ninja",
                                                  "shape.ninja", "type.ninja"]
    StringsMmap.from_strings(tmp_path / "s", ["x"])
    assert list(open_existing(tmp_path / "s")) == ["x"]


def test_a_failed_first_append_writes_nothing(tmp_path):
    d = tmp_path / "r"
    with pytest.raises(TypeError, match="cannot be stored exactly"):
        RaggedMmap(d).append(np.zeros(2, ALIGNED))
    with pytest.raises(TypeError, match="has size 0"):
        RaggedMmap(d).append(np.zeros(2, np.dtype([])))
    assert not d.exists() and len(RaggedMmap(d)) == 0
    RaggedMmap(d).append(np.arange(2))
    assert_same_samples(RaggedMmap(d), [np.arange(2)])


@pytest.mark.parametrize("kind", ["ragged", "strings"])
def test_a_directory_without_type_ninja_is_no_store_yet(kind, tmp_path):
    """What a creation killed before its end leaves (or a creation in progress: parts holding
    no sample, no type.ninja) reads as an empty store, not as damage; the next writer clears it
    and starts afresh. Samples without type.ninja, though, are damage: nothing clears them."""
    d = tmp_path / "s"
    (RaggedMmap if kind == "ragged" else StringsMmap)(d).extend([])
    mmap_ninja._create_sequence(str(d), np.int64, False, raw=kind == "strings")
    os.remove(d / "type.ninja")  # killed just before its last step
    (d / "type.ninja.tmp-123-abc").write_bytes(b"rag")
    (d / "notes.txt").write_text("the user's")
    store = RaggedMmap(d) if kind == "ragged" else StringsMmap(d)
    assert len(store) == 0 and "empty: no store there yet" in repr(store)
    store.append(np.array([5, 6]) if kind == "ragged" else "new")
    if kind == "ragged":
        assert_same_samples(open_existing(d), [np.array([5, 6])])
    else:
        assert list(open_existing(d)) == ["new"]
    assert mmap_ninja._verify(str(d)) == []
    assert "type.ninja.tmp-123-abc" not in os.listdir(d) and (d / "notes.txt").read_text() == "the user's"
    os.remove(d / "type.ninja")  # now it held a sample: damage
    before = snapshot(d)
    expected = f"type.ninja is missing, but the directory holds 1 samples: the store is damaged, or not completely copied \\(finish the copy\\); if it is a {'ragged' if kind == 'ragged' else 'string'} store"
    for attempt in (lambda: RaggedMmap(d) if kind == "ragged" else StringsMmap(d),
                    lambda: store.append(np.array([1]) if kind == "ragged" else "x")):
        with pytest.raises(ValueError, match=expected):
            attempt()
    assert snapshot(d) == before


def test_bare_strings_and_failed_creations_leave_nothing(tmp_path):
    with pytest.raises(TypeError, match="takes a sequence .* got a single str; wrap it in a list"):
        StringsMmap.from_strings(tmp_path / "s", "hello")
    with pytest.raises(TypeError, match="StringsMmap holds str only, got int 1"):
        StringsMmap.from_strings(tmp_path / "t", [1, 2, 3])
    store = StringsMmap.from_strings(tmp_path / "u", ["a"])
    with pytest.raises(TypeError, match="got a single str"):
        store.extend("abc")
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists() and list(store) == ["a"]
    (tmp_path / "binary.txt").write_bytes(b"ok\n\xff\xfe\x00 not utf-8\n")
    result = cli("from-lines", tmp_path / "binary.txt", tmp_path / "lines")
    assert result.returncode == 2 and f"{tmp_path / 'binary.txt'} is not UTF-8 text" in result.stderr
    assert not (tmp_path / "lines").exists() and hidden_leftovers(tmp_path / "lines") == []


def test_torn_leftovers_are_ignored_then_overwritten(tmp_path):
    d = tmp_path / "r"
    RaggedMmap.from_lists(d, [np.arange(3), np.arange(2)])
    # what a writer killed before its commit point leaves: bytes past the committed end of data
    # and of ends, with their lengths already committed; starts (the count) not yet
    with open(d / "data.ninja", "ab") as f:
        f.write(np.full(4, 99, np.int64).tobytes())
    (d / "shape.ninja").write_bytes(np.array([9], "<u8").tobytes())
    with open(d / "ends" / "data.ninja", "ab") as f:
        f.write(np.array([9], "<i8").tobytes())
    (d / "ends" / "shape.ninja").write_bytes(np.array([3], "<u8").tobytes())
    assert_same_samples(RaggedMmap(d), [np.arange(3), np.arange(2)])
    assert mmap_ninja._verify(str(d)) == []
    RaggedMmap(d).append(np.array([7]))
    assert_same_samples(RaggedMmap(d), [np.arange(3), np.arange(2), np.array([7])])
    assert os.path.getsize(d / "data.ninja") == 6 * 8  # the leftovers were overwritten
    assert (d / "shape.ninja").read_bytes() == np.array([6], "<u8").tobytes()


def test_a_file_system_without_locks_is_said_aloud(tmp_path, monkeypatch):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(2)])

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(mmap_ninja.fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match=f"{tmp_path / 'r'}: cannot lock the store .*writing without a lock"):
        store.append(np.arange(3))
    assert len(RaggedMmap(tmp_path / "r")) == 2


FORKED_APPENDS = """
import multiprocessing, sys, numpy as np, mmap_ninja as mn
kind, d = sys.argv[1], sys.argv[2]
store = mn.RaggedMmap(d) if kind == "ragged" else mn.StringsMmap(d)  # made before the fork
store.append(np.array([-1]) if kind == "ragged" else "start")  # its writer is open when the pool forks

def work(tag):
    for i in range(400):
        store.append(np.full(1 + i % 3, tag * 1000 + i) if kind == "ragged" else f"{tag}-{i}")
    return tag

if __name__ == "__main__":
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert sorted(pool.map(work, [1, 2])) == [1, 2]
    print("ok")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
@pytest.mark.parametrize("kind", ["ragged", "strings"])
def test_forked_processes_appending_through_one_inherited_object(kind, tmp_path):
    script, d = tmp_path / "forked.py", tmp_path / "s"
    script.write_text(FORKED_APPENDS)
    result = subprocess.run([sys.executable, str(script), kind, str(d)], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, PYTHONPATH=str(HERE)), cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    store = open_existing(d)
    assert len(store) == 801 and mmap_ninja._verify(str(d)) == []
    if kind == "ragged":
        got = sorted((int(s[0]), len(s)) for s in store[1:])
        assert all((s == s[0]).all() for s in store[1:])
        expected = sorted((tag * 1000 + i, 1 + i % 3) for tag in (1, 2) for i in range(400))
    else:
        got, expected = sorted(store[1:]), sorted(f"{tag}-{i}" for tag in (1, 2) for i in range(400))
    assert got == expected


@pytest.mark.parametrize("kind", ["ragged", "strings"])
def test_threads_appending_and_reading_through_one_object(kind, tmp_path):
    import threading
    d = tmp_path / "s"
    store = RaggedMmap(d) if kind == "ragged" else StringsMmap(d)
    errors = []

    def append(tag):
        try:
            for i in range(300):
                store.append(np.full(1 + i % 3, tag * 1000 + i) if kind == "ragged" else f"{tag}-{i}")
        except Exception as e:  # pragma: no cover - the failure this test looks for
            errors.append(e)

    def read():
        try:
            while any(t.is_alive() for t in threads[:2]):
                n = len(store)
                if n:
                    store[n - 1], store[0], store[:n]
        except Exception as e:  # pragma: no cover
            errors.append(e)
    threads = [threading.Thread(target=append, args=(tag,)) for tag in (1, 2)] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(store) == 600 and len(open_existing(d)) == 600
    assert mmap_ninja._verify(str(d)) == []
    values = sorted(int(s[0]) for s in open_existing(d)) if kind == "ragged" else sorted(open_existing(d))
    assert values == sorted(tag * 1000 + i for tag in (1, 2) for i in range(300)) if kind == "ragged" \
        else values == sorted(f"{tag}-{i}" for tag in (1, 2) for i in range(300))


class _RemappedMidRead:
    """A store's data source whose slicing lets "another thread" act right after the slice:
    the races of reads against a remap (after an append) or close(), made deterministic."""

    def __init__(self, source, meanwhile):
        self.source, self.meanwhile = source, meanwhile

    def __getitem__(self, item):
        sample = self.source[item]
        self.meanwhile()
        return sample


def test_a_link_named_like_a_dead_build_is_never_followed(tmp_path):
    """Re-creating a store clears what dead builds left beside it; an entry named like one
    that is a symlink (planted, or unpacked from an archive) must not lead that clean-up into
    the directory it points to, which would move its files into the store."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    RaggedMmap.from_lists(tmp_path / "data" / "images", [np.arange(3)])
    link = tmp_path / "data" / ".images.ninja-new-999999999-abc"  # (no such process)
    link.symlink_to(tmp_path / "docs")
    RaggedMmap.from_lists(tmp_path / "data" / "images", [np.arange(4)])
    assert os.listdir(tmp_path / "docs") == ["thesis.tex"] and (tmp_path / "docs" / "thesis.tex").read_text() == "precious"
    assert not (tmp_path / "data" / "images" / "thesis.tex").exists() and link.is_symlink()
    assert_same_samples(RaggedMmap(tmp_path / "data" / "images"), [np.arange(4)])


def test_a_sub_array_dtype_is_refused_before_anything_is_written(tmp_path):
    """np.dtype('(2,)i2') makes each element an array: a sample cast to it grows axes (3
    values read back as 12). Given as dtype=, it is refused; found in dtype.ninja, the store
    is damaged."""
    x = np.array([1, 2, 3], np.int16)
    message = r"is a sub-array dtype \(each element an array of shape \(2,\)\); pass its element dtype, int16"
    for make in (lambda d: RaggedMmap.from_lists(d, [x], dtype="(2,)i2"),
                 lambda d: RaggedMmap.from_generator(d, iter([x]), 1, dtype="(2,)i2"),
                 lambda d: RaggedMmap.from_indexable(d, [x], 1, dtype="(2,)i2"),
                 lambda d: RaggedMmap.from_lists(d, [], dtype="(2,)i2")):
        with pytest.raises(TypeError, match=f"{re.escape(str(tmp_path / 'r'))}: dtype .*{message}"):
            make(tmp_path / "r")
        assert not (tmp_path / "r").exists()
    for samples in ([np.arange(4, dtype=np.int32).reshape(2, 2)], [np.arange(4, dtype=np.int32)]):
        d = tmp_path / f"damaged{samples[0].ndim}"
        RaggedMmap.from_lists(d, samples)
        (d / "dtype.ninja").write_text("(2,)i2")
        damaged = f"{re.escape(str(d / 'dtype.ninja'))}: dtype '\\(2,\\)i2' is a sub-array dtype, which no writer stores.*the store is damaged"
        with pytest.raises(ValueError, match=damaged):
            RaggedMmap(d)
        assert any("is a sub-array dtype" in p for p in mmap_ninja._verify(d))


@pytest.mark.parametrize("first_read", ["single", "batch"])
def test_nested_reads_use_a_common_trailing_shape_only_while_every_checked_page_has_it(first_read, tmp_path):
    """The hot path reshapes a nested sample to (-1, *trailing axes) when every page it has
    checked shares them (_narrow_tail); a page that differs, read first or appended later,
    turns that off for the object, and every sample keeps its own shape."""
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 9, (int(h), 4, 3)).astype(np.int16) for h in rng.integers(0, 6, 1100)]
    store = RaggedMmap.from_lists(tmp_path / "r", images)
    if first_read == "batch":
        assert_same_samples(store[list(range(1100))], images)  # (the regular layout checks every page)
    assert_same_samples([store[i] for i in range(1100)], images)
    assert store._tail == (-1, 4, 3)  # the trick is in place
    worker = pickle.loads(pickle.dumps(store))  # (a DataLoader worker's copy maps once, and keeps it)
    assert_same_samples([worker[i] for i in range(1100)], images) and worker._tail == (-1, 4, 3)
    other = [np.arange(30, dtype=np.int16).reshape(2, 5, 3), np.arange(2, dtype=np.int16)]
    store.extend(other)  # (onto the last page, checked again after the remap)
    assert_same_samples([store[i] for i in range(1102)], images + other)
    assert store._tail is None and store[-2].shape == (2, 5, 3) and store[-1].shape == (2,)
    # a fresh object whose first page has one tail and whose second has another
    mixed = images[:512] + [np.zeros((1, 6, 3), np.int16)] + images[512:600]
    fresh = RaggedMmap.from_lists(tmp_path / "m", mixed)
    assert fresh[7].shape == images[7].shape and fresh._tail == (-1, 4, 3)
    assert fresh[512].shape == (1, 6, 3) and fresh._tail is None
    assert_same_samples([fresh[i] for i in range(len(mixed))], mixed)
    # an axis of length 0 beside the -1 cannot be inferred: no common tail
    empty = [np.zeros((h, 0, 3), np.int8) for h in (1, 2, 3)]
    zero = RaggedMmap.from_lists(tmp_path / "z", empty)
    assert [zero[i].shape for i in range(3)] == [(1, 0, 3), (2, 0, 3), (3, 0, 3)] and zero._tail is None


@pytest.mark.parametrize("cold", [False, True])
def test_a_read_that_another_thread_remaps_midway_gets_its_sample(cold, tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(6).reshape(2, 3), np.arange(4).reshape(2, 2)])
    store.cold = cold
    assert store[1].shape == (2, 2)  # (mapped)
    store._source = _RemappedMidRead(store._source, lambda: store._release(keep_writer=True))
    assert store[1].tolist() == [[0, 1], [2, 3]]  # (the nested shape was dropped midway: read again)
    closed = mmap.mmap(-1, mmap.PAGESIZE)  # a cold read's advice on a map closed meanwhile
    closed.close()
    mmap_ninja._willneed(closed, 0, mmap.PAGESIZE)
    store.close()
    with pytest.raises(ValueError, match=f"{tmp_path / 'r'}: the store is closed"):
        store[1]


@pytest.mark.parametrize("kind", ["strings", "nested"])
def test_a_cold_read_that_a_remap_overtakes_gets_a_sample_of_one_store(kind, monkeypatch, tmp_path):
    # A cold read asks for its sample's pages first, which lets other threads run; here another
    # thread's append moves the object to a store that another process re-created. The read
    # had its offsets from the old maps: it must not slice them out of the new data.
    d = tmp_path / "s"
    if kind == "strings":
        old, new = ["old %d" % k + "o" * k for k in range(20)], ["N%d" % k for k in range(20)]
        create, added = (lambda samples: StringsMmap.from_strings(d, samples)), "x"
    else:
        old = [np.full((k % 3 + 1, 2), k, np.int16) for k in range(20)]
        new = [np.full((1, k % 4 + 2), 100 + k, np.int16) for k in range(20)]
        create, added = (lambda samples: RaggedMmap.from_lists(d, samples)), np.zeros((1, 1), np.int16)
    def check(got, want):
        if kind == "strings":
            return got == want
        return got.dtype == want.dtype and got.shape == want.shape and (got == want).all()
    store = create(old)
    store.cold = True
    assert check(store[3], old[3]) and check(store[9], old[9])
    create(new)  # (another process)
    real, calls = mmap_ninja._willneed, []

    def overtaken(mm, start, stop, chunk=mmap_ninja._CHUNK):
        if not calls:
            calls.append(1)
            store.append(added)  # (another thread, which then reads: it maps the new store)
            assert check(store[0], new[0])
        real(mm, start, stop, chunk)
    monkeypatch.setattr(mmap_ninja, "_willneed", overtaken)
    store._io.count = 0  # (so that this read asks, not probes)
    got = store[9]
    assert calls and (check(got, new[9]) or check(got, old[9])), got  # (either store's; never a mix)
    assert len(store) == 21 and store._source is store._io.slices is not None


@pytest.mark.parametrize("attribute", ["starts", "ends", "flattened_shapes", "shapes", "memmap", "shape_of",
                                       "dtype", "shapes_are_flat"])
def test_the_drop_in_attributes_wait_for_another_threads_remap(attribute, tmp_path):
    # (read lock-free, they met the placeholder maps of an append's remap: shape_of raised
    # TypeError, starts came back empty and stayed cached, ends - starts did not broadcast)
    samples = [np.arange(k % 5 + 1) for k in range(20)]
    store = RaggedMmap.from_lists(tmp_path / "r", samples)
    read = (lambda: store.shape_of(3)) if attribute == "shape_of" else (lambda: getattr(store, attribute))
    expected = read()
    got = []
    with store._lock():  # (another thread's append, about to remap)
        thread = threading.Thread(target=lambda: got.append(read()))
        thread.start()
        thread.join(0.2)
        assert not got
    thread.join(5)
    assert len(got) == 1 and type(got[0]) is type(expected)
    if isinstance(expected, np.ndarray):
        assert got[0].dtype == expected.dtype and got[0].tolist() == expected.tolist()
    else:
        assert got[0] == expected
    assert store.flattened_shapes.tolist() == [k % 5 + 1 for k in range(20)]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="fork, /proc")
def test_a_forked_child_does_not_keep_its_parents_store_lock(tmp_path):
    # (it kept the descriptor its parent's flock is on: a parent killed while appending left the
    # store locked for as long as the child lived, a DataLoader worker say)
    d = tmp_path / "r"
    store = RaggedMmap.from_lists(d, [np.arange(3)])
    with store._writing(create=False):  # (the parent appending, in another thread)
        def target(fd):
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # (listdir's own)
                return None
        held = [fd for fd in os.listdir("/proc/self/fd") if target(fd) == str(d)]
        assert len(held) == 1
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = 2 if os.path.exists(f"/proc/self/fd/{held[0]}") else 0
                if status == 0:
                    store.append(np.arange(2))  # (its own lock, once the parent's is let go)
            finally:
                os._exit(status)
        time.sleep(0.2)
    assert os.waitpid(pid, 0)[1] == 0
    assert [x.tolist() for x in RaggedMmap(d)] == [[0, 1, 2], [0, 1]]


@pytest.mark.skipif(mmap_ninja.fcntl is None, reason="flock")
def test_an_open_waits_out_a_writer_whose_store_is_in_flux(tmp_path):
    # (a reader opening while another process converted the store's shapes to nested ones, or
    # swapped a new store in entry by entry, was told the store is damaged)
    d = tmp_path / "r"
    RaggedMmap.from_lists(d, [np.arange(3), np.arange(2)])
    in_flux, locked = threading.Event(), threading.Event()

    def converting():  # (another process's writer: its lock, and shapes/ moved aside meanwhile)
        with mmap_ninja._Lock(str(d)):
            os.rename(d / "shapes", d / "shapes.old")
            locked.set()
            in_flux.wait(5)
            time.sleep(0.2)
            os.rename(d / "shapes.old", d / "shapes")
    writer = threading.Thread(target=converting)
    writer.start()
    locked.wait(5)
    in_flux.set()
    try:
        assert [x.tolist() for x in RaggedMmap(d)] == [[0, 1, 2], [0, 1]]
    finally:
        writer.join(5)
    # damage that no writer is at work on is refused at once, as before
    os.rename(d / "shapes", d / "shapes.old")
    started = time.monotonic()
    with pytest.raises((OSError, ValueError), match=str(d)):
        RaggedMmap(d)[0]
    assert time.monotonic() - started < 2


def test_a_cold_read_never_waits_for_a_writer_to_set_its_verdict(tmp_path, monkeypatch):
    # (seen() set a new verdict under the mutex, which an append holds while it waits for
    # another process's lock: a read then took seconds)
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(3)] * 4)
    assert store[0].tolist() == [0, 1, 2]
    monkeypatch.setattr(store._io, "resident", lambda offset: False)  # (a probe finds it cold)
    busy, done = threading.Event(), threading.Event()

    def writer():
        with store._lock():
            busy.set()
            done.wait(5)
    thread = threading.Thread(target=writer)
    thread.start()
    busy.wait(5)
    try:
        started = time.monotonic()
        assert store._io.seen(0) is False and not store._io.cold  # (set by a later probe)
        assert time.monotonic() - started < 1
    finally:
        done.set()
        thread.join(5)
    assert store._io.seen(0) is False and store._io.cold and store._source is store._io.slices


@pytest.mark.skipif(mmap_ninja.fcntl is None or not hasattr(os, "fork"), reason="flock, fork")
def test_a_forked_child_leaving_its_parents_lock_unlocks_nothing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        RaggedMmap.from_lists(d, [np.arange(2)])
    parents = mmap_ninja._Lock(str(a))
    with parents:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                own = mmap_ninja._Lock(str(b))
                with own:  # (may reuse the number of the parent's closed descriptor)
                    parents.__exit__()
                    parents.close()
                    probe = os.open(b, os.O_RDONLY)
                    try:
                        mmap_ninja.fcntl.flock(probe, mmap_ninja.fcntl.LOCK_EX | mmap_ninja.fcntl.LOCK_NB)
                        status = 2  # (own's lock was let go)
                    except BlockingIOError:
                        status = 0
            finally:
                os._exit(status)
        assert os.waitpid(pid, 0)[1] == 0


def test_open_existing_waits_out_a_swap_at_work(tmp_path):
    d = tmp_path / "s"
    RaggedMmap.from_lists(d, [np.arange(3)])
    aside = d / f".ninja-old-{os.getpid()}-abc"  # (a live process's swap: this one's)
    aside.mkdir()
    os.rename(d / "type.ninja", aside / "type.ninja")

    locked = threading.Event()

    def finish():  # (a swap holds the store's lock)
        with mmap_ninja._Lock(str(d)):
            locked.set()
            time.sleep(0.2)
            os.rename(aside / "type.ninja", d / "type.ninja")
            aside.rmdir()
    thread = threading.Thread(target=finish)
    thread.start()
    locked.wait(5)
    try:
        assert [x.tolist() for x in mmap_ninja.open_existing(d)] == [[0, 1, 2]]
    finally:
        thread.join(5)


def test_the_cold_verdict_is_set_under_the_store_mutex(tmp_path):
    # (set halfway through another thread's remap, it installed a map being dropped: every
    # read then recursed until the next remap)
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(3)])
    assert store[0].tolist() == [0, 1, 2]
    done = threading.Event()

    def setter():
        store.cold = True
        done.set()
    with store._lock():  # (a remap in another thread)
        thread = threading.Thread(target=setter)
        thread.start()
        assert not done.wait(0.2)
    thread.join(5)
    assert done.is_set() and store._source is store._io.slices is not None
    assert store[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("kind", ["ragged", "strings"])
def test_closing_a_cold_store_while_iterating_it_says_it_is_closed(kind, tmp_path):
    d = tmp_path / "s"
    store = RaggedMmap.from_lists(d, [np.arange(k % 7) for k in range(600)]) if kind == "ragged" else \
        StringsMmap.from_strings(d, ["s%d" % k for k in range(600)])  # (iteration reads 256 at a time)
    store.cold = True
    with pytest.raises(ValueError, match=f"{d}: the store is closed"):
        for _ in store:
            store.close()


@needs_zstd
def test_a_zstd_string_read_during_another_threads_remap_decodes(tmp_path):
    store = StringsMmap.from_strings(tmp_path / "z", ["zstd ü %d" % k for k in range(8)], zstd_level=3)
    assert store[3] == "zstd ü 3"

    def remap_under_way():  # another thread's remap, caught between its first and last steps
        def paused(snapshot):
            raise InterruptedError
        real, store._map_offsets = store._map_offsets, paused
        with pytest.raises(InterruptedError):
            store._load(None)
        store._map_offsets = real
    store._source = _RemappedMidRead(store._source, remap_under_way)
    assert store[5] == "zstd ü 5"


@pytest.mark.parametrize("kind", ["ragged", "strings"])
def test_an_object_that_outlives_a_recreation_writes_to_the_new_store(kind, tmp_path):
    d = tmp_path / "s"
    old = make_store(kind, d)
    old.append(np.array([1]) if kind == "ragged" else "warm")  # its writer is open and cached
    if kind == "ragged":
        RaggedMmap.from_lists(d, [np.array([5, 6, 7])])
        old.append(np.array([8, 9]))
        assert_same_samples(RaggedMmap(d), [np.array([5, 6, 7]), np.array([8, 9])])
    else:
        StringsMmap.from_strings(d, ["new"])
        old.append("later")
        assert list(StringsMmap(d)) == ["new", "later"]
    assert len(old) == 2 and mmap_ninja._verify(str(d)) == []


def test_appends_refuse_a_store_that_lost_data(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(4), np.arange(3)])
    store.append(np.arange(2))  # cached writer
    with open(tmp_path / "r" / "data.ninja", "r+b") as f:
        f.truncate(40)
    before = snapshot(tmp_path / "r")
    with pytest.raises(ValueError, match="data.ninja holds 40 bytes but the store's metadata commits 72.*appends are refused"):
        store.append(np.arange(2))
    assert snapshot(tmp_path / "r") == before and mmap_ninja._verify(str(tmp_path / "r")) != []
    np_ninja.from_ndarray(tmp_path / "n", np.arange(6).reshape(3, 2))
    with open(tmp_path / "n" / "shape.ninja", "r+b") as f:  # one flipped bit in the row count
        f.write(np.array([3 | 1 << 32], "<u8").tobytes()[:8])
    before = snapshot(tmp_path / "n")
    with pytest.raises(ValueError, match="appends are refused"):
        np_ninja.extend_dir(tmp_path / "n", np.zeros((1, 2), np.int64))
    assert snapshot(tmp_path / "n") == before and os.path.getsize(tmp_path / "n" / "data.ninja") == 48


def test_a_count_file_too_short_for_a_cached_writer(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(3)])
    store.append(np.arange(2))
    (tmp_path / "r" / "starts" / "shape.ninja").write_bytes(b"\x02\x00\x00")
    with pytest.raises(ValueError, match=r"starts/shape.ninja is 3 bytes, too short to hold the sample count"):
        store.append(np.arange(2))


def test_cached_writer_drops_what_a_dead_writer_left(tmp_path):
    d = tmp_path / "r"
    store = RaggedMmap.from_lists(d, [np.arange(3)])
    store.append(np.arange(2))  # this object's writer now caches its descriptors and positions
    # another writer dies mid-batch: sample bytes and an ends entry written, nothing committed
    with open(d / "data.ninja", "ab") as f:
        f.write(np.full(5, 99, np.int64).tobytes())
    with open(d / "ends" / "data.ninja", "ab") as f:
        f.write(np.array([10], "<i8").tobytes())
    store.append(np.array([7]))
    assert_same_samples(RaggedMmap(d), [np.arange(3), np.arange(2), np.array([7])])
    assert os.path.getsize(d / "data.ninja") == 6 * 8  # no torn bytes left for old writers
    assert os.path.getsize(d / "ends" / "data.ninja") == 3 * 8


def test_two_writers_are_serialized(tmp_path):
    d = str(tmp_path / "r")
    RaggedMmap.from_lists(d, [np.zeros(1, np.int64)])
    code = f"""
        import numpy as np, mmap_ninja as mn, sys
        tag = int(sys.argv[1])
        s = mn.RaggedMmap({d!r})
        for i in range(300):
            s.append(np.full(3 if tag else 2, tag * 1000 + i, np.int64))
        """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(tag)],
                              env=dict(os.environ, PYTHONPATH=str(HERE))) for tag in (0, 1)]
    assert [p.wait() for p in procs] == [0, 0]
    store = RaggedMmap(d)
    assert len(store) == 601
    seen = sorted(int(s[0]) for s in store[1:])
    assert seen == list(range(300)) + list(range(1000, 1300))
    assert all(len(s) == (3 if s[0] >= 1000 else 2) and (s == s[0]).all() for s in store[1:])


def test_readers_see_consistent_snapshots_while_writing(tmp_path):
    d = str(tmp_path / "s")
    StringsMmap.from_strings(d, [])
    code = f"""
        import mmap_ninja as mn
        s = mn.StringsMmap({d!r})
        for k in range(3000):
            s.append(str(k) * (k % 5))
        """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=dict(os.environ, PYTHONPATH=str(HERE)))
    while proc.poll() is None:
        verify_all("strings", d)
    assert proc.returncode == 0 and verify_all("strings", d) == 3000


WRITER = """
import sys, numpy as np, mmap_ninja as mn
kind, d = sys.argv[1], sys.argv[2]
def ragged_sample(k):
    return np.full((2, k % 4 + 1), k, np.int64) if k % 3 == 0 else np.full(k % 5, k, np.int64)
if kind == 'ragged':
    s = mn.RaggedMmap(d)
    while True:
        k = len(s)
        s.extend([ragged_sample(k), ragged_sample(k + 1)]) if k % 2 else s.append(ragged_sample(k))
elif kind == 'strings':
    s = mn.StringsMmap(d)
    while True:
        k = len(s)
        s.append(str(k) * (k % 5))
else:
    while True:
        k = len(mn.np_open_existing(d))
        mn.np_extend_dir(d, np.arange(k, k + 3).reshape(1, 3) if k % 2 else np.array([np.arange(k, k + 3), np.arange(k + 1, k + 4)]))
"""


@pytest.mark.parametrize("kind", ["ragged", "strings", "numpy"])
def test_sigkill_during_appends_loses_nothing(kind, tmp_path):
    d = str(tmp_path / kind)
    if kind == "numpy":
        np_ninja.from_ndarray(d, np.zeros((0, 3), np.int64))
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=str(HERE))
    counts = []
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, str(script), kind, d], env=env, stderr=subprocess.PIPE)
        time.sleep(0.35 + rng.random() * 0.4)  # python + numpy start-up, then appends
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()
        n = verify_all(kind, d)
        counts.append(n)
        # the store accepts further appends, which overwrite whatever the killed writer left
        if kind == "ragged":
            RaggedMmap(d).append(expected_sample(kind, n))
        elif kind == "strings":
            StringsMmap(d).append(expected_sample(kind, n))
        else:
            np_ninja.extend_dir(d, expected_sample(kind, n)[None])
        assert verify_all(kind, d) == n + 1
        assert mmap_ninja._verify(d) == []
    assert counts == sorted(counts) and counts[-1] > 50  # the writer really wrote


GEN_WRITER = """
import sys, numpy as np, mmap_ninja as mn
def gen():
    k = 0
    while True:
        yield np.full((2, k % 4 + 1), k, np.int64) if k % 3 == 0 else np.full(k % 5, k, np.int64)
        k += 1
mn.RaggedMmap.from_generator(sys.argv[1], gen(), batch_size=7)
"""


def test_sigkill_during_from_generator(tmp_path):
    d = str(tmp_path / "g")
    RaggedMmap.from_lists(d, [expected_sample("ragged", k) for k in range(5)])
    script = tmp_path / "gen_writer.py"
    script.write_text(GEN_WRITER)
    rng = random.Random(99)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, str(script), d], env=dict(os.environ, PYTHONPATH=str(HERE)))
        time.sleep(0.3 + rng.random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert verify_all("ragged", d) == 5 and mmap_ninja._verify(d) == []  # the old store, intact
        assert len(hidden_leftovers(d)) == 1  # the killed build, until the next one clears it
    RaggedMmap.from_generator(d, (expected_sample("ragged", k) for k in range(30)), batch_size=7)
    assert verify_all("ragged", d) == 30 and hidden_leftovers(d) == []


KILLED_CREATION = """
import os, pathlib, shutil, signal, sys, numpy as np, mmap_ninja as mn
how, root = sys.argv[1], pathlib.Path(sys.argv[2])

def snapshot(path):
    return {str(p): p.read_bytes() for p in sorted(pathlib.Path(path).rglob("*")) if p.is_file()}

def old(d):  # the store a creation replaces (none for a first append)
    if how == "ragged":
        mn.RaggedMmap.from_lists(d, [np.arange(3), np.arange(2), np.array(7)])
    elif how == "strings":
        mn.StringsMmap.from_strings(d, ["a", "bé", "", "cd"])
    elif how == "numpy":
        mn.np_from_ndarray(d, np.arange(4))

def create(d):
    if how == "append":  # the first append creates the store in place
        mn.RaggedMmap(d).extend([np.arange(3), np.arange(4).reshape(2, 2)])
    elif how == "ragged":
        mn.RaggedMmap.from_lists(d, [np.arange(3), np.arange(4).reshape(2, 2)])
    elif how == "strings":
        mn.StringsMmap.from_strings(d, ["a", "bc"])
    else:
        mn.np_from_ndarray(d, np.arange(6).reshape(3, 2))

def kill_at(step):  # SIGKILL this process at its step-th file operation
    calls = [0]
    def counted(real):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call
    for name in ("open", "rename", "replace", "mkdir", "write", "writev", "pwrite", "ftruncate", "unlink", "rmdir"):
        setattr(os, name, counted(getattr(os, name)))

for step in range(1, 1000):
    d = root / f"s{step}"
    old(d)
    before = snapshot(d) if d.exists() else None
    pid = os.fork()
    if pid == 0:
        kill_at(step)
        create(d)
        os._exit(0)
    status = os.waitpid(pid, 0)[1]
    if status == 0:  # no step-th operation: the creation completed
        break
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    # what the kill left: the old store intact, or the new one complete; never damage
    n = len(mn.open_existing(d)) if (d / "type.ninja").exists() else len(mn.RaggedMmap(d))
    new = {"append": 2, "ragged": 2, "strings": 2, "numpy": 3}[how]
    unchanged = (snapshot(d) if d.exists() else None) == before or how == "append" and n == 0
    assert unchanged or (mn._verify(str(d)) == [] and n == new), (step, n)
    create(d)  # and creating again succeeds, leaving nothing behind
    assert mn._verify(str(d)) == [] and len(mn.open_existing(d)) == new, step
    assert not [p for p in [*root.iterdir(), *d.iterdir()] if ".ninja-new-" in p.name], step
    shutil.rmtree(d)
print("ok", step)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
@pytest.mark.parametrize("how", ["append", "ragged", "strings", "numpy"])
def test_a_creation_killed_at_each_step_recovers(how, tmp_path):
    """Kill the creating process at its k-th file operation, for every k until it completes:
    the directory then holds the old store or the new one, whole (or, for a first append, no
    store yet), and creating again succeeds."""
    script = tmp_path / "create.py"
    script.write_text(KILLED_CREATION)
    (tmp_path / "stores").mkdir()
    result = subprocess.run([sys.executable, str(script), how, str(tmp_path / "stores")], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(HERE)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    word, steps = result.stdout.split()
    assert word == "ok" and int(steps) > 10  # it really was killed at many steps


def test_crash_while_converting_shapes_to_nested(tmp_path, monkeypatch):
    d = tmp_path / "r"
    store = RaggedMmap.from_lists(d, [np.arange(3), np.array(5)])
    real_rename, renames = os.rename, []

    def dies_at_second_rename(src, dst):
        renames.append(src)
        if len(renames) == 2:  # shapes/ is already set aside, shapes.new not yet in place
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", dies_at_second_rename)
    with pytest.raises(KeyboardInterrupt):
        store.append(np.ones((2, 2), np.int64))
    monkeypatch.undo()
    assert not (d / "shapes").exists() and (d / "shapes.new" / "starts").is_dir()
    assert_same_samples(RaggedMmap(d), [np.arange(3), np.array(5)])  # readers use shapes.new
    RaggedMmap(d).append(np.ones((2, 2), np.int64))  # the next writer finishes the conversion
    assert_same_samples(RaggedMmap(d), [np.arange(3), np.array(5), np.ones((2, 2), np.int64)])
    assert not (d / "shapes.new").exists() and not (d / "shapes.old").exists()
    assert mmap_ninja._verify(str(d)) == []


def test_durable_appends_fsync_before_and_after_commit(tmp_path, monkeypatch):
    synced = []  # the descriptors fsynced, in order
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(fd)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store = RaggedMmap(tmp_path / "r", durable=True)
    store.append(np.arange(3))
    assert len(synced) >= 10  # every data and shape file of the five columns
    synced.clear()
    RaggedMmap(tmp_path / "r").append(np.arange(2))  # default: no fsync
    assert synced == []
    np_ninja.from_ndarray(tmp_path / "n", np.arange(3))
    np_ninja.extend_dir(tmp_path / "n", np.arange(2), durable=True)
    assert len(synced) == 2
    synced.clear()
    StringsMmap.from_strings(tmp_path / "s", ["a"]).flush()
    assert len(synced) == sum(len(fs) + 1 for _, _, fs in os.walk(tmp_path / "s"))  # files and dirs


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_flush_skips_what_is_not_a_file_or_directory(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(3)])
    os.symlink(tmp_path / "nowhere", tmp_path / "r" / "dangling")  # (a user's, in the store directory)
    os.mkfifo(tmp_path / "r" / "fifo")
    outcome = []
    flusher = threading.Thread(target=lambda: outcome.append(store.flush() or "done"), daemon=True)
    flusher.start()
    flusher.join(10)  # (opening a FIFO to fsync it waited for a writer forever)
    assert outcome == ["done"] and store[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("kind", ["ragged", "numpy", "strings"])
def test_durable_shards_and_numpy_stores_are_fsynced_before_they_appear(kind, tmp_path, monkeypatch):
    synced, real = [], mmap_ninja._fsync_tree  # the trees fsync-ed: (path, recurse)

    def recording(root, recurse=True):
        synced.append((os.path.basename(root), recurse))
        return real(root, recurse)
    monkeypatch.setattr(mmap_ninja, "_fsync_tree", recording)
    source = {"ragged": [np.arange(k) for k in range(5)], "strings": ["a", "bc", "d", "ef", "g"],
              "numpy": np.arange(10).reshape(5, 2)}[kind]
    with ThreadPoolExecutor(2) as pool:  # (in this process, where the spy is)
        ShardedMmap.from_indexable(tmp_path / "plain", source, 6, executor=pool, kind=kind)
        assert synced == []  # by default nothing is fsync-ed
        shards = ShardedMmap.from_indexable(tmp_path / "out", source, 6, executor=pool, kind=kind, durable=True)
    # each of the 6 shards (one empty) is fsync-ed whole while hidden, then its directory
    # entry; and at the end the whole conversion (shards of an earlier run too) and its entry
    assert synced[-2:] == [("out", True), (tmp_path.name, False)]
    built = sorted(name for name, recurse in synced[:-2] if recurse)
    assert len(built) == 6 and all(name.startswith(".shard-") and ".ninja-new-" in name for name in built)
    assert sorted(set(name for name, _ in synced[:-2]) - set(built)) == ["out"] and len(synced) == 14
    if kind == "strings":
        assert shards[:] == source
    else:
        assert_same_samples(shards[:], list(source))
    synced.clear()
    np_ninja.from_ndarray(tmp_path / "n", np.arange(3), durable=True)
    np_ninja.from_generator(tmp_path / "g", iter([np.arange(2)]), 1, durable=True)
    np_ninja.empty(tmp_path / "e", np.int8, (2,), durable=True)
    assert [recurse for _, recurse in synced] == [True, False] * 3


@pytest.mark.parametrize("kind", ["ragged", "numpy", "strings", "indexable"])
def test_conversion_memory_is_bounded(kind, tmp_path):
    import tracemalloc
    sample_bytes, batch = 1 << 18, 8

    def gen():
        for i in range(48):
            yield ("x" * sample_bytes) if kind == "strings" else np.full(sample_bytes, i % 250, np.uint8)
    tracemalloc.start()
    try:
        if kind == "ragged":
            RaggedMmap.from_generator(tmp_path / "r", gen(), batch)
        elif kind == "numpy":
            np_ninja.from_generator(tmp_path / "n", gen(), batch)
        elif kind == "strings":
            StringsMmap.from_generator(tmp_path / "s", gen(), batch)
        else:
            RaggedMmap.from_indexable(tmp_path / "i", lambda i: next(iter([np.full(sample_bytes, i, np.uint8)]))
                                      if i < 48 else [][0], batch, n_jobs=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    limit = {"strings": 3.5}.get(kind, 2.5)  # strings: the str, its UTF-8 bytes and the joined batch
    assert peak < limit * batch * sample_bytes, peak / (batch * sample_bytes)


def test_a_failed_swap_keeps_the_users_files(tmp_path, monkeypatch):
    """The user's files move into the new store just before the swap; when one cannot move (an
    immutable file, a mount point, an interrupt), those that did go back, nothing is deleted,
    and the error names the store, not the hidden build."""
    d = tmp_path / "store"
    RaggedMmap.from_lists(d, [np.arange(3)])
    for k in range(10):
        (d / f"notes-{k}.txt").write_text(str(k))
    before = snapshot(d)
    real_rename = os.rename

    def rename_refusing_notes_7(src, dst, *args, **kwargs):
        if os.path.basename(src) == "notes-7.txt":
            raise PermissionError(errno.EPERM, "Operation not permitted", src)
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename_refusing_notes_7)
    with pytest.raises(PermissionError, match="cannot move 'notes-7.txt'.*every file are kept") as e:
        RaggedMmap.from_lists(d, [np.arange(5)])
    assert ".ninja-new-" not in str(e.value)
    monkeypatch.undo()
    assert snapshot(d) == before and hidden_leftovers(d) == []
    assert_same_samples(RaggedMmap(d)[:], [np.arange(3)])


def test_creating_the_working_directory_follows_it(tmp_path):
    """from_*(".") replaces the working directory with a new one: the process follows it, so
    the object returned and later appends see the new store (before, they saw a deleted
    directory: 0 samples, and appends spun forever)."""
    d = tmp_path / "here"
    RaggedMmap.from_lists(d, [np.arange(9)])
    result = run_python("""
        import os, numpy as np, mmap_ninja as mn
        r = mn.RaggedMmap.from_lists(".", [np.arange(2), np.arange(3)])
        r.append(np.arange(4))
        s = mn.RaggedMmap(".")
        print(len(r), len(s), os.getcwd() == os.path.realpath(r.out_dir))
        """, cwd=d, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "3", "True"]
    assert [len(x) for x in RaggedMmap(d)] == [2, 3, 4]


def test_objects_keep_their_store_when_the_working_directory_changes(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    store = RaggedMmap.from_lists("r", [np.arange(3)])
    assert store.out_dir == str(tmp_path / "a" / "r")
    monkeypatch.chdir(tmp_path)
    store.append(np.arange(2))
    assert [len(x) for x in RaggedMmap(tmp_path / "a" / "r")] == [3, 2] and not (tmp_path / "r").exists()


READERS_AND_RECREATIONS = """
import sys, numpy as np, mmap_ninja as mn
d, kind = sys.argv[1], sys.argv[2]
for k in range(400):
    dtype = np.int32 if k % 2 else np.int16
    if kind == "numpy":
        mn.np_from_ndarray(d, np.full((500, 4), 1000 + k % 2, dtype))
    else:
        mn.RaggedMmap.from_lists(d, [np.full(4, 1000 + k % 2, dtype)] * 500)
"""


@pytest.mark.parametrize("kind", ["ragged", "numpy"])
def test_readers_never_mix_two_stores_while_one_is_recreated(kind, tmp_path):
    """Re-creations alternate int16 and int32 stores of the same shape; a reader opening the
    store meanwhile must get one of them whole: never one's dtype over the other's bytes
    (which reads [1000, 0, 1000, 0]), never a false 'damaged'."""
    d = str(tmp_path / "s")
    subprocess.run([sys.executable, "-c", READERS_AND_RECREATIONS.replace("range(400)", "range(1)"), d, kind],
                   env=dict(os.environ, PYTHONPATH=str(HERE)), check=True)
    writer = subprocess.Popen([sys.executable, "-c", READERS_AND_RECREATIONS, d, kind],
                              env=dict(os.environ, PYTHONPATH=str(HERE)))
    opened = 0
    try:
        while writer.poll() is None:
            store = np_ninja.open_existing(d) if kind == "numpy" else RaggedMmap(d)
            first, last = store[0], store[len(store) - 1]
            assert first.tolist() in ([1000] * 4, [1001] * 4) and last.tolist() == first.tolist()
            opened += 1
    finally:
        writer.wait()
    assert writer.returncode == 0 and opened > 50


# ---------------------------------------------------------------------------------------------
# Progress: tqdm when installed, otherwise a small text bar on stderr
# ---------------------------------------------------------------------------------------------

def test_text_progress_bar_when_tqdm_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import tqdm.auto now fails
    monkeypatch.setitem(sys.modules, "tqdm", None)
    RaggedMmap.from_indexable(tmp_path / "r", [np.arange(3)] * 50, batch_size=7, verbose=True)
    err = capsys.readouterr().err
    assert err.startswith("\rragged: ") and err.endswith("\n")
    assert "100% 50/50" in err and "it/s" in err and err.isascii()
    StringsMmap.from_generator(tmp_path / "s", (str(i) for i in range(5)), 2, verbose=True)
    err = capsys.readouterr().err
    assert "strings: 5 [" in err and err.endswith("\n")
    RaggedMmap.from_lists(tmp_path / "q", [np.arange(2)])
    assert capsys.readouterr().err == ""  # verbose off: nothing


def test_text_bar_survives_broken_stream():
    class Broken:
        def write(self, text):
            raise OSError("pipe closed")

        def flush(self):
            pass
    assert list(mmap_ninja._TextBar(range(3), 3, "x", stream=Broken())) == [0, 1, 2]


def test_tqdm_is_used_when_installed(tmp_path, monkeypatch):
    import types
    calls = []

    class FakeTqdm:
        def __init__(self, iterable, total=None, desc=""):
            calls.append((total, desc))
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)
    fake = types.ModuleType("tqdm.auto")
    fake.tqdm = FakeTqdm
    monkeypatch.setitem(sys.modules, "tqdm.auto", fake)
    np_ninja.from_generator(tmp_path / "n", iter([np.zeros(2)] * 4), 2, verbose=True)
    RaggedMmap.from_indexable(tmp_path / "r", [np.arange(2)] * 3, 2, verbose=True)
    assert calls == [(None, "numpy"), (3, "ragged")]


# ---------------------------------------------------------------------------------------------
# Cold reads: data that is not in the page cache
# ---------------------------------------------------------------------------------------------

def cold_stores(tmp_path):
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 255, (int(rng.integers(2, 9)), 4, 3), dtype=np.uint8) for _ in range(700)]
    tokens = [np.arange(int(rng.integers(0, 40)), dtype=np.int32) + k for k in range(1500)] + [np.array(7, np.int32)]
    texts = [f"text {k} " + "ü" * (k % 13) for k in range(1200)]
    RaggedMmap.from_lists(tmp_path / "images", images)
    RaggedMmap.from_lists(tmp_path / "tokens", tokens)
    StringsMmap.from_strings(tmp_path / "texts", texts)
    RaggedMmap.from_lists(tmp_path / "parts" / "a", images[:300])
    RaggedMmap.from_lists(tmp_path / "parts" / "b", images[300:])
    return {"images": images, "tokens": tokens, "texts": texts}


def read_everything(store, rng):
    """Every way of reading a store, in a fixed order: single gets, batches, get_padded, iteration."""
    n = len(store)
    idx = rng.permutation(n)
    out = [store[int(i)] for i in idx[:200]] + [store[-1], store[-n]]
    out += [store[list(map(int, idx[200:300]))], store[idx[300:556]], store[5:9], list(store)]
    if isinstance(store, RaggedMmap) and store.shape_of(0) != ():
        out.append(store.get_padded(idx[idx < n - 1][:64]))  # (the last sample is a scalar)
    return out


def same_reads(a, b):
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_reads(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and (a == b).all()
    return type(a) is type(b) and a == b


def record_willneed(monkeypatch):
    """Spy on the MADV_WILLNEED calls: returns the list of (start, stop) byte ranges asked for."""
    asked = []
    real = mmap_ninja._willneed

    def recording_willneed(mm, start, stop, *chunk):
        asked.append((start, stop))
        return real(mm, start, stop, *chunk)

    monkeypatch.setattr(mmap_ninja, "_willneed", recording_willneed)
    return asked


@pytest.mark.parametrize("name", ["images", "tokens", "texts", "parts"])
def test_cold_reads_and_prefetch_never_change_what_is_read(name, tmp_path, monkeypatch):
    cold_stores(tmp_path)

    def open_store():
        return ShardedMmap(tmp_path / "parts") if name == "parts" else open_existing(tmp_path / name)
    plain = read_everything(open_store(), np.random.default_rng(1))
    real_willneed = mmap_ninja._willneed
    asked = record_willneed(monkeypatch)
    store = open_store()
    for shard in getattr(store, "shards", [store]):
        shard.cold = True  # every read asks for its pages first
    store.prefetch(np.arange(0, len(store), 7))
    store.prefetch(3)
    assert same_reads(read_everything(store, np.random.default_rng(1)), plain)
    assert len(asked) > 100 and all(0 <= a < b for a, b in asked)
    for shard in getattr(store, "shards", [store]):
        shard.cold = False
    asked.clear()
    assert same_reads(read_everything(store, np.random.default_rng(1)), plain) and asked == []
    monkeypatch.setattr(mmap_ninja, "_ADVISE", False)  # a platform without madvise (or the probe,
    monkeypatch.setattr(mmap_ninja, "_PROBE", False)  # or posix_fadvise: Windows)
    monkeypatch.delattr(os, "posix_fadvise", raising=False)

    class NoAdvice:
        def __len__(self):
            return 1 << 20

        def madvise(self, *args):
            raise AssertionError("madvise called where the platform has none")
    real_willneed(NoAdvice(), 0, 1 << 19)
    store = open_store()
    for shard in getattr(store, "shards", [store]):
        shard.cold = True
        assert shard._io.fd is None  # (no probing descriptor either)
    store.prefetch(np.arange(len(store)))
    assert same_reads(read_everything(store, np.random.default_rng(1)), plain)


def no_padded_spans(monkeypatch):
    """Make the gathers that read each sample's padded span fail if called."""
    def refuse(*args):
        raise AssertionError("a cold get_padded read padded spans")
    monkeypatch.setattr(mmap_ninja, "_pad_runs", refuse)
    monkeypatch.setattr(mmap_ninja, "_pad_blocks", refuse)


@pytest.mark.parametrize("trailing", [(), (7,), (5, 3)])
def test_cold_get_padded_reads_the_samples_own_bytes_only(trailing, tmp_path, monkeypatch):
    # hot, get_padded gathers each sample's padded span (whatever follows it, up to the longest
    # sample); cold, that would read up to the longest sample's size from disk for each
    lengths = [30000 * (k % 3 + 1) for k in range(12)]  # 240-720 KB each (int64): never joined
    samples = [np.full((n // int(np.prod(trailing)),) + trailing, k, np.int64) for k, n in enumerate(lengths)]
    if len(trailing) == 2:  # images: the second axis varies too
        samples = [x[:, :1 + k % 5] for k, x in enumerate(samples)]
    RaggedMmap.from_lists(tmp_path / "r", samples).close()
    monkeypatch.setattr(mmap_ninja, "_resident", lambda fd, offset: False)  # probes find nothing cached
    store = RaggedMmap(tmp_path / "r")
    if store._io.fd is None:
        pytest.skip("no RWF_NOWAIT probes here: batch reads cannot tell cached pages, and ask for none")
    assert store.cold
    asked = record_willneed(monkeypatch)
    no_padded_spans(monkeypatch)
    idx = [10, 0, 4, 2]
    batch, shapes = store.get_padded(idx)
    assert asked == [(int(store.starts[i]) * 8, int(store.ends[i]) * 8) for i in sorted(idx)]
    assert batch.shape == (4,) + tuple(np.max([samples[i].shape for i in idx], axis=0)) and batch.dtype == np.int64
    for row, i in zip(batch, idx):
        inside = tuple(slice(0, a) for a in samples[i].shape)
        assert (row[inside] == i).all() and row.sum() == i * samples[i].size
    assert shapes.tolist() == [list(samples[i].shape) for i in idx]


@pytest.mark.skipif(not (mmap_ninja._PROBE and hasattr(os, "major")), reason="sysfs and RWF_NOWAIT probes: Linux")
def test_willneed_calls_are_as_large_as_the_device_honours(tmp_path, monkeypatch):
    # the kernel cuts a WILLNEED call to max(read_ahead_kb, max_sectors_kb) of the device, so a
    # call asks for that much, up to 2 MB (fewer, larger reads), and 128 KB where sysfs is silent
    RaggedMmap.from_lists(tmp_path / "r", [np.full(1 << 17, k, np.int64) for k in range(6)]).close()  # 6 MB
    data = tmp_path / "r" / "data.ninja"
    dev = os.stat(data).st_dev
    sysfs, disk = tmp_path / "sys", tmp_path / "sys" / "devices" / "vdx"
    (disk / "queue").mkdir(parents=True)
    (disk / "vdx1").mkdir()
    (sysfs / "dev" / "block").mkdir(parents=True)
    link = sysfs / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}"
    monkeypatch.setattr(mmap_ninja, "_SYSFS", str(sysfs))
    fd = os.open(data, os.O_RDONLY)

    def honoured(read_ahead_kb, max_sectors_kb, target):
        (disk / "queue" / "read_ahead_kb").write_text(f"{read_ahead_kb}\n")
        (disk / "queue" / "max_sectors_kb").write_text(f"{max_sectors_kb}\n")
        if link.is_symlink():
            link.unlink()
        if target is not None:
            link.symlink_to(target)
        monkeypatch.setattr(mmap_ninja, "_HONOURED", {})
        return mmap_ninja._honoured(fd)
    try:
        assert honoured(8192, 4096, disk / "vdx1") == 2 << 20  # a partition: its disk's queue; at most 2 MB
        assert honoured(128, 1280, disk) == 1280 << 10  # a whole disk
        assert honoured(0, 512, disk) == 512 << 10  # (read-ahead off: the largest request still goes)
        assert honoured(0, 64, disk) == 64 << 10  # a small device: what it takes
        assert honoured(8192, 4096, None) == 128 << 10  # no block device (tmpfs, NFS, btrfs): 128 KB
        assert honoured("many", 4096, disk) == 128 << 10  # (anything odd: the same)
        page = mmap.PAGESIZE  # (each call starts on a page: a size of 1023 KB would stop at the first)
        assert honoured(128, 1023, disk) == (1023 << 10) // page * page and honoured(-8, -4, disk) == 128 << 10
        assert honoured(8192, 4096, disk) == 2 << 20
    finally:
        os.close(fd)
    monkeypatch.setattr(mmap_ninja, "_resident", lambda fd, offset: False)
    store = RaggedMmap(tmp_path / "r")
    assert store._io.fd is not None and store._io.chunk == 2 << 20
    asked, real = [], os.posix_fadvise

    def recording_fadvise(fd, offset, length, advice):
        asked.append((offset, length))
        return real(fd, offset, length, advice)
    monkeypatch.setattr(os, "posix_fadvise", recording_fadvise)
    store.prefetch(range(6))
    settle(store)
    assert asked == [(k << 21, 2 << 20) for k in range(3)]


def settle(store):
    """Wait until the store's prefetches are asked for."""
    thread = store._io.aside
    if thread is not None:
        thread.join()


def aside_threads():
    return [t for t in threading.enumerate() if getattr(t, "_target", None) is mmap_ninja._advise_aside]


@linux_only
@pytest.mark.skipif(not (mmap_ninja._PROBE and hasattr(os, "posix_fadvise")), reason="needs RWF_NOWAIT and fadvise")
def test_prefetches_use_one_thread_and_descriptor_per_store_and_drop_the_oldest(tmp_path, monkeypatch):
    # a loader announcing batches faster than the disk serves them: one thread and one
    # descriptor per store, at most PENDING prefetches waiting, asked for in order, newest kept
    RaggedMmap.from_lists(tmp_path / "r", [np.full(1024, k, np.int32) for k in range(400)])  # 4 KB each
    store = RaggedMmap(tmp_path / "r")
    monkeypatch.setattr(mmap_ninja, "_resident", lambda fd, offset: False)
    asked, real, gate, entered = [], os.posix_fadvise, threading.Event(), threading.Event()

    def slow_fadvise(fd, offset, length, advice):
        entered.set()
        gate.wait(10)
        asked.append(offset // 4096)
        return real(fd, offset, length, advice)
    monkeypatch.setattr(os, "posix_fadvise", slow_fadvise)
    fds, threads = len(os.listdir("/proc/self/fd")), len(aside_threads())
    for k in range(0, 400, 10):  # 40 prefetches, far apart (a range each)
        store.prefetch([k])
        assert k or entered.wait(10)  # (the first is being asked for: the rest wait)
        assert len(aside_threads()) <= threads + 1 and len(os.listdir("/proc/self/fd")) <= fds + 1
    assert len(store._io.pending) == store._io.PENDING
    gate.set()
    settle(store)
    assert asked[0] == 0 and asked[1:] == list(range(400 - 10 * store._io.PENDING, 400, 10))
    assert len(aside_threads()) == threads and len(os.listdir("/proc/self/fd")) == fds
    assert mmap_ninja._ASIDE_FDS == set()
    store.prefetch([5])  # and the next prefetch starts a thread again
    settle(store)
    assert asked[-1] == 5 and store[5][0] == 5
    # a forked child (a DataLoader worker, say) closes the descriptors of the parent's threads
    gate.clear()
    store.prefetch([7])
    held = set(mmap_ninja._ASIDE_FDS)
    assert len(held) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (fork with threads: ours are accounted for)
        pid = os.fork()
    if pid == 0:
        status = 1
        try:
            ok = not mmap_ninja._ASIDE_FDS and not any(os.path.exists(f"/proc/self/fd/{fd}") for fd in held)
            gate.set()
            store.prefetch([9])  # (its own thread)
            settle(store)
            status = 0 if ok and asked[-1] == 9 and store[9][0] == 9 else 2
        finally:
            os._exit(status)
    for _ in range(600):  # (a child that deadlocks fails the test rather than hang it)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    gate.set()
    settle(store)
    assert status == 0 and asked[-1] == 7
    # a store dropped with prefetches waiting is freed at once, maps and all; they are dropped
    gate.clear()
    entered.clear()
    for k in (100, 200, 300):
        store.prefetch([k])
        assert k > 100 or entered.wait(10)
    thread, io = store._io.aside, weakref.ref(store._io)
    del store
    gc.collect()
    assert io() is None and str(tmp_path / "r" / "data.ninja") not in pathlib.Path("/proc/self/maps").read_text()
    gate.set()
    thread.join()
    data = str(tmp_path / "r" / "data.ninja")
    open_files = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
    assert asked[-1] == 100 and len(aside_threads()) == threads and data not in open_files


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_a_prefetch_after_the_store_is_created_again_asks_for_the_new_file(tmp_path, monkeypatch):
    d = tmp_path / "r"
    RaggedMmap.from_lists(d, [np.full(1024, k, np.int32) for k in range(100)])
    monkeypatch.setattr(mmap_ninja, "_resident", lambda fd, offset: False)
    real, gate, entered, seen = os.posix_fadvise, threading.Event(), threading.Event(), []

    def slow_fadvise(fd, offset, length, advice):
        seen.append((os.fstat(fd).st_ino, offset))
        entered.set()
        gate.wait(10)
        return real(fd, offset, length, advice)
    monkeypatch.setattr(os, "posix_fadvise", slow_fadvise)
    store = RaggedMmap(d)
    store.prefetch([10])
    assert entered.wait(10)  # (its thread is busy with the old file)
    old, busy = os.stat(d / "data.ninja").st_ino, store._io.aside
    shutil.rmtree(d)
    RaggedMmap.from_lists(d, [np.full(1024, -k, np.int32) for k in range(300)])
    store.append(np.full(1024, 7, np.int32))  # (finds the new store, and maps it)
    new = os.stat(d / "data.ninja").st_ino
    store.prefetch([250])
    thread = store._io.aside
    gate.set()
    busy.join()
    thread.join()
    assert old != new and seen == [(old, 40960), (new, 1024000)] and store[250][0] == -250


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_prefetch_threads_start_and_stores_close_without_waiting_for_the_aside_lock(tmp_path, monkeypatch):
    # starting a thread runs code in it (a GC there may finalize another store, which closes it):
    # a prefetch that waited for that with the aside lock held deadlocked against the close
    RaggedMmap.from_lists(tmp_path / "r", [np.full(1024, k, np.int32) for k in range(100)])
    store = RaggedMmap(tmp_path / "r")
    monkeypatch.setattr(mmap_ninja, "_resident", lambda fd, offset: False)
    free, real_start = [], threading.Thread.start

    def start(self):  # another thread wants the lock while this one starts
        def want():
            got = mmap_ninja._ASIDE_LOCK.acquire(timeout=2)
            free.append(got)
            if got:
                mmap_ninja._ASIDE_LOCK.release()
        probe = threading.Thread(target=want)
        real_start(probe)
        probe.join()
        return real_start(self)
    monkeypatch.setattr(threading.Thread, "start", start)
    store.prefetch([1])
    settle(store)
    assert free == [True]
    monkeypatch.setattr(threading.Thread, "start", real_start)
    holding, release = threading.Event(), threading.Event()

    def hold():
        with mmap_ninja._ASIDE_LOCK:
            holding.set()
            release.wait(10)
    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(10)
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(5)
    closed = not closer.is_alive()
    release.set()
    holder.join()
    closer.join()
    assert closed and store._io.fd is None


@pytest.mark.skipif(not (mmap_ninja._ADVISE and hasattr(os, "posix_fadvise")), reason="needs madvise and fadvise")
def test_a_prefetch_no_thread_can_take_is_asked_for_at_once(tmp_path, monkeypatch):
    RaggedMmap.from_lists(tmp_path / "r", [np.full(1024, k, np.int32) for k in range(100)])
    store = RaggedMmap(tmp_path / "r")
    store.cold = True
    monkeypatch.setattr(mmap_ninja, "_resident", lambda fd, offset: False)
    asked = record_willneed(monkeypatch)

    def no_descriptors(fd):
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(os, "dup", no_descriptors)
    store.prefetch([10, 50])  # (advice: never an error)
    assert asked == [(40960, 45056), (204800, 208896)] and store._io.aside is None
    asked.clear()
    assert [int(x[0]) for x in store[[10, 50]]] == [10, 50] and asked == []  # (asked for already)


def test_sharded_cold_is_its_shards_cold(tmp_path):
    RaggedMmap.from_lists(tmp_path / "r", [np.arange(3)])
    StringsMmap.from_strings(tmp_path / "s", ["ab"])
    np_ninja.from_ndarray(tmp_path / "n", np.arange(4).reshape(2, 2))
    store = ShardedMmap([tmp_path / "r", tmp_path / "s", tmp_path / "n"])
    ragged, strings, _ = store.shards
    for value in (True, False, True):
        store.cold = value
        assert store.cold is value and ragged.cold is value and strings.cold is value
    ragged.cold = False
    assert store.cold and not ragged.cold and strings.cold  # (any shard cold)
    store.cold = None  # probes decide again
    assert ragged._io.forced is None and strings._io.forced is None
    assert store[0].tolist() == [0, 1, 2] and store[1] == "ab" and store[2].tolist() == [0, 1]


@pytest.mark.skipif(not (mmap_ninja._ADVISE and hasattr(os, "posix_fadvise")), reason="needs madvise and fadvise")
def test_prefetch_and_batch_reads_ask_where_the_cache_cannot_be_probed(tmp_path, monkeypatch):
    # NFS, CIFS, old FUSE: preadv(RWF_NOWAIT) fails with EOPNOTSUPP, so nothing tells cold from
    # hot; store.cold = True must still ask for what batch reads and prefetches need
    RaggedMmap.from_lists(tmp_path / "r", [np.full((3, 1024), k, np.int32) for k in range(64)])  # 12 KB each
    real_preadv = getattr(os, "preadv", None)

    def no_nowait(fd, buffers, offset, flags=0):
        if flags:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_preadv(fd, buffers, offset)
    if real_preadv is not None:
        monkeypatch.setattr(os, "preadv", no_nowait)
    fadvised, real_fadvise = [], os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: fadvised.append(
        (offset, offset + length)) or real_fadvise(fd, offset, length, advice))
    asked = record_willneed(monkeypatch)
    store = RaggedMmap(tmp_path / "r")
    assert not store.cold and not store._io.probing  # (the probe failed: it is not used again)
    store.prefetch([3, 40])  # (by its thread, as anywhere: nothing is skipped as cached)
    settle(store)
    assert fadvised == [(3 * 12288 // 4096 * 4096, 4 * 12288), (40 * 12288 // 4096 * 4096, 41 * 12288)]
    assert asked == []
    assert [int(x[0, 0]) for x in store[[10, 50]]] == [10, 50] and asked == []  # hot, as far as it knows
    store.cold = True
    assert [int(x[0, 0]) for x in store[[11, 51]]] == [11, 51]
    assert asked == [(11 * 12288, 12 * 12288), (51 * 12288, 52 * 12288)]
    asked.clear()
    padded, lengths = store.get_padded([20, 21])
    assert padded[:, 0, 0].tolist() == [20, 21] and asked == [(20 * 12288, 22 * 12288)]


def evict_store(path):
    """Drop a store's files from the page cache (no map of them may be open)."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)  # (dirty pages are not dropped)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


@pytest.mark.skipif(not (mmap_ninja._PROBE and mmap_ninja._ADVISE and hasattr(os, "posix_fadvise")),
                    reason="needs RWF_NOWAIT probes, madvise and posix_fadvise (Linux)")
def test_cold_data_is_found_by_probing_and_left_when_hot(tmp_path, monkeypatch):
    RaggedMmap.from_lists(tmp_path / "r", [np.full(2000, k, np.int32) for k in range(3000)])  # 24 MB
    evict_store(tmp_path / "r")
    store = RaggedMmap(tmp_path / "r")
    if not store.cold:
        pytest.skip("this file system keeps the pages (or probes cannot tell): nothing to test")
    asked = record_willneed(monkeypatch)
    assert store[10][0] == 10 and asked == [(10 * 8000, 11 * 8000)]  # its own pages, asked for
    with open(tmp_path / "r" / "data.ninja", "rb") as f:  # now in the page cache:
        f.read()
    for i in range(3000):  # probes (every 64th read) find it, 16 times in a row
        assert store[i][0] == i
    assert not store.cold
    asked.clear()
    store[5]
    assert asked == []  # hot reads ask nothing
    store.cold = True  # forced: probes no longer decide
    for i in range(2000):
        store[i]
    assert store.cold and len(asked) == 2000 - 2000 // 64


# ---------------------------------------------------------------------------------------------
# base: Wrapped
# ---------------------------------------------------------------------------------------------

def test_wrapped(tmp_path):
    data = np_ninja.from_ndarray(tmp_path / "n", np.arange(6).reshape(3, 2))
    seen = []
    wrapped = Wrapped(data, lambda x: seen.append(x.flags.writeable and x.base is None) or x.sum())
    assert len(wrapped) == 3 and wrapped[1] == 5 and list(wrapped) == [1, 5, 9]
    # as in the published package, a slice, list or mask is one call on data[item] (a batch)
    assert wrapped[1:] == 2 + 3 + 4 + 5 and wrapped[[0, 2]] == 0 + 1 + 4 + 5
    assert wrapped[np.array([True, False, True])] == 0 + 1 + 4 + 5
    assert all(seen) and len(seen) == 7  # each call got its own writable copy
    strings = StringsMmap.from_strings(tmp_path / "s", ["ab", "cd", "ef"])
    assert Wrapped(strings, "|".join)[0:2] == "ab|cd" and Wrapped(strings, str.upper)[2] == "EF"
    ragged = RaggedMmap.from_lists(tmp_path / "r2", [np.arange(3), np.arange(2)])
    batch = Wrapped(ragged, lambda samples: samples)[[1, 0]]  # copies of each sample, in a list
    assert_same_samples(batch, [np.arange(2), np.arange(3)])
    assert all(sample.base is None for sample in batch)
    no_copy = Wrapped(data, lambda x: x, copy_before_wrapper_fn=False)
    assert isinstance(no_copy[0], np.memmap)
    blob = pickle.dumps(Wrapped(RaggedMmap.from_lists(tmp_path / "r", [np.arange(10**5)]), np.sum))
    assert len(blob) < 600 and pickle.loads(blob)[0] == sum(range(10**5))


# ---------------------------------------------------------------------------------------------
# numpy: a np.memmap per store
# ---------------------------------------------------------------------------------------------

def test_np_from_ndarray_round_trip_and_files(tmp_path):
    arr = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    out = np_ninja.from_ndarray(tmp_path / "a", arr)
    assert isinstance(out, np.memmap) and out.mode == "r+"
    np.testing.assert_array_equal(out, arr)
    d = tmp_path / "a"
    assert (d / "type.ninja").read_text() == "numpy"
    assert (d / "dtype.ninja").read_text() == "float32"
    assert (d / "shape.ninja").read_bytes() == np.array([4, 3, 2], "<u8").tobytes()
    assert (d / "order.ninja").read_text() == "C"
    assert (d / "data.ninja").read_bytes() == arr.tobytes()
    reopened = np_ninja.open_existing(str(d))
    assert reopened.mode == "r" and not reopened.flags.writeable
    np.testing.assert_array_equal(reopened, arr)


def test_np_fortran_and_noncontiguous_inputs(tmp_path):
    fortran = np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))
    out = np_ninja.from_ndarray(tmp_path / "f", fortran)
    assert (tmp_path / "f" / "order.ninja").read_text() == "F"
    assert out.flags.f_contiguous
    np.testing.assert_array_equal(out, fortran)
    strided = np.arange(40).reshape(8, 5)[::2, 1::2]
    np.testing.assert_array_equal(np_ninja.from_ndarray(tmp_path / "s", strided), strided)
    with pytest.raises(ValueError, match="Fortran-order store.*np.ascontiguousarray"):
        np_ninja.extend_dir(tmp_path / "f", np.zeros((1, 4), np.int16))


def test_np_from_generator_replaces_the_old_store_when_complete(tmp_path):
    np_ninja.from_ndarray(tmp_path / "g", np.arange(3))
    seen = []

    def gen():
        for i in range(10):
            if i == 7:  # batches of 3: two are written by now, aside
                seen.append(np_ninja.open_existing(tmp_path / "g").tolist())
            yield np.full((2, 2), i, np.uint8)
    out = np_ninja.from_generator(tmp_path / "g", gen(), batch_size=3)
    assert seen == [[0, 1, 2]]  # the old store, intact, until the new one was complete
    assert out.shape == (10, 2, 2) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 0, 0], np.arange(10))
    assert hidden_leftovers(tmp_path / "g") == []


def test_np_from_generator_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="cannot be inferred.*np_empty"):
        np_ninja.from_generator(tmp_path / "e", iter([]), 4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            np_ninja.from_generator(tmp_path / "b", iter([np.zeros(2)]), bad)
    with pytest.raises(ValueError, match=r"every sample must have shape \(2,\)"):
        np_ninja.from_generator(tmp_path / "s", iter([np.zeros(2), np.zeros(3)]), 4)
    assert not (tmp_path / "s").exists() and hidden_leftovers(tmp_path / "s") == []


def test_np_extend_append_and_snapshot(tmp_path):
    m = np_ninja.from_ndarray(tmp_path / "a", np.arange(6).reshape(3, 2))
    reader = np_ninja.open_existing(tmp_path / "a")
    np_ninja.extend(m, np.array([[6, 7], [8, 9]]))
    np_ninja.append(m, np.array([10, 11]))
    assert reader.shape == (3, 2) and m.shape == (3, 2)  # snapshots
    with pytest.raises(TypeError, match="expected a np.memmap opened by mmap_ninja, got ndarray"):
        np_ninja.append(np.zeros(2), np.zeros(2))
    np.testing.assert_array_equal(np_ninja.open_existing(tmp_path / "a"), np.arange(12).reshape(6, 2))
    np_ninja.extend_dir(tmp_path / "a", np.zeros((0, 2), np.int64))
    assert np_ninja.open_existing(tmp_path / "a").shape == (6, 2)


def test_np_refused_extends_leave_store_unchanged(tmp_path):
    np_ninja.from_ndarray(tmp_path / "a", np.arange(6, dtype=np.int32).reshape(3, 2))
    before = snapshot(tmp_path / "a")
    with pytest.raises(ValueError, match=r"shape \(3, 2\) with an array of shape \(1, 3\).*rows must have shape \(2,\)"):
        np_ninja.extend_dir(tmp_path / "a", np.zeros((1, 3), np.int32))
    with pytest.raises(TypeError, match="dtype float64 in a store of dtype int32 without losing"):
        np_ninja.extend_dir(tmp_path / "a", np.full((1, 2), 0.5))
    with pytest.raises(TypeError, match="without losing values"):
        np_ninja.extend_dir(tmp_path / "a", np.array([[2**40, 1]]))
    with pytest.raises(TypeError, match="object dtype"):
        np_ninja.extend_dir(tmp_path / "a", np.array([[object(), 1]], dtype=object))
    assert snapshot(tmp_path / "a") == before
    np_ninja.extend_dir(tmp_path / "a", [[7, 8]])  # a list of Python ints that fit is fine
    assert np_ninja.open_existing(tmp_path / "a")[-1].tolist() == [7, 8]


def test_np_empty_and_zero_size(tmp_path):
    e = np_ninja.empty(tmp_path / "e", np.float32, (3, 2))
    assert e.shape == (3, 2) and e.dtype == np.float32 and not e.any()
    e[1] = [1, 2]
    e.flush()
    assert np_ninja.open_existing(tmp_path / "e")[1].tolist() == [1, 2]
    z = np_ninja.from_ndarray(tmp_path / "z", np.zeros((0, 4), np.uint8))
    assert isinstance(z, np.memmap) and z.shape == (0, 4)
    assert os.path.getsize(tmp_path / "z" / "data.ninja") == 1  # as the published writer leaves it
    np_ninja.extend_dir(tmp_path / "z", np.ones((2, 4), np.uint8))
    np.testing.assert_array_equal(np_ninja.open_existing(tmp_path / "z"), np.ones((2, 4)))
    scalar = np_ninja.from_ndarray(tmp_path / "s", np.array(3.5))
    assert scalar.shape == () and float(scalar) == 3.5


def test_np_published_one_byte_empty_file_is_overwritten(tmp_path):
    np_ninja.from_ndarray(tmp_path / "a", np.zeros((0,), np.int64))
    (tmp_path / "a" / "data.ninja").write_bytes(b"\x00")  # what 0.8.2 leaves for 0 elements
    assert np_ninja.open_existing(tmp_path / "a").shape == (0,)
    np_ninja.extend_dir(tmp_path / "a", np.array([5, 6]))
    assert np_ninja.open_existing(tmp_path / "a").tolist() == [5, 6]


def test_memmap_pickles_by_path_and_slices_by_value(tmp_path):
    m = np_ninja.from_ndarray(tmp_path / "a", np.arange(200_000, dtype=np.float64))
    blob = pickle.dumps(m)
    assert len(blob) < 500
    back = pickle.loads(blob)
    assert isinstance(back, np.memmap) and back.shape == m.shape
    np.testing.assert_array_equal(back[:5], np.arange(5))
    part = pickle.loads(pickle.dumps(m[10:13]))
    assert type(part) is np.ndarray and part.tolist() == [10, 11, 12]


def test_np_empty_allocates_its_blocks_and_checks_its_shape(tmp_path, monkeypatch):
    """np_empty's zeros take their disk space at creation (a sparse file would let a full disk
    kill the process with SIGBUS at its first write); a full disk is an OSError naming the
    store, which is kept; impossible shapes are ValueErrors."""
    arr = np_ninja.empty(tmp_path / "e", np.float64, (1000, 64))
    assert arr.shape == (1000, 64) and not arr.any()
    if hasattr(os, "posix_fallocate"):
        assert os.stat(tmp_path / "e" / "data.ninja").st_blocks * 512 >= 1000 * 64 * 8
        before = snapshot(tmp_path / "e")

        def disk_full(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", disk_full)
        with pytest.raises(OSError, match=f"No space left on device: cannot create the store {tmp_path / 'e'}"):
            np_ninja.empty(tmp_path / "e", np.float64, (10**6,))
        assert snapshot(tmp_path / "e") == before and hidden_leftovers(tmp_path / "e") == []
    for shape in [(-3, 2), (2**62,), (2**40, 2**40)]:
        with pytest.raises(ValueError, match=r"cannot make a store of shape .* axes must be >= 0"):
            np_ninja.empty(tmp_path / "bad", np.float64, shape)
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(mmap_ninja.fcntl is None, reason="no flock on this platform")
def test_a_numpy_writer_racing_a_recreation_locks_the_new_store(tmp_path, monkeypatch):
    """Another process re-creates the store between the writer opening its directory and
    locking it: the writer must end up holding the lock of the store it writes to (the new
    one), not of the deleted directory, or two writers could append at once."""
    d = tmp_path / "n"
    np_ninja.from_ndarray(d, np.zeros((2, 3)))
    real_flock = mmap_ninja.fcntl.flock
    raced = []

    def flock_after_a_recreation(fd, operation):
        if not raced and operation == mmap_ninja.fcntl.LOCK_EX:
            raced.append(run_python(f"import numpy as np, mmap_ninja as mn; "
                                    f"mn.np_from_ndarray({str(d)!r}, np.ones((4, 3)))").returncode)
        return real_flock(fd, operation)

    monkeypatch.setattr(mmap_ninja.fcntl, "flock", flock_after_a_recreation)
    with mmap_ninja._NumpyWriter(str(d)) as writer:
        assert raced == [0] and writer.rows == 4
        assert os.fstat(writer.lock.fd).st_ino == os.stat(d).st_ino
        writer.extend(np.full((1, 3), 7.0))
    assert np_ninja.open_existing(d).tolist() == [[1.0] * 3] * 4 + [[7.0] * 3]


@linux_only
def test_a_numpy_writer_whose_store_vanishes_leaks_nothing(tmp_path, monkeypatch):
    """The store's directory removed by another process right after the writer opened its
    files: a clear error, and no descriptor (lock or file) left open."""
    d = tmp_path / "n"
    real_open = mmap_ninja._NumpyWriter._open

    def open_then_lose_the_store(writer):
        real_open(writer)
        if writer.out_dir == str(d):  # (not the builds of from_ndarray)
            shutil.rmtree(writer.out_dir)

    monkeypatch.setattr(mmap_ninja._NumpyWriter, "_open", open_then_lose_the_store)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        np_ninja.from_ndarray(d, np.zeros((4, 3), np.float32))
        with pytest.raises(FileNotFoundError, match="type.ninja does not exist"):
            np_ninja.extend_dir(d, np.ones((1, 3), np.float32))
    assert len(os.listdir("/proc/self/fd")) == before


# ---------------------------------------------------------------------------------------------
# Sequence stores (ragged and strings): the writer and the snapshot reader
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["flat", "nested", "strings"])
@pytest.mark.parametrize("damage", ["flipped bit in ends[1]", "starts after ends", "end past the data", "start before 0"])
def test_a_damaged_offset_is_an_error_never_another_samples_bytes(layout, damage, tmp_path):
    """Offsets are checked a page (512 samples) at a time on first use: a damaged one makes
    its page an error (naming the store), never other samples' bytes; other pages still read."""
    d = tmp_path / "s"
    samples = [np.arange(4) + 10 * k for k in range(600)]
    if layout == "nested":
        samples = [s.reshape(2, 2) for s in samples]
    if layout == "strings":
        samples = ["%04d" % k for k in range(600)]
        StringsMmap.from_strings(d, samples)
    else:
        RaggedMmap.from_lists(d, samples)
    index, value = {"flipped bit in ends[1]": (1, 8 ^ 4), "starts after ends": (2, 7),
                    "end past the data": (3, 10**6), "start before 0": (0, -4)}[damage]
    write_int64(d / ("starts" if damage == "start before 0" else "ends") / "data.ninja", index, value)
    store = open_existing(d)
    for read in (lambda: store[index], lambda: store[-599], lambda: store[[index, 5]], lambda: store[np.array([5, index])],
                 lambda: list(store), lambda: store.get_padded([0, index]) if layout != "strings" else store[:3]):
        shown = "(sample|string) 0 starts at (element|byte) -4, not at 0:" if damage == "start before 0" else \
            "(sample|string) [0-9]+ spans .*"
        with pytest.raises(ValueError, match=f"{d}: {shown} the store is damaged"):
            read()
    assert_same_samples([store[550]], [samples[550]]) if layout != "strings" else store[550] == samples[550]
    assert mmap_ninja._verify(str(d)) != [] and all(str(d) in p for p in mmap_ninja._verify(str(d)))


def write_int64s(path, values):
    with open(path, "r+b") as f:
        f.write(np.array(values, "<i8").tobytes())


def test_offsets_that_wrap_around_or_go_negative_are_damage(tmp_path):
    """Offsets whose differences wrap around int64 (recorded lengths to match), shape offsets
    that do, and a later page of offsets shifted below 0 (numpy would read negative bounds
    from the end): each is 'the store is damaged', never other samples' bytes."""
    big = 2**62
    flat = tmp_path / "flat"
    RaggedMmap.from_lists(flat, [np.array([10]), np.array([20]), np.array([30])])
    write_int64s(flat / "starts" / "data.ninja", [0, big + 1, -big])
    write_int64s(flat / "ends" / "data.ninja", [big + 1, -big, 3])
    write_int64s(flat / "shapes" / "data.ninja", [big + 1, 2**63 - 1, big + 3])  # (the wrapped sizes)
    nested = tmp_path / "nested"
    RaggedMmap.from_lists(nested, [np.ones((1, 1))] * 3)
    write_int64s(nested / "shapes" / "starts" / "data.ninja", [0, big + 1, -big])
    write_int64s(nested / "shapes" / "ends" / "data.ninja", [big + 1, -big, 6])
    shifted = tmp_path / "shifted"
    RaggedMmap.from_lists(shifted, [np.array([k]) for k in range(1700)])
    starts = np.arange(1700)
    starts[511:1025] -= 1050  # page 1 (and its neighbours) below 0, still chained
    write_int64s(shifted / "starts" / "data.ninja", starts)
    write_int64s(shifted / "ends" / "data.ninja", starts + 1)
    for d, i in ((flat, 0), (flat, 2), (nested, 1), (shifted, 600)):
        with pytest.raises(ValueError, match=f"{d}: sample [0-9]+ spans .* the store is damaged"):
            RaggedMmap(d)[i]
    assert RaggedMmap(shifted)[1600].tolist() == [1600]  # (pages not next to it still read)


def _worker_sum(args):
    store, i = args
    return int(np.asarray(store[i]).sum())


def test_spawned_workers_read_by_path(tmp_path):
    import multiprocessing
    ragged = RaggedMmap.from_lists(tmp_path / "r", [np.full(100_000, i) for i in range(4)])
    strings = StringsMmap.from_strings(tmp_path / "s", ["x" * 100_000, "yy"])
    memmap = np_ninja.from_ndarray(tmp_path / "n", np.ones((4, 100_000)))
    for store in (ragged, strings, memmap):
        assert len(pickle.dumps(store)) < 600
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.map(_worker_sum, [(ragged, i) for i in range(4)]) == [0, 100_000, 200_000, 300_000]
        assert pool.map(_worker_sum, [(memmap, i) for i in range(2)]) == [100_000, 100_000]
        assert pool.map(len, [strings]) == [2]


def test_unpickled_store_keeps_the_senders_length(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(2, dtype=np.int16)])
    blob = pickle.dumps(store)
    RaggedMmap(tmp_path / "r").append(np.arange(3, dtype=np.int16))
    back = pickle.loads(blob)
    assert len(back) == 1 and back.dtype == np.int16 and back[-1].tolist() == [0, 1]
    # a ShardedMmap too: its global indices must map to the same samples in every process
    for k in range(2):
        RaggedMmap.from_lists(tmp_path / "shards" / f"s{k}", [np.array([10 * k + i]) for i in range(2)])
    sharded = ShardedMmap(tmp_path / "shards")
    blob = pickle.dumps(sharded)
    for k in range(2):
        RaggedMmap(tmp_path / "shards" / f"s{k}").append(np.array([99]))
    back = pickle.loads(blob)
    assert len(back) == 4 and [int(s[0]) for s in back] == [0, 1, 10, 11] and back[2].tolist() == [10]
    assert len(ShardedMmap(tmp_path / "shards")) == 6
    # a store that is no longer there (removed; not mounted where it is unpickled) is an error, not empty
    blob = pickle.dumps(StringsMmap.from_strings(tmp_path / "gone", ["a", "b"]))
    shutil.rmtree(tmp_path / "gone")
    for read in (list, lambda s: s[1], lambda s: s[:], lambda s: s[[0]]):
        back = pickle.loads(blob)
        with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'gone'} holds no store now, where this "
                                                    f"object saw 2 strings: it was removed, or is not mounted"):
            read(back)
        assert len(back) == 2


def test_an_unpickled_sharded_mmap_of_numpy_shards_keeps_each_sample_at_its_index(tmp_path):
    """A numpy shard re-created shorter after pickling must not move the later shards' samples
    to other global indices (a spawned worker would read other samples than its parent)."""
    for name, first in (("a", 0), ("b", 100)):
        np_ninja.from_ndarray(tmp_path / "s" / name, np.arange(first, first + 10))
    blob = pickle.dumps(ShardedMmap(tmp_path / "s"))
    np_ninja.from_ndarray(tmp_path / "s" / "a", np.arange(5))
    back = pickle.loads(blob)
    assert len(back) == 20 and back[12] == 102 and back[4] == 4
    assert [int(x) for x in back[[12, 19, 3]]] == [102, 109, 3] and [int(x) for x in back[10:]] == list(range(100, 110))
    gone = f"{tmp_path / 's' / 'a'} holds 5 samples now, where this ShardedMmap saw 10 .*sample 7 is gone; open the shards again"
    with pytest.raises(IndexError, match=gone):
        back[7]
    with pytest.raises(IndexError, match=gone.replace("sample 7", "sample 9")):
        back[[7, 9] * 16 + [12]]
    samples = []  # iteration follows the same indices: shard a's five, then the error
    with pytest.raises(IndexError, match=gone.replace("sample 7", "sample 9")):
        for sample in back:
            samples.append(int(sample))
    assert samples == [0, 1, 2, 3, 4]
    assert [int(x) for x in pickle.loads(pickle.dumps(ShardedMmap(tmp_path / "s")))] == [0, 1, 2, 3, 4] + list(range(100, 110))
    assert len(ShardedMmap(tmp_path / "s")) == 15


def test_a_pickled_relative_path_works_in_another_directory(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    RaggedMmap.from_lists("rel", [np.arange(3)])
    StringsMmap.from_strings("rels", ["x"])
    blobs = [pickle.dumps(RaggedMmap("rel")), pickle.dumps(StringsMmap("rels")), pickle.dumps(ShardedMmap(["rel"]))]
    monkeypatch.chdir(tmp_path / "b")
    ragged, strings, sharded = map(pickle.loads, blobs)
    assert ragged[0].tolist() == [0, 1, 2] and strings[0] == "x" and sharded[0].tolist() == [0, 1, 2]


@needs_zstd
def test_an_unpickled_zstd_store_appends_compressed(tmp_path):
    StringsMmap.from_strings(tmp_path / "z", ["zstd ü"] * 30, zstd_level=3)
    clone = pickle.loads(pickle.dumps(StringsMmap(tmp_path / "z")))
    clone.append("first call")  # nothing read yet: the compression comes from the store's files
    assert StringsMmap(tmp_path / "z")[-1] == "first call" and clone[-1] == "first call"
    assert mmap_ninja._verify(str(tmp_path / "z")) == []


def test_hot_path_keeps_attribute_access_specializable():
    # A class-level __getattr__ makes every self.x on the read path ~70 ns slower.
    for cls in (RaggedMmap, StringsMmap):
        assert all("__getattr__" not in vars(c) for c in cls.__mro__ if c is not object)


@pytest.mark.parametrize("kind", ["ragged", "strings"])
def test_replacing_in_place_after_a_recreation_writes_the_new_store(kind, tmp_path):
    """An object that outlives a re-creation replaces samples of the new store, at the new
    store's offsets and under its lock, as its appends do; a replacement that does not fit
    the new sample is refused, the store unchanged."""
    d = tmp_path / "s"
    if kind == "ragged":
        RaggedMmap.from_lists(d, [np.arange(4, dtype=np.int32), np.arange(4, dtype=np.int32)])
        editor = RaggedMmap(d, mode="r+")
        RaggedMmap.from_lists(d, [np.full(1, 7, np.int32), np.full(7, 8, np.int32)])
        before = snapshot(d)
        with pytest.raises(ValueError, match="sample 1 has 7 elements"):
            editor[1] = np.full(4, -1, np.int32)  # meant for the old sample 1
        assert snapshot(d) == before
        editor[1] = np.full(7, -1, np.int32)
        assert_same_samples(RaggedMmap(d)[:], [np.full(1, 7, np.int32), np.full(7, -1, np.int32)])
    else:
        StringsMmap.from_strings(d, ["abc", "def"])
        editor = StringsMmap(d)
        StringsMmap.from_strings(d, ["x", "yyyyyyy"])
        before = snapshot(d)
        with pytest.raises(ValueError, match="string 1 is 7 UTF-8 bytes"):
            editor[1] = "ZZZ"
        assert snapshot(d) == before
        editor[1] = "ZZZZZZZ"
        assert StringsMmap(d)[:] == ["x", "ZZZZZZZ"]


@pytest.mark.parametrize("kind", ["ragged", "strings"])
def test_replacing_in_a_removed_store_is_refused(kind, tmp_path):
    d = tmp_path / "s"
    store = make_store(kind, d)
    editor = type(store)(d, mode="r+") if kind == "ragged" else StringsMmap(d)
    shutil.rmtree(d)
    with pytest.raises(FileNotFoundError, match="no sample to replace"):
        editor[0] = store[0]
    assert not d.exists()  # (no empty store made on the way)


# ---------------------------------------------------------------------------------------------
# ragged: RaggedMmap, a sequence of arrays of different shapes
# ---------------------------------------------------------------------------------------------

def mixed_samples():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 255, (rng.integers(1, 5), 3, 2)).astype(np.uint8) for _ in range(30)] + [
        np.zeros((0, 3, 2), np.uint8)]


def test_ragged_from_lists_layout_and_values(tmp_path):
    samples = [np.arange(3, dtype=np.int32), np.arange(6, dtype=np.int32).reshape(2, 3)]
    store = RaggedMmap.from_lists(tmp_path / "r", samples)
    assert_same_samples(store, samples)
    d = tmp_path / "r"
    assert (d / "type.ninja").read_text() == "ragged"
    assert (d / "shapes_are_flat.ninja").read_bytes() == b"\x00\x00\x00\x00"
    assert (d / "starts" / "data.ninja").read_bytes() == np.array([0, 3], "<i8").tobytes()
    assert (d / "ends" / "data.ninja").read_bytes() == np.array([3, 9], "<i8").tobytes()
    assert (d / "flattened_shapes" / "data.ninja").read_bytes() == np.array([3, 6], "<i8").tobytes()
    assert mmap_ninja._verify(str(d)) == []


def test_ragged_flat_layout_matches_published(tmp_path):
    RaggedMmap.from_lists(tmp_path / "r", [np.array([1.5, 2.5]), np.array([]), np.array(3.5)])
    d = tmp_path / "r"
    assert (d / "shapes_are_flat.ninja").read_bytes() == b"\x01\x00\x00\x00"
    assert (d / "shapes" / "shape.ninja").read_bytes() == np.array([3, 1], "<u8").tobytes()
    assert (d / "shapes" / "data.ninja").read_bytes() == np.array([2, 0, 0], "<i8").tobytes()
    assert (d / "flattened_shapes" / "data.ninja").read_bytes() == np.array([2, 0, 1], "<i8").tobytes()
    store = RaggedMmap(d)
    assert [np.shape(s) for s in store] == [(2,), (0,), ()]
    assert store[2] == 3.5 and type(store[2]) is float  # a Python scalar, as published
    assert store.shape_of(2) == ()


def test_ragged_generator_indexable_and_function(tmp_path):
    samples = mixed_samples()
    assert_same_samples(RaggedMmap.from_generator(tmp_path / "g", iter(samples), batch_size=4), samples)
    assert_same_samples(RaggedMmap.from_indexable(tmp_path / "i", samples, batch_size=7), samples)
    assert_same_samples(RaggedMmap.from_indexable(tmp_path / "j", samples, batch_size=5, n_jobs=3), samples)

    def fn(i):
        if i >= 11:
            raise IndexError(i)
        return np.arange(i)
    store = RaggedMmap.from_indexable(tmp_path / "f", fn, batch_size=4, n_jobs=2)
    assert [len(s) for s in store] == list(range(11))


def test_ragged_generator_replaces_the_old_store_when_complete(tmp_path):
    RaggedMmap.from_lists(tmp_path / "g", [np.array([7, 7])])
    seen = []

    def gen():
        for i in range(9):
            if i == 5:  # batches of 2: two are written by now, aside
                seen.append([s.tolist() for s in RaggedMmap(tmp_path / "g")])
            yield np.arange(i)
    store = RaggedMmap.from_generator(tmp_path / "g", gen(), batch_size=2)
    assert seen == [[[7, 7]]]
    assert [len(s) for s in store] == list(range(9)) and hidden_leftovers(tmp_path / "g") == []


def test_from_indexable_length_and_end_rules(tmp_path):
    class NoLength:  # a __len__ that raises TypeError: the length is unknown, read until IndexError
        def __len__(self):
            raise TypeError("no length")

        def __getitem__(self, i):
            if i >= 5:
                raise IndexError(i)
            return np.arange(i)

    class Keyed:  # no length; a KeyError ends the data, as in the published package
        def __getitem__(self, i):
            return {0: np.zeros(2), 1: np.ones(2)}[i]

    class Buggy:  # a known length, and an IndexError before it: the source's bug, an error
        def __len__(self):
            return 100

        def __getitem__(self, i):
            if i == 50:
                raise IndexError("bug")
            return np.arange(3)

    assert [len(s) for s in RaggedMmap.from_indexable(tmp_path / "a", NoLength(), 2)] == [0, 1, 2, 3, 4]
    assert [s.tolist() for s in RaggedMmap.from_indexable(tmp_path / "b", Keyed(), 4, n_jobs=2)] == [[0, 0], [1, 1]]
    with pytest.raises(IndexError, match=r"c: reading item 50 of an indexable whose len\(\) is 100 raised IndexError: bug"):
        RaggedMmap.from_indexable(tmp_path / "c", Buggy(), 16)
    assert not (tmp_path / "c").exists() and hidden_leftovers(tmp_path / "c") == []


def test_ragged_indexing_forms(tmp_path):
    samples = [np.arange(i, dtype=np.int16) for i in range(6)]
    store = RaggedMmap.from_lists(tmp_path / "r", samples)
    assert store[np.int64(2)].tolist() == [0, 1]
    assert store[-1].tolist() == list(range(5))
    assert [s.tolist() for s in store[1:6:2]] == [[0], [0, 1, 2], [0, 1, 2, 3, 4]]
    assert [len(s) for s in store[[5, 0, -2]]] == [5, 0, 4]
    assert [len(s) for s in store[np.array([3, 3])]] == [3, 3]
    assert [len(s) for s in store[np.arange(6) % 2 == 1]] == [1, 3, 5]
    assert store[[]] == [] and store[4:2] == []
    with pytest.raises(IndexError, match="index 6 is out of range for 6 samples"):
        store[6]
    with pytest.raises(IndexError, match="index -7"):
        store[[0, -7]]
    with pytest.raises(IndexError, match="boolean mask"):
        store[np.array([True, False])]
    with pytest.raises(TypeError, match="index must be"):
        store["a"]
    assert [len(s) for s in iter(store)] == list(range(6))
    assert store.get_single(3).tolist() == [0, 1, 2] and len(store.get_multiple([1, 2])) == 2


def test_ragged_setitem(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(3), np.arange(4).reshape(2, 2)])
    store[0] = [7, 8, 9]
    store[1] = np.array([[1, 1], [1, 1]])
    assert store[0].tolist() == [7, 8, 9]
    assert RaggedMmap(tmp_path / "r")[1].tolist() == [[1, 1], [1, 1]]
    before = snapshot(tmp_path / "r")
    with pytest.raises(ValueError, match="sample 0 has 3 elements; a replacement must have as many"):
        store[0] = [1, 2]
    with pytest.raises(ValueError, match="sample 1 has 4 elements"):
        store[0:2] = [[1, 2, 3], [1]]  # the first is fine, the second is not: nothing is written
    assert snapshot(tmp_path / "r") == before
    store[[1, 0]] = [np.zeros(4, int), [0, 0, 0]]
    assert [s.sum() for s in RaggedMmap(tmp_path / "r")] == [0, 0]


def test_ragged_modes_and_wrapper(tmp_path):
    RaggedMmap.from_lists(tmp_path / "r", [np.arange(3.0)])
    ro = RaggedMmap(tmp_path / "r")
    assert not ro[0].flags.writeable
    rw = RaggedMmap(tmp_path / "r", mode="r+")
    rw[0][1] = 42
    assert RaggedMmap(tmp_path / "r")[0].tolist() == [0, 42, 2]
    wrapped = RaggedMmap(tmp_path / "r", wrapper_fn=lambda a: a * 2)
    assert wrapped[0].tolist() == [0, 84, 4]

    def grab(a):
        a[0] = -1
        return a
    copied = RaggedMmap(tmp_path / "r", mode="r+", wrapper_fn=grab)
    assert copied[0].flags.writeable and copied[0][0] == -1
    assert RaggedMmap(tmp_path / "r")[0][0] == 0  # wrapper got a copy
    with pytest.raises(ValueError, match="mode must be"):
        RaggedMmap(tmp_path / "r", mode="w")


def test_ragged_empty_store_and_zero_length_samples(tmp_path, monkeypatch):
    store = RaggedMmap(tmp_path / "new" / "nested")
    assert len(store) == 0 and list(store) == [] and store[:] == []
    with pytest.raises(IndexError):
        store[0]
    store.append(np.array([], np.float32))
    store.extend([np.zeros((0, 3), np.float32), np.ones(2, np.float32)])
    assert [s.shape for s in RaggedMmap(tmp_path / "new" / "nested")] == [(0,), (0, 3), (2,)]
    assert RaggedMmap(tmp_path / "new" / "nested").dtype == np.float32
    empty = RaggedMmap.from_generator(tmp_path / "g", iter([]), 3)
    assert len(empty) == 0 and (tmp_path / "g" / "type.ninja").read_text() == "ragged"
    empty.append(np.array([1, 2], np.uint8))  # the first samples choose an empty store's dtype
    assert RaggedMmap(tmp_path / "g")[0].dtype == np.uint8
    assert os.path.getsize(tmp_path / "g" / "starts" / "data.ninja") == 8
    # a first append that failed (a full disk, a kill) leaves the dtype's name: the next samples still choose
    failing = RaggedMmap.from_generator(tmp_path / "f", iter([]), 3)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(mmap_ninja, "_write_at", full)
        with pytest.raises(OSError, match="No space left"):
            failing.append(np.arange(3, dtype=np.int16))
    assert len(RaggedMmap(tmp_path / "f")) == 0 and (tmp_path / "f" / "dtype.ninja").read_text() == "int16"
    RaggedMmap(tmp_path / "f").append(np.array([0.5], np.float32))
    assert RaggedMmap(tmp_path / "f")[0].dtype == np.float32
    # unless dtype= chose it: its dtype.ninja says numpy's type string ('<f8', '<u2'), not a name
    for name, dtype, bad, sample in (("u16", np.uint16, np.array([1.5]), np.array([3])),
                                     ("f64", np.float64, np.array([2**62 + 1]), np.array([3, 4], np.int8))):
        chosen = RaggedMmap.from_indexable(tmp_path / name, [], 4, dtype=dtype)
        before = snapshot(tmp_path / name)
        with pytest.raises(TypeError, match=f"{tmp_path / name}: cannot store a sample of dtype {bad.dtype} in a "
                                            f"store of dtype {np.dtype(dtype)} without losing values"):
            chosen.append(bad)
        assert snapshot(tmp_path / name) == before
        chosen.append(sample)
        assert RaggedMmap(tmp_path / name)[0].dtype == dtype and RaggedMmap(tmp_path / name)[0].tolist() == sample.tolist()


@pytest.mark.parametrize("leftover", [False, True])
def test_a_scalar_first_append_leaves_the_next_shapes_at_the_end(leftover, tmp_path):
    # a scalar's shape () writes nothing to the nested shapes/ data file, so a fresh writer's
    # descriptor there did not move: the next append must still write at the committed end
    d = tmp_path / "r"
    RaggedMmap.from_lists(d, [np.arange(6).reshape(2, 3), np.arange(4)])
    if leftover:  # what a writer killed mid-append leaves past the end: ignored, overwritten
        with open(d / "shapes" / "data.ninja", "ab") as f:
            f.write(np.array([3, 2], "<i8").tobytes())
    store = RaggedMmap(d)
    store.append(np.int64(9))
    store.append(np.arange(6).reshape(3, 2) + 100)
    store.append(np.arange(5))
    back = RaggedMmap(d)
    assert [np.shape(x) for x in back] == [(2, 3), (4,), (), (3, 2), (5,)]
    assert back[0].tolist() == [[0, 1, 2], [3, 4, 5]] and back[2] == 9 and back[3].tolist() == [[100, 101], [102, 103], [104, 105]]
    assert mmap_ninja._verify(str(d)) == []


def test_ragged_flat_store_takes_nd_samples(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(3), np.array(5)])
    store.append(np.arange(4).reshape(2, 2))
    store.append(np.array(6))
    expected = [np.arange(3), np.array(5), np.arange(4).reshape(2, 2), np.array(6)]
    assert_same_samples(store, expected)
    assert_same_samples(RaggedMmap(tmp_path / "r"), expected)
    assert (tmp_path / "r" / "shapes_are_flat.ninja").read_bytes() == b"\x00\x00\x00\x00"
    assert sorted(os.listdir(tmp_path / "r" / "shapes"))[-1] == "type.ninja"
    assert mmap_ninja._verify(str(tmp_path / "r")) == []


def test_ragged_refused_input_leaves_store_unchanged(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(3)])
    before = snapshot(tmp_path / "r")
    with pytest.raises(TypeError, match="not array-like"):
        store.extend([np.arange(2), object()])
    with pytest.raises(TypeError, match="dtype float64 in a store of dtype int64"):
        store.extend([np.arange(2), np.full(2, 1.5)])
    with pytest.raises(TypeError, match="cannot store list value"):
        store.append([[1, 2], [3]])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        RaggedMmap.from_generator(tmp_path / "x", iter([]), 0)
    assert snapshot(tmp_path / "r") == before and len(store) == 1


def test_ragged_snapshot_and_own_appends(tmp_path):
    writer = RaggedMmap.from_lists(tmp_path / "r", [np.arange(2)])
    reader = RaggedMmap(tmp_path / "r")
    writer.extend([np.arange(3), np.arange(4)])
    assert len(reader) == 1 and len(writer) == 3
    assert writer[2].tolist() == [0, 1, 2, 3]
    assert len(RaggedMmap(tmp_path / "r")) == 3


def test_ragged_close_and_with(tmp_path):
    RaggedMmap.from_lists(tmp_path / "r", [np.arange(2)])
    with RaggedMmap(tmp_path / "r") as store:
        kept = store[0]
    with pytest.raises(ValueError, match="the store is closed"):
        store[0]
    assert kept.tolist() == [0, 1]  # a sample held past close stays valid


def test_ragged_noncontiguous_and_fortran_samples(tmp_path):
    samples = [np.arange(12).reshape(3, 4).T, np.arange(10)[::2], np.asfortranarray(np.ones((2, 3), np.int64)),
               np.arange(8).astype("datetime64[s]")[::3]]
    expected = [np.ascontiguousarray(s) for s in samples]
    store = RaggedMmap.from_lists(tmp_path / "r", samples[:3])
    store.extend([samples[0], samples[1]])
    assert_same_samples(RaggedMmap(tmp_path / "r"), expected[:3] + expected[:2])
    dates = RaggedMmap.from_lists(tmp_path / "d", [samples[3], samples[3][:1]])
    assert_same_samples(dates, [expected[3], expected[3][:1]])


def test_ragged_str_dtype_and_paths(tmp_path):
    words = [np.array(["ab", "cde"]), np.array(["ü"])]
    store = RaggedMmap.from_lists(str(tmp_path / "a" / "b" / "c"), words)
    assert store.dtype == np.dtype("<U3") and [w.tolist() for w in store] == [["ab", "cde"], ["ü"]]
    with pytest.raises(TypeError, match="without losing values"):
        store.append(np.array(["toolong"]))


def test_from_lists_dtype_argument(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [[1, 2], [3]], dtype=np.float32)
    assert store.dtype == np.float32 and store[0].dtype == np.float32


def test_scalar_samples_read_as_python_scalars(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.array(3, np.uint8), np.arange(2, dtype=np.uint8), np.array(4, np.uint8)])
    assert store[0] == 3 and type(store[0]) is int and type(store[-1]) is int
    assert store[[2, 0]] == [4, 3] and [type(s) for s in store[:]] == [int, np.ndarray, int]
    assert store.get_padded([0, 2])[0].tolist() == [3, 4]  # a batch is still an array
    wrapped = RaggedMmap(tmp_path / "r", wrapper_fn=lambda x: ("got", x))
    assert wrapped[0] == ("got", 3)
    store.append(np.ones((2, 2), np.uint8))  # nested now: the scalars stay scalars
    assert RaggedMmap(tmp_path / "r")[0] == 3 and type(RaggedMmap(tmp_path / "r")[2]) is int
    assert [type(s) for s in RaggedMmap(tmp_path / "r")[[0, 3]]] == [int, np.ndarray]
    floats = RaggedMmap.from_lists(tmp_path / "f", [np.array(2.5, np.float32), np.array(True)], dtype=np.float32)
    assert floats[0] == 2.5 and type(floats[0]) is float and floats[1] == 1.0


def test_index_forms_numpy_gives(tmp_path):
    """Object arrays of ints (what np.array of mixed Python ints gives) and small numpy int
    types index like Python ints, negatives included."""
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(k % 5) for k in range(200)])
    assert_same_samples(store[np.array([1, 2], dtype=object)], [np.arange(1), np.arange(2)])
    assert_same_samples([store[np.int8(-1)], store[np.int16(-2)], store[np.uint8(3)]],
                        [np.arange(4), np.arange(3), np.arange(3)])
    assert store.shape_of(np.int8(-1)) == (4,)
    with pytest.raises(IndexError, match="index 1180591620717411303424 is out of range"):
        store[np.array([1, 2**70], dtype=object)]
    for tie in ([-(1 << 63), 1 << 63], [1 << 63, -(1 << 63)]):  # (only 2**63 is past int64)
        with pytest.raises(IndexError, match=f"{tmp_path}.*index 9223372036854775808 is out of range"):
            store[np.array(tie, dtype=object)]


def test_a_path_through_a_symlink_and_dotdot_is_the_one_the_os_resolves(tmp_path, monkeypatch):
    """A store object keeps its path absolute but not normalised: link/.. is where the link
    leads, then up, as the OS resolves it (abspath would drop link/.. on paper)."""
    (tmp_path / "data" / "sets").mkdir(parents=True)
    os.symlink(tmp_path / "data" / "sets", tmp_path / "current")
    monkeypatch.chdir(tmp_path)
    store = RaggedMmap.from_lists("current/../shared", [np.arange(2), np.arange(3)])
    assert len(store) == 2 and store.out_dir == str(tmp_path / "current" / ".." / "shared")
    assert (tmp_path / "data" / "shared" / "type.ninja").exists() and not (tmp_path / "shared").exists()
    strings = StringsMmap.from_strings("current/../words", ["a", "b"])
    assert strings[:] == ["a", "b"] and (tmp_path / "data" / "words" / "type.ninja").exists()
    # what abspath would name instead holds other stores: copies and appends must not go there
    RaggedMmap.from_lists(tmp_path / "shared", [np.arange(9)])
    np_ninja.from_ndarray(tmp_path / "data" / "rows", np.ones(3))
    np_ninja.from_ndarray(tmp_path / "rows", np.full(3, 2.0))
    for copy in (pickle.loads(pickle.dumps(store)), pickle.loads(pickle.dumps(ShardedMmap(["current/../shared"])))):
        assert_same_samples([copy[0], copy[1]], [np.arange(2), np.arange(3)])
    rows = np_ninja.open_existing("current/../rows", "r+")
    assert pickle.loads(pickle.dumps(rows)).tolist() == [1.0] * 3
    np_ninja.extend(rows, np.full(2, 7.0))
    assert np_ninja.open_existing(tmp_path / "data" / "rows").tolist() == [1.0] * 3 + [7.0] * 2
    assert np_ninja.open_existing(tmp_path / "rows").tolist() == [2.0] * 3


def test_the_layout_verdict_follows_a_recreated_store(tmp_path):
    """Batch reads trust a verdict on the shapes kept across remaps of the same shape file.
    The file is held open, so that a re-created store's file cannot get its inode number
    (ext4 reuses them at once) and inherit the verdict: after a re-creation with other
    shapes, reads follow the new store."""
    d = tmp_path / "r"
    RaggedMmap.from_lists(d, [np.zeros((2, 3))] * 4)
    store = RaggedMmap(d)
    store[[0, 1]]  # checks the layout: 2-D, regular
    held = store._layout.fd
    assert held is not None and os.fstat(held).st_nlink == 1
    new = [np.arange(8.0).reshape(2, 2, 2), np.arange(8.0, 16).reshape(2, 2, 2)]
    RaggedMmap.from_lists(d, new)
    assert os.fstat(held).st_nlink == 0  # (the old file, deleted but held: its number is not reused)
    store.append(np.full((1, 1, 1), 9.0))  # the object follows the new store
    assert_same_samples(store[[0, 1, 2]], new + [np.full((1, 1, 1), 9.0)])
    assert store.get_padded([0, 1])[1].tolist() == [[2, 2, 2], [2, 2, 2]]
    assert store._layout.fd != held or os.fstat(store._layout.fd).st_nlink == 1
    store.close()
    assert store._layout.fd is None


# ---------------------------------------------------------------------------------------------
# ragged: batch reads
# ---------------------------------------------------------------------------------------------

def test_get_padded(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(1, i + 1) for i in range(5)])
    batch, shapes = store.get_padded([4, 1, 2], pad_value=-1)
    assert batch.tolist() == [[1, 2, 3, 4], [1, -1, -1, -1], [1, 2, -1, -1]]
    assert shapes.tolist() == [[4], [1], [2]] and batch.flags.writeable
    images = RaggedMmap.from_lists(tmp_path / "i", [np.ones((2, 3)), np.full((3, 1), 2.0)])
    batch, shapes = images.get_padded([0, 1])
    assert batch.shape == (2, 3, 3) and shapes.tolist() == [[2, 3], [3, 1]]
    assert batch[0].sum() == 6 and batch[1].sum() == 6 and batch[1, :, 0].tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="one number of dimensions"):
        RaggedMmap.from_lists(tmp_path / "m", [np.ones(2), np.ones((2, 2))]).get_padded([0, 1])
    scalars = RaggedMmap.from_lists(tmp_path / "s", [np.array(i * 1.5) for i in range(5)])
    batch, shapes = scalars.get_padded([4, 1])
    assert batch.tolist() == [6.0, 1.5] and shapes.shape == (2, 0)
    cubes = RaggedMmap.from_lists(tmp_path / "c", [np.full((1, 2, 2), 1), np.full((2, 1, 3), 2)])
    batch, shapes = cubes.get_padded([1, 0], pad_value=-1)
    assert batch.shape == (2, 2, 2, 3) and shapes.tolist() == [[2, 1, 3], [1, 2, 2]]
    assert (batch[0, :2, :1, :3] == 2).all() and (batch[0, :, 1:] == -1).all()
    assert (batch[1, :1, :2, :2] == 1).all() and (batch[1, 1:] == -1).all() and (batch[1, ..., 2:] == -1).all()
    empty_batch, empty_shapes = cubes.get_padded([])
    assert empty_batch.shape[0] == 0 and empty_shapes.shape[0] == 0


def padded_reference(samples, pad_value, dtype):
    """get_padded written the obvious way, to check the fast paths against."""
    shapes = np.array([s.shape for s in samples], np.int64).reshape(len(samples), -1)
    batch = np.full((len(samples),) + tuple(shapes.max(axis=0)), pad_value, dtype)
    for k, s in enumerate(samples):
        batch[(k,) + tuple(slice(a) for a in s.shape)] = s
    return batch, shapes


@pytest.mark.parametrize("layout", ["images", "uniform", "matrices", "zero_width", "4d", "mixed_ndim", "flat"])
def test_batch_reads_and_get_padded_match_the_samples(layout, tmp_path):
    """Batch reads take a windowed path for stores whose samples all have 2+ dimensions, and
    get_padded one gather when only the first axis varies: both must give exactly the samples,
    including the last ones (which end near the end of the data) and zero-size ones."""
    rng = np.random.default_rng(7)

    def shape():
        if layout == "images":
            return (int(rng.integers(1, 9)), int(rng.integers(1, 9)), 3)
        if layout == "uniform":  # sequences of vectors: only the first axis varies
            return (int(rng.integers(0, 9)), 5)
        if layout == "matrices":
            return (int(rng.integers(0, 6)), int(rng.integers(1, 6)))
        if layout == "zero_width":  # some rows hold no elements: no window for them
            return (int(rng.integers(0, 4)), int(rng.integers(0, 3)))
        if layout == "4d":
            return tuple(int(a) for a in rng.integers(1, 4, 4))
        if layout == "mixed_ndim":
            return tuple(int(a) for a in rng.integers(1, 5, int(rng.integers(1, 4))))
        return (int(rng.integers(0, 9)),)
    samples = [rng.integers(-100, 100, shape()).astype(np.int32) for _ in range(300)]
    store = RaggedMmap.from_lists(tmp_path / "r", samples, mode="r")
    n = len(samples)
    for idx in (rng.integers(0, n, 256), rng.integers(-n, n, 64).tolist(), [n - 1, n - 2, 0], np.arange(n)):
        expected = [samples[i] for i in idx]
        got = store[idx]
        assert_same_samples(got, expected)
        assert all(g.flags.c_contiguous and not g.flags.writeable for g in got)
        if layout != "mixed_ndim":
            batch, shapes = store.get_padded(idx, pad_value=-7)
            want, want_shapes = padded_reference(expected, -7, np.int32)
            assert batch.dtype == np.int32 and batch.flags.writeable
            np.testing.assert_array_equal(batch, want)
            np.testing.assert_array_equal(shapes, want_shapes)
    assert_same_samples(list(store), samples)
    assert_same_samples(store[n - 5:], samples[n - 5:])


@pytest.mark.parametrize("dtype", [">f4", "<U3", "M8[s]", "?", "c8", [("a", "<i2"), ("b", ">f4", (2,))]])
def test_batch_paths_keep_exact_dtypes(dtype, tmp_path):
    """The strided windows and the gathered runs work on the data's own dtype."""
    dtype, rng = np.dtype(dtype), np.random.default_rng(3)
    for layout, shape in (("flat", lambda: (int(rng.integers(0, 6)),)),
                          ("uniform", lambda: (int(rng.integers(0, 5)), 2)),
                          ("images", lambda: (int(rng.integers(1, 4)), int(rng.integers(1, 4)), 2))):
        samples = []
        for _ in range(30):
            values = rng.integers(0, 50, shape())
            sample = np.zeros(values.shape, dtype)
            if dtype.names:
                sample["a"], sample["b"] = values, (values / 2)[..., None]
            else:
                sample[...] = values.astype(str) if dtype.kind == "U" else values
            samples.append(sample)
        store = RaggedMmap.from_lists(tmp_path / layout, samples)
        idx = [29, 3, 0, 28, 15]
        assert_same_samples(store[idx], [samples[i] for i in idx])
        batch, shapes = store.get_padded(idx)
        assert batch.dtype == dtype
        for row, i in zip(batch, idx):
            np.testing.assert_array_equal(row[tuple(slice(a) for a in samples[i].shape)], samples[i])


@pytest.mark.parametrize("masks_max", [None, 0])
def test_get_padded_images_through_byte_masks(masks_max, tmp_path, monkeypatch):
    """Images take one gather of full-width rows, which carries whatever follows each row in
    the data, then a byte-mask AND; with masks_max=0 (masks too large) every sample is copied
    one by one. Both must pad exactly: bytes past a row here are NaN or the next sample's,
    pads are zero and nonzero, and the last samples end too near the data's end for a row."""
    if masks_max is not None:
        monkeypatch.setattr(mmap_ninja, "_PAD_MASKS_MAX", masks_max)
    copied = []  # how many samples each call of _pad_each (the one-by-one fallback) copied
    pad_each = mmap_ninja._pad_each

    def counting_pad_each(store, batch, idx, shapes, which=None):
        copied.append(len(idx) if which is None else len(which))
        return pad_each(store, batch, idx, shapes, which)

    monkeypatch.setattr(mmap_ninja, "_pad_each", counting_pad_each)
    rng = np.random.default_rng(11)
    samples = []
    for k in range(40):
        sample = np.full((int(rng.integers(0, 7)), int(rng.integers(1, 7)), 2), np.nan)
        sample[..., 0] = k  # channel 0 tells samples apart, channel 1 is NaN
        samples.append(sample)
    store = RaggedMmap.from_lists(tmp_path / "r", samples)
    n = len(samples)
    for idx in ([n - 1, 0, n - 2, 5], np.arange(n), rng.integers(0, n, 64)):
        for pad in (0, -1.5):
            copied.clear()
            batch, shapes = store.get_padded(idx, pad_value=pad)
            want, want_shapes = padded_reference([samples[i] for i in idx], pad, np.float64)
            assert batch.dtype == np.float64 and batch.flags.writeable and batch.flags.c_contiguous
            np.testing.assert_array_equal(batch, want)  # NaN only where the samples have it
            np.testing.assert_array_equal(shapes, want_shapes)
            # the fast path copies one by one only the samples at the end of the data (here
            # the last two)
            assert sum(copied) == (len(idx) if masks_max == 0 else sum(int(i) >= n - 2 for i in idx))
    batch[:] = 7  # a new array: the store is untouched
    assert_same_samples(store[[0, n - 1]], [samples[0], samples[n - 1]])
    # a third axis that varies from now on: the batch is copied one by one, at its real shape
    store.append(np.full((1, 1, 3), 9.0))
    batch, _ = store.get_padded([n, 0], pad_value=-1)
    np.testing.assert_array_equal(batch, padded_reference([np.full((1, 1, 3), 9.0), samples[0]], -1, np.float64)[0])
    # shapes that are not regular (2-D and 3-D samples mixed): which axes vary is found per batch
    mixed = RaggedMmap.from_lists(tmp_path / "m", [np.ones((2, 2))] + samples)
    copied.clear()
    batch, _ = mixed.get_padded([1, 6, 3], pad_value=-1)
    np.testing.assert_array_equal(batch, padded_reference([samples[0], samples[5], samples[2]], -1, np.float64)[0])
    assert sum(copied) == (3 if masks_max == 0 else 0)


def test_get_padded_samples_in_the_last_run(tmp_path):
    # data [0 1 2 3 | 10 | 20 21]: runs of 4 elements start at 0..3, so sample 1 (at 4) and
    # sample 2 (at 5) are copied one by one
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(4), np.array([10]), np.array([20, 21])])
    batch, shapes = store.get_padded([1, 2, 0], pad_value=-1)
    assert batch.tolist() == [[10, -1, -1, -1], [20, 21, -1, -1], [0, 1, 2, 3]]
    assert shapes.tolist() == [[1], [2], [4]]


def test_get_padded_images_at_the_end_of_the_data(tmp_path):
    # data [0 1 2 3 | 4 | 5 6]: the batch's rows are 2 elements wide, so full rows start at
    # 0..5; sample 1's rows start at 4 and 5 and are gathered, sample 2's at 5 and 6 are not
    samples = [np.arange(4).reshape(2, 2), np.array([[4]]), np.array([[5], [6]])]
    store = RaggedMmap.from_lists(tmp_path / "r", samples)
    batch, shapes = store.get_padded([2, 0, 1], pad_value=-1)
    assert batch.tolist() == [[[5, -1], [6, -1]], [[0, 1], [2, 3]], [[4, -1], [-1, -1]]]
    assert shapes.tolist() == [[2, 1], [2, 2], [1, 1]]


def test_batch_reads_fall_back_when_windows_cannot_serve(tmp_path):
    """A window's key packs a sample's trailing axes into 62 bits: 10 per axis for 7-D samples,
    so an axis of 1024 or more cannot be packed and batch reads slice and reshape instead
    (packed anyway, its bits would spill into the next axis and give the wrong shape)."""
    rng = np.random.default_rng(5)
    samples = [rng.integers(0, 100, (int(rng.integers(1, 3)), 1, 2, 1, 1, 1, 1030 + k % 2), dtype=np.int16)
               for k in range(12)]
    idx = rng.integers(0, 12, 20)
    store = RaggedMmap.from_lists(tmp_path / "long", samples)
    assert_same_samples(store[idx], [samples[i] for i in idx])
    assert not store._layout.windows.usable
    # with the last axis cut under 1024, the same samples are served by the windows
    short = [np.ascontiguousarray(s[..., :1000]) for s in samples]
    store = RaggedMmap.from_lists(tmp_path / "short", short)
    assert_same_samples(store[idx], [short[i] for i in idx])
    assert store._layout.windows.usable


def test_batch_reads_follow_appends_and_recreation(tmp_path):
    """What a batch read knows about the shape layout is checked once per sample and kept
    across appends; it must notice samples that break the layout and a store recreated
    under an open object."""
    path = tmp_path / "r"
    first = [np.full((2, 3), i) for i in range(4)]
    store = RaggedMmap.from_lists(path, first)
    assert_same_samples(store[[0, 3]], [first[0], first[3]])
    store.append(np.full((2, 2, 2), 9))  # three dimensions after two: no longer one layout
    assert_same_samples(store[[4, 1]], [np.full((2, 2, 2), 9), first[1]])
    store.extend([np.full((1, 1), 5)])
    assert_same_samples(store[np.arange(6)], first + [np.full((2, 2, 2), 9), np.full((1, 1), 5)])
    reader = RaggedMmap(path)
    assert_same_samples(reader[[0, 5]], [first[0], np.full((1, 1), 5)])
    # one trailing shape, then a wider one: the batch path must stop treating them as one
    narrow = [np.arange(4 * i, 4 * i + 4).reshape(2, 2) for i in range(3)]
    grown = RaggedMmap.from_lists(tmp_path / "g", narrow)
    assert_same_samples(grown[[2, 0]], [narrow[2], narrow[0]])
    grown.extend([np.full((1, 3), 7), np.full((2, 3), 8)] + [np.zeros((2, 3), int)] * 5)  # (the
    # last samples are read another way: see _Layout.window_views)
    assert_same_samples(grown[[0, 3, 4, 1]], [narrow[0], np.full((1, 3), 7), np.full((2, 3), 8), narrow[1]])
    other = [np.arange(6).reshape(3, 2), np.arange(4).reshape(1, 4)]
    RaggedMmap.from_lists(path, other)  # recreated while `reader` is open
    reader.append(np.ones((2, 2), np.int64))
    assert_same_samples(reader[[0, 1, 2]], other + [np.ones((2, 2), np.int64)])


def test_batch_views_write_through_in_r_plus(tmp_path):
    path = tmp_path / "r"
    RaggedMmap.from_lists(path, [np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8), np.zeros((1, 1), np.uint8)])
    views = RaggedMmap(path, mode="r+")[[1, 0]]
    views[0][2, 1] = 7
    views[1][0, 2] = 8
    del views
    again = RaggedMmap(path)
    assert again[1].tolist() == [[0, 0], [0, 0], [0, 7]] and again[0].tolist() == [[0, 0, 8], [0, 0, 0]]


def write_first_shape(store_dir, axes):
    """Overwrite the first recorded axes of a nested store's first sample."""
    path = store_dir / "shapes" / "data.ninja"
    raw = bytearray(path.read_bytes())
    raw[:8 * len(axes)] = b"".join(int(a).to_bytes(8, "little") for a in axes)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("layout", ["regular", "irregular"])
def test_hostile_shapes_never_reach_an_allocation(layout, tmp_path):
    """A recorded shape whose int64 product wraps around ((2**32, 2**32) reads as 0 elements)
    is damage, reported naming the store; a zero-size sample claiming (0, 2**40) is a valid
    shape, but get_padded refuses to allocate terabytes for it."""
    d = tmp_path / "n"
    samples = [np.zeros((0, 3), np.uint8), np.ones((2, 2), np.uint8)] + ([np.ones((1, 1, 1), np.uint8)] if layout == "irregular" else [])
    RaggedMmap.from_lists(d, samples)
    write_first_shape(d, (2**32, 2**32))
    store = RaggedMmap(d)
    damaged = r"sample 0 spans elements 0 to 0, which does not fit its recorded shape \(4294967296, 4294967296\)"
    for read in (lambda: store[0], lambda: store[[0, 1]], lambda: store.get_padded([0, 1]), lambda: list(store)):
        with pytest.raises(ValueError, match=damaged):
            read()
    assert cli("verify", d).returncode == 1
    RaggedMmap.from_lists(d, samples)
    write_first_shape(d, (0, 2**40))
    store = RaggedMmap(d)
    assert store[0].shape == (0, 2**40) and store.shape_of(0) == (0, 2**40)
    with pytest.raises(ValueError, match=r"padding these 2 samples to shape \(2, 1099511627776\) would allocate"):
        store.get_padded([0, 1])
    batch, shapes = store.get_padded([1])
    assert batch.tolist() == [[[1, 1], [1, 1]]] and shapes.tolist() == [[2, 2]]


def test_get_padded_images_of_height_zero(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.zeros((0, 2, 3)), np.zeros((0, 5, 3)), np.ones((4, 4, 3))])
    batch, shapes = store.get_padded([0, 1])
    assert batch.shape == (2, 0, 5, 3) and shapes.tolist() == [[0, 2, 3], [0, 5, 3]]
    batch, shapes = store.get_padded([0, 1, 2], pad_value=-1)
    assert batch.shape == (3, 4, 5, 3) and (batch[:2] == -1).all() and (batch[2, :, :4] == 1).all()


# ---------------------------------------------------------------------------------------------
# string: StringsMmap, a sequence of str
# ---------------------------------------------------------------------------------------------

def test_strings_round_trip_and_layout(tmp_path):
    texts = ["alpha", "", "ünïcødé ✓", "😀", "line\nbreak"]
    store = StringsMmap.from_strings(tmp_path / "s", texts)
    assert list(store) == texts
    assert (tmp_path / "s" / "data.ninja").read_bytes() == "".join(texts).encode()
    assert store[-1] == "line\nbreak" and store[1:3] == ["", "ünïcødé ✓"] and store[[3, 0]] == ["😀", "alpha"]
    store.append("new")
    store.extend(["x", "y"])
    assert list(StringsMmap(tmp_path / "s")) == texts + ["new", "x", "y"]
    gen = StringsMmap.from_generator(tmp_path / "g", (str(i) for i in range(10)), batch_size=3)
    assert list(gen) == [str(i) for i in range(10)]


def test_strings_refused_input_and_setitem(tmp_path):
    store = StringsMmap.from_strings(tmp_path / "s", ["abc", "de"])
    before = snapshot(tmp_path / "s")
    with pytest.raises(TypeError, match="holds str only, got bytes"):
        store.extend(["ok", b"bytes"])
    with pytest.raises(TypeError, match="got int"):
        store.append(5)
    with pytest.raises(UnicodeEncodeError, match=r"s: string 1 holds a lone surrogate.*'replace'"):
        store.extend(["fine", "lone surrogate \ud800"])
    with pytest.raises(ValueError, match="string 0 is 3 UTF-8 bytes; a replacement must be as long, got 2"):
        store[0] = "ab"
    assert snapshot(tmp_path / "s") == before
    store[0] = "xyz"
    assert StringsMmap(tmp_path / "s")[0] == "xyz"


def test_strings_batches_encode_exactly(tmp_path):
    """Batches of small strings are encoded joined by NULs and split where the NULs are;
    large ones one by one: strings that hold NULs themselves, empty strings and every UTF-8
    length must still come back exactly."""
    texts = ["", "a\0b", "\0", "ü", "日本語", "🙂x", "", "plain", "\0\0end"] * 3
    plain = ["ü" * (i % 4) + "日" * (i % 3) + "x" * (i % 5) for i in range(40)]  # no NULs: joined
    store = StringsMmap.from_strings(tmp_path / "s", texts)
    store.extend(plain)
    store.extend(["ü" * 3, "", "a"])
    store.extend(["x\0"])
    # large strings (the first and last of the batch 4096+ long) are encoded one by one
    large = ["ü日🙂\0x"[i % 5] * (4096 + 37 * i) for i in range(20)]
    store.extend(large)
    assert list(StringsMmap(tmp_path / "s")) == texts + plain + ["ü" * 3, "", "a", "x\0"] + large
    ends = np.fromfile(tmp_path / "s" / "ends" / "data.ninja", "<i8")
    assert ends.tolist() == np.cumsum([len(t.encode()) for t in list(store)]).tolist()


class SliceSpy:
    """Stands in for a StringsMmap's map: records each slice read from it."""

    def __init__(self, buf):
        self.buf, self.slices = buf, []

    def __getitem__(self, item):
        self.slices.append((item.start, item.stop))
        return self.buf[item]

    def __len__(self):
        return len(self.buf)


def test_strings_read_a_run_of_long_strings_in_one_copy(tmp_path):
    # consecutive strings of 512 bytes or more on average are copied out of the map at once,
    # then cut (a copy per string leaves the memory prefetcher behind); others one by one
    long = [f"é{k}" + "x" * (500 + 37 * (k % 9)) for k in range(300)]
    store = StringsMmap.from_strings(tmp_path / "long", long)
    spy = store._buf = SliceSpy(store._buf)
    assert store[10:200] == long[10:200]
    assert spy.slices == [(int(store.starts[10]), int(store.ends[199]))]
    assert list(store) == long and len(spy.slices) == 3  # (iteration: batches of 256)
    for keys, copies in (([5, 100, 7], 3), ([-3, -2, -1], 1), ([20, 22, 21, 23], 4), ([0, 0, 2], 3),
                         ([np.uint64(1), -1], 2), ([np.int8(3), np.int8(4)], 1), (np.arange(40, 60), 1)):
        spy.slices.clear()
        assert store[keys] == [long[k] for k in keys] and len(spy.slices) == copies
    short = [f"é{k}" for k in range(300)]
    small = StringsMmap.from_strings(tmp_path / "short", short)
    spy = small._buf = SliceSpy(small._buf)
    assert small[10:200] == short[10:200] and len(spy.slices) == 190
    # a string that does not decode, inside a run: the error names it, as one by one
    store = StringsMmap(tmp_path / "long")
    with open(tmp_path / "long" / "data.ninja", "r+b") as f:
        f.seek(int(store.starts[150]) + 3)
        f.write(b"\xff")
    with pytest.raises(ValueError, match=r"long: string 150 is not UTF-8 \(invalid start byte at byte 3\)"):
        StringsMmap(tmp_path / "long")[100:200]


def test_strings_empty_generator(tmp_path):
    store = StringsMmap.from_generator(tmp_path / "g", iter([]), 10)
    assert len(store) == 0 and (tmp_path / "g" / "type.ninja").read_text() == "string"
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        StringsMmap.from_generator(tmp_path / "h", iter(["a"]), 0)


def test_strings_empty(tmp_path):
    store = StringsMmap.from_strings(tmp_path / "e", [])
    assert len(store) == 0 and list(store) == []
    assert os.path.getsize(tmp_path / "e" / "data.ninja") == 1  # as the published writer leaves it
    store.append("first")
    assert list(StringsMmap(tmp_path / "e")) == ["first"]
    fresh = StringsMmap(tmp_path / "fresh")
    assert len(fresh) == 0
    fresh.extend(["a"])
    assert open_existing(tmp_path / "fresh")[0] == "a"


@needs_zstd
@pytest.mark.parametrize("dict_size", [None, 1024])
def test_strings_zstd_round_trip(tmp_path, dict_size):
    texts = [f"document {i} about ninja " * (i % 5 + 1) for i in range(100)]
    store = StringsMmap.from_strings(tmp_path / "z", texts, zstd_level=5, zstd_train_dictionary_size=dict_size)
    assert (tmp_path / "z" / "zstd_level.ninja").read_text() == "5"
    assert (tmp_path / "z" / "zstd_dict.ninja").exists() == bool(dict_size)
    store.extend(["more", "ünï"])
    assert list(StringsMmap(tmp_path / "z")) == texts + ["more", "ünï"]
    assert os.path.getsize(tmp_path / "z" / "data.ninja") < sum(len(t) for t in texts)
    with pytest.raises(ValueError, match="cannot be replaced in place"):
        store[0] = texts[0]


@needs_zstd
@pytest.mark.parametrize("lost", [["zstd_level.ninja"], ["zstd_level.ninja", "zstd_dict.ninja"]])
def test_a_zstd_store_that_lost_its_level_file_refuses_appends_and_says_why(tmp_path, lost):
    """Without zstd_level.ninja the store looks plain; a plain append would mix raw UTF-8
    into zstd frames. Its first string is a zstd frame, which UTF-8 never is, so both reads
    and appends are refused with the remedy, and the refused append changes nothing."""
    d = tmp_path / "z"
    texts = ["zstd text %d ü" % k for k in range(40)]
    StringsMmap.from_strings(d, texts, zstd_level=3, zstd_train_dictionary_size=256 if len(lost) == 2 else None)
    for name in lost:
        os.remove(d / name)
    before = snapshot(d)
    remedy = rf"{re.escape(str(d))}: its strings are zstd-compressed but zstd_level.ninja is missing.*restore"
    store = StringsMmap(d)
    with pytest.raises(ValueError, match=remedy):
        store.append("plain")
    with pytest.raises(ValueError, match=remedy):
        StringsMmap(d).extend(["a", "b"])
    assert snapshot(d) == before
    with pytest.raises(ValueError, match=remedy):
        store[0]
    assert any("zstd_level.ninja is missing" in p for p in mmap_ninja._verify(d))
    (d / "zstd_level.ninja").write_text("3")
    if len(lost) == 2:  # without its dictionary the frames do not decode: still refused, as damaged
        with pytest.raises(ValueError, match="cannot decompress a string"):
            StringsMmap(d)[0]
        return
    StringsMmap(d).append("plain")
    assert StringsMmap(d)[:] == texts + ["plain"]


def test_a_plain_strings_store_starting_with_a_paren_still_appends(tmp_path):
    d = tmp_path / "s"
    StringsMmap.from_strings(d, ["(\u00b5/\u00fd", "(", ""])  # "(" then UTF-8 of "µ": not the zstd magic
    StringsMmap(d).append("x")
    assert StringsMmap(d)[:] == ["(\u00b5/\u00fd", "(", "", "x"]


def test_missing_zstd_module_gives_clear_error(monkeypatch):
    monkeypatch.setattr(mmap_ninja, "_zstd_module", lambda: None)
    with pytest.raises(ModuleNotFoundError, match=r"strings_zstd is zstd-compressed.*Python 3\.14\+.*zstandard"):
        StringsMmap(LEGACY / "0.9.0" / "strings_zstd")


@needs_zstd
def test_training_a_zstd_dictionary_on_too_little_text(tmp_path):
    with pytest.raises(ValueError, match="cannot train a zstd dictionary of 100000 bytes on 2 strings.*pass more"):
        StringsMmap.from_strings(tmp_path / "z", ["a", "b"], zstd_level=3, zstd_train_dictionary_size=100_000)
    assert not (tmp_path / "z").exists()


def test_strings_copy_on_write(tmp_path):
    """mode='c' replaces strings in this process's private map only; the file is unchanged.
    Appends go to the file (in any mode); a replacement after one lands in the new map."""
    d = tmp_path / "s"
    StringsMmap.from_strings(d, ["abc", "dé", "f"])
    before = snapshot(d)
    private = open_existing(d, mode="c")
    private[0] = "xyz"
    private[[1, 2]] = ["Zé", "g"]
    assert private[:] == ["xyz", "Zé", "g"] and StringsMmap(d)[:] == ["abc", "dé", "f"]
    assert snapshot(d) == before
    private.append("new")
    private[3] = "NEW"
    assert private[3] == "NEW" and StringsMmap(d)[:] == ["abc", "dé", "f", "new"]


# ---------------------------------------------------------------------------------------------
# generic: open_existing, ShardedMmap, conversion on any executor
# ---------------------------------------------------------------------------------------------

def test_open_existing_dispatches(tmp_path):
    np_ninja.from_ndarray(tmp_path / "n", np.arange(3))
    RaggedMmap.from_lists(tmp_path / "r", [np.arange(2)])
    StringsMmap.from_strings(tmp_path / "s", ["a"])
    assert isinstance(open_existing(tmp_path / "n"), np.memmap)
    assert isinstance(open_existing(tmp_path / "r"), RaggedMmap)
    assert isinstance(open_existing(tmp_path / "s"), StringsMmap)
    assert open_existing(tmp_path / "n", wrapper_fn=lambda x: x + 1)[2] == 3
    assert open_existing(tmp_path / "r", wrapper_fn=lambda x: x.sum())[0] == 1
    assert open_existing(tmp_path / "s", wrapper_fn=str.upper)[0] == "A"
    with pytest.raises(ValueError, match="is a numpy store, not a ragged store"):
        RaggedMmap(tmp_path / "n")
    with pytest.raises(ValueError, match="is a ragged store, not a string store"):
        StringsMmap(tmp_path / "r")


def test_open_existing_takes_a_mode(tmp_path):
    RaggedMmap.from_lists(tmp_path / "r", [np.arange(3.0)])
    StringsMmap.from_strings(tmp_path / "s", ["abc"])
    np_ninja.from_ndarray(tmp_path / "n", np.arange(3.0))
    assert not open_existing(tmp_path / "r")[0].flags.writeable  # defaults as published
    assert not open_existing(tmp_path / "n").flags.writeable and open_existing(tmp_path / "s").mode == "r+b"
    open_existing(tmp_path / "r", mode="r+")[0][0] = 9
    open_existing(tmp_path / "n", mode="r+b")[1] = 8
    assert RaggedMmap(tmp_path / "r")[0].tolist() == [9, 1, 2] and np_ninja.open_existing(tmp_path / "n").tolist() == [0, 8, 2]
    with pytest.raises(ValueError, match="open read-only"):
        open_existing(tmp_path / "s", mode="r")[0] = "xyz"
    with pytest.raises(ValueError, match="mode must be 'r', 'r\\+' or 'c'"):
        open_existing(tmp_path / "r", mode="w")


def test_sharded(tmp_path):
    for k in range(3):
        RaggedMmap.from_lists(tmp_path / "shards" / f"part-{k}", [np.full(2, 10 * k + i) for i in range(k + 1)])
    (tmp_path / "shards" / "not-a-store").mkdir()
    sharded = ShardedMmap(tmp_path / "shards")
    assert len(sharded) == 6
    assert [int(s[0]) for s in sharded] == [0, 10, 11, 20, 21, 22]
    assert sharded[-1].tolist() == [22, 22] and [int(s[0]) for s in sharded[2:4]] == [11, 20]
    assert [int(s[0]) for s in sharded[[5, 0]]] == [22, 0]
    with pytest.raises(IndexError, match="out of range for 6 samples in 3 shards"):
        sharded[6]
    back = pickle.loads(pickle.dumps(sharded))
    assert len(pickle.dumps(sharded)) < 1000 and [int(s[0]) for s in back] == [0, 10, 11, 20, 21, 22]
    with pytest.raises(FileNotFoundError, match="holds no mmap_ninja store"):
        ShardedMmap(tmp_path / "shards" / "not-a-store")


def test_sharded_over_a_single_store_reads_that_store(tmp_path):
    RaggedMmap.from_lists(tmp_path / "images", [np.ones((2, 2)), np.zeros((1, 2))])
    sharded = ShardedMmap(tmp_path / "images")
    assert len(sharded) == 2 and sharded.paths == [str(tmp_path / "images")]
    RaggedMmap.from_lists(tmp_path / "parent" / "a", [np.arange(2)])
    RaggedMmap.from_lists(tmp_path / "parent" / ".a.ninja-new-1-x", [np.arange(9)])  # hidden: not read
    assert [s.tolist() for s in ShardedMmap(tmp_path / "parent")] == [[0, 1]]


@pytest.mark.parametrize("kind", ["images", "flat", "strings", "numpy"])
def test_sharded_batch_reads_each_shard_once(kind, tmp_path, monkeypatch):
    """A batch with many indices per shard is one batch read per shard, put back in the order
    asked; it must equal reading one index at a time (negatives and repeats included)."""
    rng = np.random.default_rng(5)
    shards = []
    for k, size in enumerate([70, 0, 50, 90]):  # an empty shard too
        path = tmp_path / "shards" / f"part-{k}"
        if kind == "strings":
            StringsMmap.from_strings(path, [f"{k}-{i}-" + "ü" * int(rng.integers(0, 4)) for i in range(size)])
        elif kind == "numpy":
            np_ninja.from_ndarray(path, np.arange(size * 3, dtype=np.int16).reshape(size, 3) + 1000 * k)
        else:
            shape = (lambda: (int(rng.integers(1, 5)), int(rng.integers(1, 5)), 2)) if kind == "images" else (
                lambda: (int(rng.integers(0, 6)),))
            RaggedMmap.from_lists(path, [rng.integers(0, 99, shape()) + 1000 * k for _ in range(size)])
        shards.append(path)
    sharded = ShardedMmap(shards)
    assert len(sharded) == 210
    batches = []  # the length of each shard's batch read
    for cls in (RaggedMmap, StringsMmap):
        def counting_read_batch(self, idx, real=cls._read_batch):
            batches.append(len(idx))
            return real(self, idx)

        monkeypatch.setattr(cls, "_read_batch", counting_read_batch)
    idx = rng.integers(-210, 210, 300)
    expected = [sharded[int(i)] for i in idx]
    got = sharded[idx]
    assert len(got) == 300
    if kind == "strings":
        assert got == expected
    else:
        assert_same_samples(got, expected)
    if kind != "numpy":  # three shards hold indices: one batch read each
        assert len(batches) == 3 and sum(batches) == 300
    batches.clear()
    assert_same = (lambda a, b: a == b) if kind == "strings" else (lambda a, b: all(map(np.array_equal, a, b)))
    assert assert_same(sharded[[3, 150, 3]], [sharded[3], sharded[150], sharded[3]]) and not batches  # few: one at a time
    tail = sharded[np.arange(130, 210)]  # all in the last shard: no reordering
    assert assert_same(tail, [sharded[i] for i in range(130, 210)])


class FlakySource:
    """A picklable indexable that raises (or kills its process) at one index while a flag file
    exists: a task that fails, or a worker that dies."""

    def __init__(self, samples, bad, flag, kill=False):
        self.samples, self.bad, self.flag, self.kill = samples, bad, str(flag), kill

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        if i == self.bad and os.path.exists(self.flag):
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"source broke at {i}")
        return self.samples[i]


def sharded_leftovers(out):
    return [p.name for d in (out, *[p for p in out.iterdir() if p.is_dir()]) for p in d.iterdir() if ".ninja-new-" in p.name]


@pytest.mark.parametrize("kind", ["ragged", "strings", "numpy"])
def test_sharded_conversion_on_a_process_pool(kind, tmp_path):
    from concurrent.futures import ProcessPoolExecutor
    rng = np.random.default_rng(2)
    samples = {"ragged": [rng.integers(0, 9, (k % 4 + 1, 3)).astype(">i2") for k in range(103)],
               "strings": [f"s{k} ü" * (k % 3) for k in range(103)],
               "numpy": [np.full(4, k, np.float32) for k in range(103)]}[kind]
    source = RaggedMmap.from_lists(tmp_path / "src", samples) if kind == "ragged" else samples
    with ProcessPoolExecutor(2) as pool:
        sharded = ShardedMmap.from_indexable(tmp_path / "out", source, 5, executor=pool,
                                             kind=None if kind != "numpy" else "numpy")
    assert len(sharded) == 103 and [os.path.basename(p) for p in sharded.paths] == [f"shard-{k}-of-5" for k in range(5)]
    assert [len(s) for s in sharded.shards] == [20, 21, 20, 21, 21]
    got = list(sharded)
    if kind == "strings":
        assert got == samples
    else:
        assert_same_samples(got, samples)
    again = ShardedMmap.from_indexable(tmp_path / "out", source, 5)  # nothing missing: nothing written
    assert len(again) == 103 and sharded_leftovers(tmp_path / "out") == []


def test_a_failed_task_leaves_no_partial_shard_and_a_rerun_finishes(tmp_path, capsys, monkeypatch):
    from concurrent.futures import ProcessPoolExecutor
    samples = [np.arange(k % 5) for k in range(90)]
    flag = tmp_path / "broken"
    flag.write_text("")
    out = tmp_path / "out"
    with ProcessPoolExecutor(2) as pool:
        with pytest.raises(RuntimeError, match="source broke at 40"):
            ShardedMmap.from_indexable(out, FlakySource(samples, 40, flag), 3, executor=pool)
    assert sorted(p.name for p in out.iterdir()) == ["shard-0-of-3", "shard-2-of-3", "shards.json"]
    assert sharded_leftovers(out) == []
    with pytest.raises(FileNotFoundError, match="holds 2 of the 3 shards of its conversion .*run ShardedMmap.from_indexable again"):
        ShardedMmap(out)
    kept = {p.name: p.stat().st_ino for p in out.iterdir()}
    flag.unlink()
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the text bar
    sharded = ShardedMmap.from_indexable(out, FlakySource(samples, 40, flag), 3, verbose=True)
    assert_same_samples(list(sharded), samples)
    assert all((out / name).stat().st_ino == ino for name, ino in kept.items() if name.startswith("shard-"))
    assert "shards: 100% 1/1" in capsys.readouterr().err  # only the missing shard was written


def test_a_killed_worker_leaves_nothing_read_and_a_rerun_finishes(tmp_path):
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    samples = [f"string {k}" for k in range(60)]
    flag = tmp_path / "kill"
    flag.write_text("")
    out = tmp_path / "out"
    with ProcessPoolExecutor(1) as pool:
        with pytest.raises(BrokenProcessPool):
            ShardedMmap.from_indexable(out, FlakySource(samples, 25, flag, kill=True), 2, executor=pool, batch_size=4)
    with pytest.raises(FileNotFoundError, match="not complete"):
        ShardedMmap(out)
    flag.unlink()
    assert list(ShardedMmap.from_indexable(out, FlakySource(samples, 25, flag), 2)) == samples
    assert sharded_leftovers(out) == []  # what the killed worker left was cleared


def test_a_conversion_killed_as_it_records_its_layout_can_be_run_again(tmp_path):
    out = tmp_path / "out"
    samples = [np.arange(k % 4) for k in range(12)]
    killed = run_python(f"""
        import os, numpy as np, mmap_ninja
        real = os.replace
        os.replace = lambda a, b: os._exit(9) if str(b).endswith("shards.json") else real(a, b)
        mmap_ninja.ShardedMmap.from_indexable({str(out)!r}, [np.arange(k % 4) for k in range(12)], 2,
                                              executor=mmap_ninja.ThreadPoolExecutor(1))
    """)
    assert killed.returncode == 9 and [p.name.startswith("shards.json.tmp-") for p in out.iterdir()] == [True]
    assert_same_samples(list(ShardedMmap.from_indexable(out, samples, 2)), samples)
    assert sorted(p.name for p in out.iterdir()) == ["shard-0-of-2", "shard-1-of-2", "shards.json"]


@pytest.mark.parametrize("first", [np.array(["ab", "cd"]), np.arange(3, dtype=">i4"),
                                   np.zeros(2, [("a", "<i2"), ("b", "<f4")])])
def test_a_refused_first_append_leaves_no_dtype_behind(first, tmp_path):
    # (the store was made with the first sample's dtype before the others were checked: a <U2
    # store then refused every int32 append)
    d = tmp_path / "s"
    d.mkdir()
    with pytest.raises(TypeError, match=f"{d}: cannot store .*dtype float64 in a store of dtype"):
        RaggedMmap(d).extend([first, np.array([1.5, 2.5])])
    assert len(RaggedMmap(d)) == 0
    RaggedMmap(d).extend([np.arange(3, dtype=np.int32)])
    store = RaggedMmap(d)
    assert store.dtype == np.int32 and store[0].tolist() == [0, 1, 2] and mmap_ninja._verify(str(d)) == []


def test_what_a_numpy_store_computes_is_a_plain_array_or_a_numpy_scalar(tmp_path):
    # (as np.memmap gives, and the published package: the subclass kept 0-d maps, unhashable)
    m = np_ninja.from_ndarray(tmp_path / "n", np.arange(12).reshape(4, 3))
    for value, expected in [(m.sum(), 66), (m.max(), 11), (np.sum(m), 66), (m[1].sum(), 12), (m[1, 2], 5)]:
        assert type(value) is np.int64 and value == expected
    assert type(m.mean()) is np.float64 and {m.max(): "k"} == {11: "k"}
    for value in (m * 2, m[[0, 2]], np.sqrt(m), m[m > 5]):
        assert type(value) is np.ndarray
    assert (m * 2).tolist()[1] == [6, 8, 10] and m[[0, 2]].tolist() == [[0, 1, 2], [6, 7, 8]]
    for view in (m[1], m[1:3], m.T):  # (still views of the map)
        assert isinstance(view, np.memmap) and np.shares_memory(view, m)
    w = np_ninja.open_existing(tmp_path / "n", mode="r+")
    assert np.add(w, 1, out=w) is w and np_ninja.open_existing(tmp_path / "n")[3].tolist() == [10, 11, 12]


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "geteuid"), reason="POSIX permissions, fork")
def test_a_store_is_made_in_a_writable_directory_whose_parent_is_not(tmp_path):
    # (a store is built beside out_dir: where only out_dir is writable, it is built inside it)
    base = pathlib.Path(tempfile.mkdtemp(dir=tmp_path.parent if os.geteuid() else "/tmp"))
    try:
        os.chmod(base, 0o755)
        outs = [base / "shared" / name for name in ("r", "s", "n")]
        for out in outs:
            out.mkdir(parents=True)
            os.chmod(out, 0o777)
        os.chmod(base / "shared", 0o555)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)  # (root writes anywhere: a user who may not write the parent)
                RaggedMmap.from_lists(outs[0], [np.arange(3)])
                StringsMmap.from_strings(outs[1], ["a"])
                np_ninja.from_ndarray(outs[2], np.arange(3))
                RaggedMmap.from_lists(outs[0], [np.arange(4)])  # (and replaced there)
                status = 0
            finally:
                os._exit(status)
        assert os.waitpid(pid, 0)[1] == 0
        assert [x.tolist() for x in RaggedMmap(outs[0])] == [[0, 1, 2, 3]] and list(StringsMmap(outs[1])) == ["a"]
        assert np_ninja.open_existing(outs[2]).tolist() == [0, 1, 2]
        assert sorted(os.listdir(base / "shared")) == ["n", "r", "s"] and hidden_leftovers(outs[0]) == []
    finally:
        os.chmod(base / "shared", 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_a_mismatched_rerun_is_refused(tmp_path):
    samples = [np.arange(k % 3) for k in range(20)]
    ShardedMmap.from_indexable(tmp_path / "out", samples, 2)
    before = snapshot(tmp_path / "out")
    for args, kwargs in [((samples, 3), {}), ((samples[:19], 2), {}), ((samples, 2), dict(kind="numpy"))]:
        with pytest.raises(ValueError, match="holds the shards of another conversion .*use another directory"):
            ShardedMmap.from_indexable(tmp_path / "out", *args, **kwargs)
    assert snapshot(tmp_path / "out") == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="other is not empty"):
        ShardedMmap.from_indexable(tmp_path / "other", samples, 2)
    with pytest.raises(TypeError, match="has no len"):
        ShardedMmap.from_indexable(tmp_path / "x", (s for s in samples), 2)
    with pytest.raises(TypeError, match="must pickle"):
        ShardedMmap.from_indexable(tmp_path / "y", mmap_ninja._IndexableFunction(lambda i: samples[i], 20), 2)


try:
    import distributed  # noqa: F401
    HAS_DASK = True
except ImportError:
    HAS_DASK = False


@pytest.mark.skipif(not HAS_DASK, reason="dask.distributed is not installed")
def test_sharded_conversion_on_a_dask_cluster(tmp_path):
    import dask
    from distributed import Client, LocalCluster
    samples = [np.full((k % 3 + 1, 2), k, np.int64) for k in range(200)]
    source = RaggedMmap.from_lists(tmp_path / "src", samples)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        sharded = ShardedMmap.from_indexable(tmp_path / "out", source, 4, executor=client.get_executor(pure=False))
        workers = client.run(os.getpid)
    assert len(set(workers.values())) == 2 and os.getpid() not in workers.values()
    assert_same_samples(list(sharded), samples)
    assert_same_samples(list(ShardedMmap(tmp_path / "out")), samples)


@pytest.mark.skipif(not HAS_DASK, reason="dask.distributed is not installed")
def test_readme_dask_recipe(tmp_path):
    code = readme_block("from distributed import Client, LocalCluster")
    (tmp_path / "convert.py").write_text(code)
    RaggedMmap.from_lists(tmp_path / "images", [np.full((k % 4 + 1, 2, 3), k, np.uint8) for k in range(100)])
    result = subprocess.run([sys.executable, "convert.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=str(HERE)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[:2] == ["100", "8"]
    assert_same_samples(list(ShardedMmap(tmp_path / "images-sharded")), list(RaggedMmap(tmp_path / "images")))


def test_numpy_shards_when_there_are_more_shards_than_items(tmp_path):
    """An empty numpy shard still has the dtype and row shape of the items (from the first),
    so the conversion finishes; an empty source is refused up front for numpy."""
    items = np.arange(6, dtype=np.int16).reshape(3, 2)
    sharded = ShardedMmap.from_indexable(tmp_path / "out", items, 5, kind="numpy",
                                         executor=ThreadPoolExecutor(2))
    assert len(sharded) == 3 and [int(x.sum()) for x in sharded[:]] == [1, 5, 9]
    assert [len(s) for s in sharded.shards] == [0, 1, 0, 1, 1]
    assert all(s.dtype == np.int16 and s.shape[1:] == (2,) for s in sharded.shards)
    with pytest.raises(ValueError, match="the indexable is empty, and a numpy store"):
        ShardedMmap.from_indexable(tmp_path / "none", np.zeros((0, 2)), 2, kind="numpy")


# ---------------------------------------------------------------------------------------------
# Training loops: epochs over data bigger than RAM
# ---------------------------------------------------------------------------------------------

def sampler_store(tmp_path, kind="tokens", n=3000):
    if kind == "tokens":
        return RaggedMmap.from_lists(tmp_path / "t", [np.full(k % 7 + 250, k, np.int32) for k in range(n)])  # ~1 KB
    if kind == "strings":
        return StringsMmap.from_strings(tmp_path / "s", ["x" * (k % 50 + 500) for k in range(n)])
    if kind == "numpy":
        return np_ninja.from_ndarray(tmp_path / "n", np.zeros((n, 256), np.int32))
    RaggedMmap.from_lists(tmp_path / "p" / "0", [np.zeros(256, np.int32)] * (n // 3))
    RaggedMmap.from_lists(tmp_path / "p" / "1", [np.zeros(256, np.int32)] * (n - n // 3))
    return ShardedMmap(tmp_path / "p")


@pytest.mark.parametrize("kind", ["tokens", "strings", "numpy", "sharded", "list"])
def test_quasi_random_epochs_are_permutations_that_spread_and_change(kind, tmp_path):
    store = list(range(3000)) if kind == "list" else sampler_store(tmp_path, kind)
    sampler = mmap_ninja.QuasiRandomSampler(store, 100, seed=3, block_bytes=64 << 10)
    blocks = sampler.blocks.tolist()
    assert blocks[0] == 0 and blocks[-1] == 3000 and len(blocks) - 1 >= 20
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 30 and all(len(b) == 100 for b in batches)
        assert all(type(i) is int for b in batches for i in b)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(3000))  # a permutation
        for b in batches:  # each batch draws from at least 8 blocks
            assert len({bisect.bisect_right(blocks, i) for i in b}) >= 8
        epochs.append(flat)
        sampler.set_epoch(epoch)
        assert [i for b in sampler for i in b] == flat  # the same seed and epoch: the same order
    assert epochs[0] != epochs[1]
    other = mmap_ninja.QuasiRandomSampler(store, 100, seed=4, block_bytes=64 << 10)
    assert [i for b in other for i in b] != epochs[0]
    if kind == "sharded":  # a block never spans two shards
        assert 1000 in blocks


def test_quasi_random_positions_do_not_follow_the_index(tmp_path):
    store = sampler_store(tmp_path, "tokens", 20000)
    correlations = []
    for seed in range(5):
        flat = [i for b in mmap_ninja.QuasiRandomSampler(store, 256, seed=seed, block_bytes=32 << 10) for i in b]
        correlations.append(np.corrcoef(flat, np.arange(len(flat)))[0, 1])
    assert abs(np.mean(correlations)) < 0.05 and max(map(abs, correlations)) < 0.15, correlations


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_quasi_random_ranks_split_each_epoch(world_size, drop_last, tmp_path):
    store = sampler_store(tmp_path, "tokens", 1001)
    samplers = [mmap_ninja.QuasiRandomSampler(store, 32, rank=r, world_size=world_size, drop_last=drop_last,
                                              block_bytes=16 << 10) for r in range(world_size)]
    for epoch in (0, 5):
        shares = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            assert all(len(b) == 32 for b in batches[:-1]) and (not drop_last or len(batches[-1]) == 32)
            shares.append([i for b in batches for i in b])
        per_rank = 1001 // world_size if drop_last else -(-1001 // world_size)
        if not drop_last:
            assert all(len(s) == per_rank for s in shares)
        seen = [i for s in shares for i in s]
        if drop_last:  # cut: disjoint, and at most world_size - 1 samples left out (plus short batches)
            assert len(set(seen)) == len(seen) and len(seen) >= 1001 - (world_size - 1) - world_size * 31
        else:  # padded: together they cover the store, with at most world_size - 1 repeats
            assert set(seen) == set(range(1001)) and len(seen) - 1001 <= world_size - 1
            assert sum(len(set(a) & set(b)) for a in shares for b in shares if a is not b) <= 2 * (world_size - 1)


def test_quasi_random_world_size_far_past_the_store_makes_only_this_ranks_part(tmp_path, monkeypatch):
    """Padding makes per_rank * world_size indices; only this rank's part is built (taken round
    the epoch's order), so a world_size of 10**11 over 10 samples neither allocates nor overflows."""
    store = sampler_store(tmp_path, "tokens", 10)  # one block: the epoch's order before shuffling is 0..9
    for world_size, rank in ((10**11, 10**11 - 1), (2**70, 2**70 - 7), (25, 24), (25, 13)):
        sampler = mmap_ninja.QuasiRandomSampler(store, 4, seed=3, rank=rank, world_size=world_size)
        assert len(sampler) == 1 and list(sampler) == [[rank % 10]]
    # the parts of the epoch padded round (3 each from 0..9, then 0, 1), as numpy's resize makes them
    shares = [sorted(i for b in mmap_ninja.QuasiRandomSampler(store, 2, seed=3, rank=r, world_size=4) for i in b)
              for r in range(4)]
    assert shares == [sorted(part) for part in np.resize(np.arange(10), 12).reshape(4, 3).tolist()]
    assert list(mmap_ninja.QuasiRandomSampler(store, 4, rank=5, world_size=12, drop_last=True)) == []


def test_quasi_random_prefetches_one_window_ahead(tmp_path, monkeypatch):
    store = sampler_store(tmp_path, "tokens", 6000)
    asked = []
    monkeypatch.setattr(mmap_ninja, "_prefetch", lambda s, idx: asked.append(np.asarray(idx).tolist()))
    sampler = mmap_ninja.QuasiRandomSampler(store, 50, block_bytes=32 << 10)
    consumed = set()
    for batch in sampler:
        ahead = {i for window in asked for i in window} - consumed - set(batch)
        window = max(map(len, asked))
        assert ahead <= set().union(*map(set, asked[-2:])) and len(ahead) <= 2 * window  # bounded
        consumed |= set(batch)
    assert sorted(i for w in asked for i in w) == list(range(6000))  # each window asked for once
    assert len(asked) > 8


def test_quasi_random_sampler_refuses_bad_arguments(tmp_path):
    store = sampler_store(tmp_path, "tokens", 10)
    for kwargs, message in [(dict(rank=2, world_size=2), "rank must be an int in \\[0, 2\\)"),
                            (dict(world_size=0), "^world_size must be a positive integer, got 0"),
                            (dict(block_bytes=-1), "^block_bytes must be a positive integer, got -1")]:
        with pytest.raises(ValueError, match=message):
            mmap_ninja.QuasiRandomSampler(store, 4, **kwargs)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        mmap_ninja.QuasiRandomSampler(store, 0)
    for kwargs in (dict(seed=1.5), dict(seed=None), dict(seed="1")):
        with pytest.raises(TypeError, match=f"^QuasiRandomSampler's seed must be an int, got {kwargs['seed']!r}$"):
            mmap_ninja.QuasiRandomSampler(store, 4, **kwargs)
    with pytest.raises(TypeError, match="^QuasiRandomSampler's epoch must be an int, got 1.7$"):
        mmap_ninja.QuasiRandomSampler(store, 4).set_epoch(1.7)
    # negative seeds and epochs work (torch takes them), and so does a block larger than any store
    sampler = mmap_ninja.QuasiRandomSampler(store, 4, seed=-1, block_bytes=2 ** 70)
    sampler.set_epoch(-2)
    assert sampler.seed == -1 and sampler.epoch == -2 and len(sampler.blocks) == 2
    assert sorted(i for batch in sampler for i in batch) == list(range(10))
    same = mmap_ninja.QuasiRandomSampler(store, 4, seed=2 ** 64 - 1, block_bytes=1 << 62)
    same.set_epoch(2 ** 64 - 2)
    assert list(same) == list(sampler)
    with pytest.raises(ValueError, match="^num_shards must be a positive integer, got 0"):
        ShardedMmap.from_indexable(tmp_path / "shards", ["a"], 0)


def test_prefetch_reaches_a_wrapped_store(tmp_path, monkeypatch):
    asked = []
    for store in (StringsMmap.from_strings(tmp_path / "s", ["ab", "cd"]),
                  RaggedMmap.from_lists(tmp_path / "r", [np.arange(3), np.arange(2)])):
        monkeypatch.setattr(type(store), "prefetch", lambda self, idx: asked.append((self.out_dir, list(idx))))
        mmap_ninja._prefetch(Wrapped(store, len), [1, 0])
    assert asked == [(str(tmp_path / "s"), [1, 0]), (str(tmp_path / "r"), [1, 0])]


def _ddp_rank(rank, world_size, init_method, store_path, out):
    """One rank of test_ddp_ranks_split_each_epoch (module level: torch spawns it by name)."""
    import datetime
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        store = ShardedMmap(store_path)
        sampler = mmap_ninja.QuasiRandomSampler(store, 16, rank=dist.get_rank(), world_size=dist.get_world_size())
        epochs = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            mine = [i for batch in sampler for i in batch]
            gathered = [None] * world_size
            dist.all_gather_object(gathered, mine)
            epochs.append(gathered)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(epochs, f)
    finally:
        dist.destroy_process_group()


@needs_torch
def test_ddp_ranks_split_each_epoch(tmp_path):
    """Two gloo ranks on this machine, each with a QuasiRandomSampler over one ShardedMmap."""
    import torch.multiprocessing
    ShardedMmap.from_indexable(tmp_path / "shards", [np.full(300, k, np.int32) for k in range(999)], 3)
    out = tmp_path / "epochs.json"
    torch.multiprocessing.spawn(_ddp_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "shards"),
                                                 str(out)), nprocs=2, join=True)
    epochs = json.loads(out.read_text())
    for ranks in epochs:
        a, b = map(set, ranks)
        assert len(ranks[0]) == len(ranks[1]) == 500  # ceil(999 / 2): one index repeated
        assert a | b == set(range(999)) and len(a & b) <= 1
    assert epochs[0] != epochs[1]  # set_epoch: another order


@needs_torch
def test_readme_torchrun_recipe(tmp_path):
    code = readme_block("import torch\nimport torch.distributed as dist")
    (tmp_path / "train.py").write_text(code)
    ShardedMmap.from_indexable(tmp_path / "tokens-sharded", [np.arange(k % 50 + 1) for k in range(1000)], 4)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    import re  # (the two ranks print to one stdout: their lines may run together)
    found = sorted(re.findall(r"rank (\d) epoch (\d): (\d+) samples", result.stdout))
    assert found == [(str(r), str(e), "500") for r in (0, 1) for e in (0, 1)]


@needs_torch
def test_readme_pytorch_example_with_spawned_workers(tmp_path):
    code = readme_block("import torch\nfrom torch.utils.data")
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", str(script)], cwd=tmp_path,
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(HERE)),
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("torch.Size([2, ") for line in lines)
    lengths = sorted(n for line in lines for n in json.loads(line.split("]) ")[1]))
    assert lengths == [2, 3, 5, 9]


@needs_torch
def test_torch_from_numpy_gets_writable_samples(tmp_path):
    import warnings
    import torch
    RaggedMmap.from_lists(tmp_path / "r", [np.arange(3.0), np.ones((2, 2))])
    np_ninja.from_ndarray(tmp_path / "n", np.arange(6.0).reshape(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The given NumPy array is not writable" would fail here
        assert RaggedMmap(tmp_path / "r", wrapper_fn=torch.from_numpy)[1].sum().item() == 4
        assert open_existing(tmp_path / "n", wrapper_fn=torch.from_numpy)[2].tolist() == [4, 5]
        assert Wrapped(RaggedMmap(tmp_path / "r"), torch.from_numpy)[0].tolist() == [0, 1, 2]


def test_quasi_random_over_large_rows_and_tiny_stores(tmp_path):
    """Windows can be empty (rows larger than a block, fewer rows than ranks): every kind
    still yields each sample once per epoch, and prefetching an empty window does nothing."""
    big = np_ninja.from_ndarray(tmp_path / "big", np.zeros((16, 256, 1024), np.float32))  # 1 MB rows
    tiny = np_ninja.from_ndarray(tmp_path / "tiny", np.zeros((3, 2), np.int8))
    for store in (big, tiny):
        sampler = mmap_ninja.QuasiRandomSampler(store, batch_size=4, block_bytes=1 << 16)
        seen = [i for batch in sampler for i in batch]
        assert sorted(seen) == list(range(len(store)))
    ranks = [list(mmap_ninja.QuasiRandomSampler(tiny, batch_size=1, world_size=5, rank=r)) for r in range(5)]
    assert all(len(batches) == 1 for batches in ranks)  # padded to 5 rank slots, as DistributedSampler


# ---------------------------------------------------------------------------------------------
# Command line: python -m mmap_ninja info|verify|from-npy|from-lines
# ---------------------------------------------------------------------------------------------

def test_cli_help_info_verify(tmp_path):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("info", "verify", "from-npy", "from-lines"):
        assert command in result.stdout
    RaggedMmap.from_lists(tmp_path / "r", [np.ones((2, 3)), np.ones((4, 1))])
    info = cli("info", tmp_path / "r")
    assert info.returncode == 0
    assert "kind:     ragged" in info.stdout and "samples:  2" in info.stdout
    assert "2-D axis 0: min 2, max 4" in info.stdout and "2-D axis 1: min 1, max 3" in info.stdout
    assert cli("verify", tmp_path / "r").stdout.strip().endswith(": ok")
    (tmp_path / "r" / "flattened_shapes" / "data.ninja").write_bytes(np.array([6, 5], "<i8").tobytes())
    bad = cli("verify", tmp_path / "r")
    assert bad.returncode == 1 and "UNSOUND" in bad.stdout and "flattened_shapes disagrees" in bad.stdout
    missing = cli("info", tmp_path / "nothing")
    assert missing.returncode == 2 and "error:" in missing.stderr and "does not exist" in missing.stderr
    for version in ("0.8.2", "0.9.0"):
        for name in sorted(os.listdir(LEGACY / version)):
            if (LEGACY / version / name).is_dir():
                assert cli("verify", LEGACY / version / name).returncode == 0, name


def test_cli_from_npy_and_from_lines(tmp_path):
    arr = np.arange(30, dtype=">i4").reshape(10, 3)
    np.save(tmp_path / "a.npy", arr)
    result = cli("from-npy", tmp_path / "a.npy", tmp_path / "n", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    out = np_ninja.open_existing(tmp_path / "n")
    assert out.dtype == np.dtype(">i4")
    np.testing.assert_array_equal(out, arr)
    (tmp_path / "lines.txt").write_text("one\ntwo ü\n\nfour\n", encoding="utf-8")
    result = cli("from-lines", tmp_path / "lines.txt", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    assert list(StringsMmap(tmp_path / "s")) == ["one", "two ü", "", "four"]
    assert "compression: none" in cli("info", tmp_path / "s").stdout


VERIFY_DAMAGES = {
    "emptied ragged shape.ninja": ("ragged", lambda d: (d / "shape.ninja").write_bytes(b"")),
    "count 2**35": ("ragged", lambda d: (d / "starts" / "shape.ninja").write_bytes(np.array([2**35], "<u8").tobytes())),
    "count 2**64-1": ("ragged", lambda d: (d / "starts" / "shape.ninja").write_bytes(b"\xff" * 8)),
    "end 2**64-1": ("ragged", lambda d: write_int64(d / "ends" / "data.ninja", 1, -1)),
    "S0 dtype": ("ragged", lambda d: (d / "dtype.ninja").write_text("S0")),
    "element count overflow": ("numpy", lambda d: (d / "shape.ninja").write_bytes(np.array([2**40, 2**40], "<u8").tobytes())),
    "strings start -1": ("strings", lambda d: write_int64(d / "starts" / "data.ninja", 0, -1)),
    "flat shape -1": ("ragged", lambda d: write_int64(d / "shapes" / "data.ninja", 1, -1)),
    "flat shape 2**62": ("ragged", lambda d: write_int64(d / "shapes" / "data.ninja", 1, 2**62)),
    "numpy data is a directory": ("numpy", lambda d: ((d / "data.ninja").unlink(), (d / "data.ninja").mkdir())),
    "emptied numpy shape.ninja": ("numpy", lambda d: (d / "shape.ninja").write_bytes(b"")),
    "nested shape overflow": ("nested", lambda d: write_int64(d / "shapes" / "data.ninja", 2, 2**62)),
}


@pytest.mark.parametrize("damage", list(VERIFY_DAMAGES))
def test_verify_reports_damage_and_never_crashes(damage, tmp_path):
    kind, harm = VERIFY_DAMAGES[damage]
    d = tmp_path / "s"
    if kind == "nested":
        RaggedMmap.from_lists(d, [np.ones((2, 2)), np.ones((1, 3))])
    else:
        make_store(kind, d) if kind != "ragged" else RaggedMmap.from_lists(d, [np.arange(3), np.arange(2)])
    assert mmap_ninja._verify(str(d)) == []
    harm(d)
    problems = mmap_ninja._verify(str(d))
    assert problems and all(isinstance(p, str) and str(d) in p for p in problems), problems
    assert not any("cannot be checked" in p for p in problems), problems  # each damage is named
    with pytest.raises((ValueError, OSError)) as raised:
        list(open_existing(d))
    assert str(d) in str(raised.value)


def test_info_on_a_store_with_scalars(tmp_path):
    RaggedMmap.from_lists(tmp_path / "tokens", [np.array([1, 2, 3]), np.array([4]), np.array(5)])
    info = cli("info", tmp_path / "tokens")
    assert info.returncode == 0, info.stderr
    assert "ndim:     0, 1" in info.stdout and "1-D axis 0: min 1, max 3" in info.stdout


def test_version_matches_pyproject():
    text = (HERE / "pyproject.toml").read_text()
    assert f'version = "{mmap_ninja.__version__}"' in text
    assert mmap_ninja.__version_info__ == tuple(int(x) for x in mmap_ninja.__version__.split("."))


def test_running_the_file_directly(tmp_path):
    result = subprocess.run([sys.executable, str(HERE / "mmap_ninja.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "verify" in result.stdout


def test_cli_from_lines_ends_lines_at_newlines_only(tmp_path):
    """A stray carriage return inside a line stays in its string: only \\n (or \\r\\n) ends a
    line, so strings stay aligned with parallel files of labels."""
    text = tmp_path / "lines.txt"
    text.write_bytes(b"first line\rwith a stray CR\nsecond line\r\nthird\n\nlast without newline")
    assert cli("from-lines", text, tmp_path / "s").returncode == 0
    assert StringsMmap(tmp_path / "s")[:] == ["first line\rwith a stray CR", "second line", "third", "",
                                               "last without newline"]


# ---------------------------------------------------------------------------------------------
# Import shims: the published package's submodules and helpers, served from this one file
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("statement, check", [
    ("import mmap_ninja.numpy", "mmap_ninja.numpy.from_ndarray is mmap_ninja.np_from_ndarray"),
    ("from mmap_ninja import numpy as np_ninja", "np_ninja.open_existing is mmap_ninja.np_open_existing"),
    ("from mmap_ninja.numpy import from_ndarray", "from_ndarray is mmap_ninja.np_from_ndarray"),
    ("from mmap_ninja.ragged import RaggedMmap", "RaggedMmap is mmap_ninja.RaggedMmap"),
    ("from mmap_ninja.string import StringsMmap", "StringsMmap is mmap_ninja.StringsMmap"),
    ("from mmap_ninja.base import Wrapped", "Wrapped is mmap_ninja.Wrapped"),
    ("from mmap_ninja.generic import open_existing", "open_existing is mmap_ninja.open_existing"),
    ("import mmap_ninja.parallel", "mmap_ninja.parallel.ParallelBatchCollector is mmap_ninja.ParallelBatchCollector"),
    ("from mmap_ninja.generic import RaggedMmap, StringsMmap, Wrapped",  # (names the published generic imports)
     "(RaggedMmap, StringsMmap, Wrapped) == (mmap_ninja.RaggedMmap, mmap_ninja.StringsMmap, mmap_ninja.Wrapped)"),
    ("from mmap_ninja.base import ParallelBatchCollector", "ParallelBatchCollector is mmap_ninja.ParallelBatchCollector"),
    ("from mmap_ninja.base import from_generator_base, _int_to_bytes", "_int_to_bytes(1) == bytes([1, 0, 0, 0])"),
    ("from mmap_ninja import RaggedMmap, StringsMmap, Wrapped, open_existing",
     "RaggedMmap.__module__ == 'mmap_ninja' and open_existing.__name__ == 'open_existing'"),
])
def test_import_paths_work_as_first_import(statement, check):
    result = run_python(f"{statement}\nimport mmap_ninja\nassert {check}\nprint('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_star_import_keeps_users_numpy():
    result = run_python("""
        import numpy
        from mmap_ninja import *
        assert numpy.__name__ == 'numpy', numpy
        assert RaggedMmap and np_from_ndarray and open_existing
        print('ok')""")
    assert result.returncode == 0, result.stderr


def test_vendored_copy_registers_its_own_names(tmp_path):
    vendor = tmp_path / "myproj" / "_vendor"
    vendor.mkdir(parents=True)
    (tmp_path / "myproj" / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")
    (vendor / "mmap_ninja.py").write_bytes((HERE / "mmap_ninja.py").read_bytes())
    result = run_python("""
        import sys
        from myproj._vendor.mmap_ninja.ragged import RaggedMmap
        import myproj._vendor.mmap_ninja as m
        assert RaggedMmap is m.RaggedMmap
        assert 'mmap_ninja.ragged' not in sys.modules and 'mmap_ninja' not in sys.modules
        print('ok')""", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr


def test_reload_is_safe():
    result = run_python("""
        import importlib, sys, mmap_ninja
        shim = sys.modules["mmap_ninja.numpy"]
        importlib.reload(mmap_ninja)
        assert sys.modules["mmap_ninja.numpy"] is shim
        assert shim.from_ndarray is mmap_ninja.np_from_ndarray
        from mmap_ninja.ragged import RaggedMmap
        assert RaggedMmap is mmap_ninja.RaggedMmap
        print('ok')""")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_published_base_helpers_keep_their_byte_formats(tmp_path):
    base = mmap_ninja.base
    assert base._int_to_bytes(17) == b"\x11\x00\x00\x00" and base._bytes_to_int(b"\x11\x00\x00\x00") == 17
    assert base._bytes_to_int(base._int_to_bytes(6653643750000, fmt="<Q"), fmt="<Q") == 6653643750000
    assert base._str_to_bytes("ünï") == "ünï".encode() and base._bytes_to_str(b"\xc3\xbc") == "ü"
    assert base._shape_to_bytes((1, 4, 5)) == np.array([1, 4, 5], "<u8").tobytes()
    assert base._bytes_to_shape(np.array([1, 4, 5], "<u8").tobytes()) == (1, 4, 5)
    assert base._bytes_to_shape(b"") == () and base._shape_to_bytes(()) == b""
    for kind, value, raw in (("int", 300, b"\x2c\x01\x00\x00"), ("str", "numpy", b"numpy"),
                             ("shape", (2, 3), np.array([2, 3], "<u8").tobytes())):
        path = tmp_path / kind
        getattr(base, f"_{kind}_to_file")(value, path)
        assert path.read_bytes() == raw and getattr(base, f"_file_to_{kind}")(path) == value
    assert np_ninja._empty is np_ninja.empty


def test_published_generator_and_indexable_base(tmp_path):
    base = mmap_ninja.base
    samples = [np.arange(i) for i in range(7)]
    first = base.from_generator_base(tmp_path / "g", iter(samples), 3, RaggedMmap.from_lists)
    assert isinstance(first, RaggedMmap) and len(first) == 7  # the store the first batch made
    assert_same_samples(RaggedMmap(tmp_path / "g"), samples)
    extended = []
    base.from_indexable_base(tmp_path / "i", samples, 2, RaggedMmap.from_lists,
                             extend_fn=lambda store, batch: extended.append(len(batch)) or store.extend(batch),
                             n_jobs=2)
    assert extended == [2, 2, 1] and len(RaggedMmap(tmp_path / "i")) == 7
    assert base.from_generator_base(tmp_path / "e", iter([]), 3, RaggedMmap.from_lists) is None


def test_published_attributes_are_arrays_over_the_store(tmp_path):
    flat = RaggedMmap.from_lists(tmp_path / "f", [np.arange(3, dtype=np.int16), np.array(7, np.int16), np.arange(2, dtype=np.int16)])
    assert flat.starts.tolist() == [0, 3, 4] and flat.ends.tolist() == [3, 4, 6]
    assert flat.starts.dtype == np.int64 and not flat.starts.flags.writeable
    assert (flat.ends - flat.starts).tolist() == flat.flattened_shapes.tolist() == [3, 1, 2]
    assert flat.shapes.tolist() == [[3], [0], [2]] and flat.shapes_are_flat and flat.n == 3
    assert flat.memmap.tolist() == [0, 1, 2, 7, 0, 1] and flat.memmap.dtype == np.int16
    assert flat.range.tolist() == [0, 1, 2]
    flat.append(np.ones((2, 2), np.int16))  # the store becomes nested: shapes is a RaggedMmap
    assert not flat.shapes_are_flat and flat.n == 4 and flat.ends.tolist() == [3, 4, 6, 10]
    assert isinstance(flat.shapes, RaggedMmap) and [s.tolist() for s in flat.shapes] == [[3], [], [2], [2, 2]]
    strings = StringsMmap.from_strings(tmp_path / "s", ["ab", "ü", ""])
    assert strings.starts.tolist() == [0, 2, 4] and strings.ends.tolist() == [2, 4, 4]  # bytes


def test_get_set_single_and_multiple(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(3), np.arange(4).reshape(2, 2), np.arange(2)])
    assert store.get_single(1).tolist() == [[0, 1], [2, 3]]
    assert [s.tolist() for s in store.get_multiple([2, 0])] == [[0, 1], [0, 1, 2]]
    store.set_single(idx=0, value=[5, 5, 5])  # (the published argument names)
    store.set_multiple(item=slice(1, 3), value=[np.full((2, 2), 6), [7, 7]])
    assert [s.tolist() for s in RaggedMmap(tmp_path / "r")] == [[5, 5, 5], [[6, 6], [6, 6]], [7, 7]]
    strings = StringsMmap.from_strings(tmp_path / "s", ["abc", "de"])
    strings.set_single(idx=0, new_value="xyz")
    strings.set_multiple(key=[1], value=["fg"])
    assert strings.get_multiple(slice(None)) == ["xyz", "fg"] and strings.get_single(-1) == "fg"


def test_published_argument_names(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "r", [np.arange(2)])
    store.append(array=np.arange(3))
    store.extend(arrays=[np.arange(4)])
    assert [len(s) for s in RaggedMmap(tmp_path / "r")] == [2, 3, 4]
    m = np_ninja.from_ndarray(tmp_path / "n", np.arange(2))
    np_ninja.append(np_mmap=m, arr=2)
    np_ninja.extend(np_mmap=m, arr=[3])
    np_ninja.extend_dir(out_dir=tmp_path / "n", arr=[4])
    assert np_ninja.open_existing(out_dir=tmp_path / "n", mode="r").tolist() == [0, 1, 2, 3, 4]
    strings = StringsMmap.from_strings(out_dir=tmp_path / "s", strings=["a"])
    strings.append(string="b")
    strings.extend(list_of_strings=["c"])
    assert list(StringsMmap(out_dir=tmp_path / "s")) == ["a", "b", "c"]


def test_key_arguments_in_the_published_positions(tmp_path):
    RaggedMmap.from_lists(tmp_path / "r", [np.arange(2)], None, "r+", None, "starts", "ends", "shapes", "flattened_shapes")
    store = RaggedMmap(tmp_path / "r", None, "r", "starts", "ends", "shapes", "flattened_shapes", True)
    assert store[0].tolist() == [0, 1]
    StringsMmap.from_strings(tmp_path / "s", ["a"], "r+b", "starts", "ends", False)
    assert StringsMmap(tmp_path / "s", "r+b", "starts", "ends")[0] == "a"
    with pytest.raises(ValueError, match=r"RaggedMmap: starts_key='begin' is not supported: stores use "
                                         r"the format's standard names only \(starts_key='starts'\)"):
        RaggedMmap(tmp_path / "r", starts_key="begin")
    with pytest.raises(ValueError, match="ends_key='stop' is not supported"):
        StringsMmap.from_strings(tmp_path / "t", ["a"], ends_key="stop")
    with pytest.raises(TypeError, match=r"RaggedMmap.from_generator\(\) got an unexpected keyword argument 'batchsize'"):
        RaggedMmap.from_generator(tmp_path / "g", iter([np.zeros(1)]), 2, batchsize=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'zstd_lvl'"):
        StringsMmap.from_strings(tmp_path / "z", ["a"], zstd_lvl=3)
    assert not (tmp_path / "t").exists() and not (tmp_path / "z").exists() and not (tmp_path / "g").exists()


def test_parallel_shim(tmp_path):
    from mmap_ninja.parallel import ParallelBatchCollector, make_indexable
    batches = list(ParallelBatchCollector(make_indexable(lambda i: i * i, 5), 2, n_jobs=2).batches())
    assert batches == [[0, 1], [4, 9], [16]]
    unbounded = make_indexable(lambda i: [10, 20, 30][i])  # no length: read until IndexError
    assert list(ParallelBatchCollector(unbounded, 2).batches()) == [[10, 20], [30]]
    for source, expected in ((unbounded, [[10, 20], [30]]), (make_indexable(lambda i: i, 4), [[0, 1], [2, 3]])):
        collector, got = ParallelBatchCollector(source, 2), []  # the published loop
        while not collector.exhausted():
            got.append(collector.collect_batch())
        assert got == expected and collector.collect_batch() == [] and collector.exhausted()
    store = RaggedMmap.from_indexable(tmp_path / "r", make_indexable(lambda i: np.arange(i), 4), 3)
    assert [len(s) for s in store] == [0, 1, 2, 3]


LEGACY_PACKAGES = [p for p in os.environ.get("MMAP_NINJA_LEGACY_PATHS", "").split(";") if p]  # PYTHONPATHs


@pytest.mark.skipif(not LEGACY_PACKAGES, reason="set MMAP_NINJA_LEGACY_PATHS to installs of the "
                                                "published package (.ci/run does)")
@pytest.mark.parametrize("legacy_path", LEGACY_PACKAGES)
def test_published_package_reads_and_appends_our_stores(legacy_path, tmp_path):
    np_ninja.from_ndarray(tmp_path / "n", np.arange(12, dtype=">f4").reshape(4, 3))
    RaggedMmap.from_lists(tmp_path / "r", [np.arange(3), np.arange(6).reshape(2, 3), np.array(7)])
    RaggedMmap.from_lists(tmp_path / "flat", [np.arange(3), np.array([], np.int64)])
    StringsMmap.from_strings(tmp_path / "s", ["a", "", "ünï"])
    if HAS_ZSTD:
        StringsMmap.from_strings(tmp_path / "z", ["zstd ü"] * 20, zstd_level=3, zstd_train_dictionary_size=256)
    # empty stores: their data files hold one byte, which the published readers need to map them
    RaggedMmap.from_lists(tmp_path / "r0", [])
    RaggedMmap.from_lists(tmp_path / "re", [np.zeros(0, np.int64), np.zeros(0, np.int64)])
    StringsMmap.from_strings(tmp_path / "s0", [])
    StringsMmap.from_strings(tmp_path / "se", ["", ""])
    np_ninja.from_ndarray(tmp_path / "n0", np.zeros((0, 3), np.int64))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import numpy as np, mmap_ninja
        assert mmap_ninja.__file__.startswith({legacy_path.split(os.pathsep)[0]!r}), mmap_ninja.__file__
        from mmap_ninja import numpy as nn
        from mmap_ninja.ragged import RaggedMmap
        from mmap_ninja.string import StringsMmap
        d = {str(tmp_path)!r}
        m = nn.open_existing(d + '/n')
        assert m.dtype == np.dtype('>f4') and m.tolist() == np.arange(12).reshape(4, 3).tolist()
        nn.extend_dir(d + '/n', np.ones((1, 3), '>f4'))
        r = RaggedMmap(d + '/r')
        assert [x.tolist() for x in r] == [[0, 1, 2], [[0, 1, 2], [3, 4, 5]], 7], [x for x in r]
        r.append(np.arange(4).reshape(2, 2))
        f = RaggedMmap(d + '/flat')
        f.append(np.array([5, 6]))
        s = StringsMmap(d + '/s')
        assert list(s) == ['a', '', 'ünï']
        s.append('old')
        assert [len(RaggedMmap(d + '/r0')), len(StringsMmap(d + '/s0'))] == [0, 0]
        assert [x.tolist() for x in RaggedMmap(d + '/re')] == [[], []] and list(StringsMmap(d + '/se')) == ['', '']
        assert nn.open_existing(d + '/n0').shape == (0, 3)
        nn.from_ndarray(d + '/pn0', np.zeros((0, 2), np.int64))  # the published package's own empty stores
        RaggedMmap.from_lists(d + '/pre', [np.zeros(0, np.int64)])
        import os, importlib.metadata, importlib.util
        if os.path.exists(d + '/z') and importlib.metadata.version('mmap_ninja') >= '0.9' \
                and importlib.util.find_spec('zstandard'):
            assert list(StringsMmap(d + '/z')) == ['zstd ü'] * 20
        print('ok')""")], env=dict(os.environ, PYTHONPATH=legacy_path), capture_output=True, text=True,
        cwd=tmp_path)  # (from the repository's directory, this module would shadow the published one)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np_ninja.open_existing(tmp_path / "n")[-1], [1, 1, 1])
    assert RaggedMmap(tmp_path / "r")[-1].tolist() == [[0, 1], [2, 3]]
    assert [x.tolist() for x in RaggedMmap(tmp_path / "flat")] == [[0, 1, 2], [], [5, 6]]
    assert list(StringsMmap(tmp_path / "s")) == ["a", "", "ünï", "old"]
    assert mmap_ninja._verify(str(tmp_path / "r")) == []
    np_ninja.extend_dir(tmp_path / "pn0", np.array([[5, 6]]))  # we append to its empty stores
    assert np_ninja.open_existing(tmp_path / "pn0").tolist() == [[5, 6]]
    RaggedMmap(tmp_path / "pre").append(np.array([7, 8]))
    assert [x.tolist() for x in RaggedMmap(tmp_path / "pre")] == [[], [7, 8]]
    assert all(mmap_ninja._verify(str(tmp_path / name)) == [] for name in ("pn0", "pre", "r0", "re", "s0", "se", "n0"))


ORIGINAL_TESTS = os.environ.get("MMAP_NINJA_ORIGINAL_TESTS", "")


@pytest.mark.skipif(not ORIGINAL_TESTS, reason="set MMAP_NINJA_ORIGINAL_TESTS to the published 0.8.2 "
                                               "sdist's tests/ directory (.ci/run does)")
def test_original_test_suite_passes_unmodified(tmp_path):
    """The published package's own tests (downloaded by .ci/run, never copied here), run as a
    user switching over would: only this file on the path as mmap_ninja."""
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "mmap_ninja.py").symlink_to(HERE / "mmap_ninja.py")
    path = os.pathsep.join([str(tmp_path / "single")] + os.environ.get("MMAP_NINJA_ORIGINAL_TEST_DEPS", "").split(";"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", ORIGINAL_TESTS,
                             f"--basetemp={tmp_path / 'base'}", f"--rootdir={ORIGINAL_TESTS}"],
                            cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "56 passed" in result.stdout, result.stdout[-500:]


LEGACY_WHEELS = os.environ.get("MMAP_NINJA_LEGACY_WHEELS", "")


@pytest.mark.skipif(not LEGACY_WHEELS, reason="set MMAP_NINJA_LEGACY_WHEELS to a directory holding the "
                                              "published mmap_ninja 0.8.2 wheel (.ci/run does)")
def test_installs_replace_each_other_in_a_fresh_venv(tmp_path):
    """pip sees this distribution and the published one as the same project (mmap_ninja), so
    installing either uninstalls the other: neither can silently shadow the other."""
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "-w", str(wheels), str(HERE)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = tmp_path / "deps"  # numpy (and tqdm) from this interpreter, nothing else
    deps.mkdir()
    for name in ("numpy", "numpy.libs", "tqdm"):
        spec = next((pathlib.Path(p) / name for p in sys.path if (pathlib.Path(p) / name).is_dir()), None)
        if spec is not None:
            (deps / name).symlink_to(spec)
    pathlib.Path(site, "deps.pth").write_text(str(deps))

    def pip(*args):
        result = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index",
                                 "--find-links", str(wheels), "--find-links", LEGACY_WHEELS, *args],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def which():
        code = ("import importlib.metadata as m, importlib.util as u; "
                "print(m.version('mmap_ninja'), u.find_spec('mmap_ninja').origin)")  # (imports nothing)
        return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                              cwd=tmp_path).stdout.split()

    assert "Successfully installed mmap_ninja-1.0.0" in pip("mmap_ninja==1.0.0").replace("mmap-ninja", "mmap_ninja")
    assert which()[0] == "1.0.0"
    command = venv / "bin" / "mmap-ninja"
    assert subprocess.run([str(command), "--help"], capture_output=True, cwd=tmp_path).returncode == 0
    out = pip("mmap_ninja==0.8.2").replace("mmap-ninja", "mmap_ninja")
    assert "Successfully uninstalled mmap_ninja-1.0.0" in out  # said aloud, not silently shadowed
    assert which() == ["0.8.2", str(pathlib.Path(site, "mmap_ninja", "__init__.py"))] and not command.exists()
    assert not pathlib.Path(site, "mmap_ninja.py").exists()
    out = pip("mmap_ninja==1.0.0").replace("mmap-ninja", "mmap_ninja")
    assert "Successfully uninstalled mmap_ninja-0.8.2" in out
    assert which() == ["1.0.0", str(pathlib.Path(site, "mmap_ninja.py"))] and not pathlib.Path(site, "mmap_ninja").exists()
    assert subprocess.run([str(command), "--help"], capture_output=True, cwd=tmp_path).returncode == 0


# ---------------------------------------------------------------------------------------------
# The README's quick start runs as written
# ---------------------------------------------------------------------------------------------

def test_readme_quick_start(tmp_path):
    code = readme_block("import numpy as np\nfrom mmap_ninja import RaggedMmap, StringsMmap")
    code = code[:code.index("EOF")]
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = [line.split("# ")[1] for line in code.splitlines() if line.startswith("print(")]
    assert result.stdout.splitlines() == expected


@pytest.mark.parametrize("text", ['{"num_shards": 10000000, "length": 6, "kind": "ragged"}',
                                  '{"num_shards": 0, "length": 6, "kind": "ragged", "bounds": [0, 3, 6]}',
                                  '{"num_shards": -3, "length": 6, "kind": "ragged", "bounds": [0, 3, 6]}',
                                  '{"num_shards": 2, "length": 6, "kind": "ragged", "bounds": [0, 4, 3, 6]}',
                                  '{"num_shards": 2, "length": 6, "kind": "ragged", "bounds": [1, 3, 6]}',
                                  '{"num_shards": 2, "length": 6, "kind": "pickle", "bounds": [0, 3, 6]}',
                                  '{"num_shards": 2.0, "length": 6, "kind": "ragged", "bounds": [0, 3, 6]}',
                                  '{"num_shards": 2, "length": true, "kind": "ragged", "bounds": [0, 3, 6]}',
                                  '{}', '[1, 2]', 'not json', '{"num_shards": ' + '9' * 5000 + '}', '[' * 30000])
def test_a_damaged_shard_layout_is_refused_naming_its_file(text, tmp_path):
    """shards.json is read before anything else: a hostile one (a trillion shards, none, bounds
    that do not run from 0 to length) must not build names without end, nor read as an empty
    dataset, nor raise a bare KeyError; a rerun of the conversion refuses it the same way."""
    items = [np.arange(k + 1) for k in range(6)]
    out = tmp_path / "out"
    with ThreadPoolExecutor(2) as pool:
        ShardedMmap.from_indexable(out, items, 2, executor=pool)
        (out / "shards.json").write_text(text)
        before = snapshot(out)
        expected = f"{out / 'shards.json'} is damaged: it is not the layout ShardedMmap.from_indexable records"
        with pytest.raises(ValueError, match=expected):
            ShardedMmap(out)
        with pytest.raises(ValueError, match=expected):
            ShardedMmap.from_indexable(out, items, 2, executor=pool)
    assert snapshot(out) == before


def test_a_conversion_never_builds_a_shard_through_a_symlink(tmp_path):
    """A shard directory that is a link (planted, or left by a copy) would have the shard built
    at the link's target, outside out_dir, replacing the format files found there."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.ninja").write_text("someone else's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "shards.json").write_text(json.dumps({"num_shards": 2, "length": 6, "kind": "ragged", "bounds": [0, 3, 6]}))
    os.symlink(victim, out / "shard-0-of-2")
    items = [np.arange(k + 1) for k in range(6)]
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(PermissionError, match=f"{out / 'shard-0-of-2'} is a symbolic link: a conversion "
                                                  f"writes its shards inside {out} only; remove the link"):
            ShardedMmap.from_indexable(out, items, 2, executor=pool)
        assert sorted(os.listdir(victim)) == ["data.ninja"] and (victim / "data.ninja").read_text() == "someone else's file"
        os.unlink(out / "shard-0-of-2")  # (without the link, the rerun finishes)
        assert_same_samples(ShardedMmap.from_indexable(out, items, 2, executor=pool), items)


@pytest.mark.parametrize("kind", ["ragged", "strings", "numpy"])
def test_a_copy_in_progress_is_refused_not_read_empty_nor_cleared(kind, tmp_path):
    """A store copied file by file, type.ninja not there yet and the sample count still empty,
    used to read as an empty store, and the next append cleared its data to start afresh."""
    d = tmp_path / "s"
    if kind == "ragged":
        RaggedMmap.from_lists(d, [np.arange(1000) for _ in range(5)])
    elif kind == "strings":
        StringsMmap.from_strings(d, ["some text"] * 1000)
    else:
        np_ninja.from_ndarray(d, np.arange(5000))
    cls, sample = (StringsMmap, "new") if kind == "strings" else (RaggedMmap, np.arange(3))
    opened = cls(d) if kind != "numpy" else None  # (before the copy: its next append re-reads the disk)
    os.remove(d / "type.ninja")
    if kind != "numpy":
        (d / "starts" / "shape.ninja").write_bytes(b"")  # (created, not yet written)
    before = snapshot(d)
    size = (d / "data.ninja").stat().st_size
    expected = (f"{d}: type.ninja is missing, but the directory holds {size} bytes of data in data.ninja: the store "
                f"is damaged, or not completely copied \\(finish the copy\\)")
    for attempt in (lambda: cls(d), lambda: (opened or cls(d)).append(sample), lambda: cls(d).extend([sample])):
        with pytest.raises(ValueError, match=expected):
            attempt()
    assert snapshot(d) == before


def test_a_sharded_parent_refuses_a_shard_without_type_ninja(tmp_path):
    """Without a layout, a parent's shards are its store subdirectories: one whose type.ninja
    is missing (an incomplete copy) used to be left out, so 20 of 30 samples read silently."""
    for k in range(3):
        RaggedMmap.from_lists(tmp_path / f"part{k}", [np.arange(4)] * 10)
    (tmp_path / "logs").mkdir()  # (a directory that is no store at all is not a shard)
    (tmp_path / "logs" / "run.txt").write_text("x")
    assert len(ShardedMmap(tmp_path)) == 30
    os.remove(tmp_path / "part1" / "type.ninja")
    with pytest.raises(ValueError, match=f"{tmp_path / 'part1'}: type.ninja is missing, but the directory holds 10 samples: .*"
                                         f"restore {tmp_path / 'part1' / 'type.ninja'} \\(its kind: ragged, string or numpy\\)"):
        ShardedMmap(tmp_path)


@pytest.mark.parametrize("kind", ["ragged", "strings", "numpy"])
def test_appends_refuse_files_with_other_hard_links(kind, tmp_path):
    """Appends write in place, so through a hard link they would change another copy (cp -al,
    rsync --link-dest) or a file outside the store: refused, and nothing changes."""
    d = tmp_path / "s"
    if kind == "ragged":
        store, sample = RaggedMmap.from_lists(d, [np.arange(4, dtype=np.uint8)]), np.arange(3, dtype=np.uint8)
    elif kind == "strings":
        store, sample = StringsMmap.from_strings(d, ["abcd"]), "xyz"
    else:
        store, sample = np_ninja.from_ndarray(d, np.arange(4, dtype=np.uint8)), None
    os.link(d / "data.ninja", tmp_path / "backup-of-data.ninja")
    before = snapshot(tmp_path)
    with pytest.raises(PermissionError, match=f"{d / 'data.ninja'} has 2 hard links .*: writing to it would change "
                                              f"the other copies too; give the store files of its own"):
        if kind == "numpy":
            np_ninja.extend_dir(d, np.arange(2, dtype=np.uint8))
        else:
            store.append(sample)
    assert snapshot(tmp_path) == before
    os.unlink(tmp_path / "backup-of-data.ninja")  # (with the store's own files, the append goes through)
    if kind == "numpy":
        np_ninja.extend_dir(d, np.arange(2, dtype=np.uint8))
        assert np_ninja.open_existing(d).tolist() == [0, 1, 2, 3, 0, 1]
    else:
        store.append(sample)
        assert len(open_existing(d)) == 2


def test_verify_says_how_a_killed_conversion_to_nested_shapes_is_finished(tmp_path):
    d = tmp_path / "r"
    RaggedMmap.from_lists(d, [np.arange(3)]).append(np.ones((2, 2)))  # shapes/ converted to nested
    (d / "shapes_are_flat.ninja").write_bytes(np.int32(1).tobytes())  # the flag a kill left unset
    assert [s.shape for s in RaggedMmap(d)] == [(3,), (2, 2)]
    assert mmap_ninja._verify(str(d)) == [
        f"{d}: shapes_are_flat.ninja says {np.int32(1).tobytes()!r} but shapes/ is ragged: a writer was "
        f"killed while converting shapes/ (this module reads the store; the published package reads it "
        f"by the flag); the next append finishes the conversion"]
    RaggedMmap(d).append(np.arange(2))
    assert mmap_ninja._verify(str(d)) == [] and (d / "shapes_are_flat.ninja").read_bytes() == np.int32(0).tobytes()


@pytest.mark.parametrize("part", ["shape.ninja", "flattened_shapes/data.ninja", "ends/data.ninja", "ends/shape.ninja",
                                  "starts/data.ninja", "shapes/starts/shape.ninja", "shapes/ends/data.ninja"])
@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_an_append_refused_for_a_linked_part_writes_nothing(part, link, tmp_path):
    """Every file an append writes is opened (and refused, if linked) before any is written:
    data is written first, so a link found at a later part left it and a length changed."""
    d, outside = tmp_path / "s", tmp_path / "outside"
    RaggedMmap.from_lists(d, [np.arange(3), np.ones((2, 2))])
    if link == "hard":
        os.link(d / part, outside)
    else:
        shutil.copy(d / part, outside)
        os.unlink(d / part)
        os.symlink(outside, d / part)
    before = snapshot(tmp_path)
    with pytest.raises(PermissionError, match=re.escape(str(d / part))):
        RaggedMmap(d).append(np.ones((3, 2)))
    assert snapshot(tmp_path) == before
    store = RaggedMmap(d, mode="r+")  # a replacement writes data.ninja only: another part's link does not stop it
    store[0] = [7, 8, 9]
    assert RaggedMmap(d)[0].tolist() == [7, 8, 9]


@pytest.mark.parametrize("dtype,value", [(np.int32, np.array([2**64 - 1], np.uint64)), (np.int32, np.array([2**32 - 1], np.uint32)),
                                         (np.uint8, np.array([-1], np.int8)), (np.uint32, np.array([-5], np.int32)),
                                         (np.int64, np.array([2**63], np.uint64)), (np.uint64, np.array([-1], np.int64))])
def test_integer_casts_that_wrap_around_are_refused(dtype, value, tmp_path):
    """Casting -1 to uint8 gives 255, and 255 casts back to -1: the round trip alone let these
    through, stored as other numbers. Values that fit still cast."""
    expected = f"cannot store a sample of dtype {value.dtype} in a store of dtype {np.dtype(dtype)} without losing values"
    store = RaggedMmap.from_lists(tmp_path / "r", [np.zeros(1, dtype)])
    np_ninja.from_ndarray(tmp_path / "n", np.zeros((1, 1), dtype))
    before = snapshot(tmp_path)
    with pytest.raises(TypeError, match=expected):
        store.append(value)
    with pytest.raises(TypeError, match=expected):
        np_ninja.extend_dir(tmp_path / "n", value.reshape(1, 1))
    with pytest.raises(TypeError, match=expected):
        RaggedMmap.from_lists(tmp_path / "f", [value], dtype=dtype)
    with pytest.raises(TypeError):
        store.get_padded([0], pad_value=value[0])
    assert snapshot(tmp_path) == before and not (tmp_path / "f").exists()
    store.append(np.array([7], value.dtype))  # (a value that fits)
    assert store[1].tolist() == [7] and store[1].dtype == dtype


def test_a_string_store_whose_first_string_does_not_start_at_0_is_damage(tmp_path):
    """Strings have no second record of their length: a first start moved forward read 'ha'
    for 'alpha', and verify found nothing wrong."""
    d = tmp_path / "s"
    StringsMmap.from_strings(d, ["alpha", "beta"])
    with open(d / "starts" / "data.ninja", "r+b") as f:  # (the first of two int64s: 0 -> 3)
        f.write(np.int64(3).tobytes())
    expected = f"{d}: string 0 starts at byte 3, not at 0: the store is damaged"
    with pytest.raises(ValueError, match=expected):
        StringsMmap(d)[0]
    with pytest.raises(ValueError, match=expected):
        list(StringsMmap(d))
    assert mmap_ninja._verify(str(d)) == [f"{d}: sample 0 starts at 3, not at the data's start (0)"]


def test_a_dtype_error_quotes_the_file_briefly(tmp_path):
    """numpy's message repeats the text it could not parse, in full: a dtype.ninja linked to
    a secret (/proc/self/environ) put all of it in the error."""
    d = tmp_path / "n"
    np_ninja.from_ndarray(d, np.arange(3))
    (d / "dtype.ninja").write_text("SECRET=" + "x" * 500 + "-the-end")
    with pytest.raises(ValueError, match=f"{d / 'dtype.ninja'}: cannot parse dtype 'SECRET=x") as info:
        np_ninja.open_existing(d)
    assert "-the-end" not in str(info.value) and len(str(info.value)) < 300


def test_small_misuses_get_errors_that_name_the_store(tmp_path):
    r = RaggedMmap.from_lists(tmp_path / "r", [np.arange(3), np.arange(2)])
    s = StringsMmap.from_strings(tmp_path / "s", ["a", "bc"])
    assert r.shape_of(np.int8(1)) == (2,) and r.shape_of(-1) == (2,)
    for bad in (2.9, "1", [1]):  # (int() used to take the first two, as sample 2 and sample 1)
        with pytest.raises(TypeError, match="cannot be interpreted as an integer"):
            r.shape_of(bad)
    with pytest.raises(TypeError, match=f"{tmp_path / 'r'}: get_padded takes a list of indices, got the int 1; ask for get_padded\\(\\[1\\]\\)"):
        r.get_padded(1)
    with pytest.raises(ValueError, match=f"{tmp_path / 's'}: mode must be 'r', 'r\\+' or 'c' \\(or 'rb', 'r\\+b'\\), got 'nonsense'"):
        StringsMmap(tmp_path / "s", mode="nonsense")
    with pytest.raises(UnicodeEncodeError, match=f"{tmp_path / 's'}: string 1 holds a lone surrogate"):
        s[1] = "\ud800x"
    with pytest.raises(TypeError, match=f"{tmp_path / 's'}: StringsMmap holds str only, got int 5"):
        s[1] = 5
    assert list(StringsMmap(tmp_path / "s")) == ["a", "bc"]
    assert len(ShardedMmap(os.fsencode(tmp_path / "r"))) == 2  # (a bytes path, as os functions take)


@pytest.mark.parametrize("backend", ["zstandard", "compression.zstd"])
def test_a_compressed_string_is_one_whole_frame(backend, tmp_path, monkeypatch):
    """Each string is stored as one zstd frame. Bytes after it (a second frame, garbage) were
    skipped by zstandard ('ab' for 'ab' + 'cd') and would be read on by compression.zstd
    ('abcd'): damage either way, and verify passed it. compression.zstd is Python 3.14's, or
    the backports.zstd package (the same module) on older Pythons."""
    if backend == "zstandard":
        lib = pytest.importorskip("zstandard")
        monkeypatch.setitem(sys.modules, "compression", None)  # (the zstandard branch, on 3.14 too)
        frame = lambda raw: lib.ZstdCompressor(write_checksum=True).compress(raw)
    else:
        try:
            from compression import zstd as lib
        except ImportError:
            lib = pytest.importorskip("backports.zstd")
            package = type(sys)("compression")
            package.zstd = lib
            monkeypatch.setitem(sys.modules, "compression", package)
            monkeypatch.setitem(sys.modules, "compression.zstd", lib)
        frame = lib.compress
    d = tmp_path / "z"
    assert list(StringsMmap.from_strings(d, ["héllo", ""] * 3, zstd_level=3)) == ["héllo", ""] * 3
    for blob, expected in ((frame(b"ab"), "ab"), (frame(b"ab") + frame(b"cd"), None),
                           (frame(b"ab") + b"\xff" * 50, None), (frame(b"ab")[:-2], None)):
        (d / "data.ninja").write_bytes(blob)
        (d / "starts" / "data.ninja").write_bytes(np.array([0], "<i8").tobytes())
        (d / "ends" / "data.ninja").write_bytes(np.array([len(blob)], "<i8").tobytes())
        (d / "starts" / "shape.ninja").write_bytes(np.array([1], "<i8").tobytes())
        (d / "ends" / "shape.ninja").write_bytes(np.array([1], "<i8").tobytes())
        if expected is not None:
            assert StringsMmap(d)[0] == expected and mmap_ninja._verify(str(d)) == []
            continue
        with pytest.raises(ValueError, match=f"{d}: cannot decompress a string with the store's zstd settings .*: the store is damaged"):
            StringsMmap(d)[0]
        assert [p for p in mmap_ninja._verify(str(d)) if "string 0 cannot be decompressed" in p]


def test_shapes_numpy_cannot_make_are_damage_and_shape_of_checks_offsets(tmp_path):
    """Three leaks past the offset checks: a nested sample recorded as (0, 2**62) (empty, so its
    element count agreed, yet numpy refuses the shape) or with 65 axes of 1 read with numpy's
    bare 'array is too big' or dimension error, and verify passed both; and shape_of on a
    flat sample with a damaged start returned a length computed from the offsets."""
    for shape, shown in (((0, 2**62), "\\(0, 4611686018427387904\\)"), ((1,) * 65, "of 65 axes")):
        d = tmp_path / f"nested{len(shape)}"
        RaggedMmap.from_lists(d, [np.zeros((1, 1) if len(shape) > 2 else (0, 2), np.int32), np.ones((2, 2), np.int32)])
        rows = [np.array(shape, np.int64), np.array([2, 2], np.int64)]
        RaggedMmap.from_lists(d / "shapes", rows)  # (sample 0's shape rewritten, element counts kept)
        expected = f"{d}: sample 0 spans elements 0 to {0 if shape[0] == 0 else 1}, which does not fit its recorded shape {shown}: the store is damaged"
        for read in (lambda s: s[0], lambda s: s[:], lambda s: list(s), lambda s: s.shape_of(0), lambda s: s[[0, 1]]):
            with pytest.raises(ValueError, match=expected):
                read(RaggedMmap(d))
        assert mmap_ninja._verify(str(d)) == [f"{d}: sample 0: shape {mmap_ninja._short(list(shape))} is one numpy cannot make "
                                              f"(over 64 axes, or nonzero ones of 2**63 bytes or more)"]
    d = tmp_path / "flat"
    RaggedMmap.from_lists(d, [np.arange(100.0)] * 3)
    with open(d / "starts" / "data.ninja", "r+b") as f:
        f.seek(8)
        f.write(np.int64(2**62).tobytes())
    for read in (lambda s: s.shape_of(1), lambda s: s[1]):
        with pytest.raises(ValueError, match=f"{d}: sample 1 spans elements 4611686018427387904 to 200, which does not "
                                             f"fit its recorded shape \\(100,\\)"):
            read(RaggedMmap(d))


def test_hard_links_made_while_a_writer_is_open_stop_its_next_append(tmp_path):
    """A writer keeps its files open between appends, so the check at open missed a copy made
    meanwhile (rsync --link-dest of a store being written): the next append went into the
    copy too. Opening in mode r+ only to read a linked copy is fine; a write through it is not."""
    d, copy = tmp_path / "s", tmp_path / "copy"
    store = RaggedMmap.from_lists(d, [np.arange(3)])
    texts = StringsMmap.from_strings(tmp_path / "t", ["ab"])
    store.append(np.arange(4))
    texts.append("cd")
    shutil.copytree(d, copy, copy_function=os.link)
    shutil.copytree(tmp_path / "t", tmp_path / "t-copy", copy_function=os.link)
    before = snapshot(tmp_path)
    with pytest.raises(PermissionError, match=f"{d / 'starts' / 'shape.ninja'} has 2 hard links"):
        store.append(np.arange(5))
    with pytest.raises(PermissionError, match="shape.ninja has 2 hard links"):
        texts.append("ef")
    readable = RaggedMmap(copy, mode="r+")
    assert_same_samples(list(readable), [np.arange(3), np.arange(4)])
    with pytest.raises(PermissionError, match=f"{copy / 'data.ninja'} has 2 hard links"):
        readable[0] = np.array([7, 8, 9])
    np_ninja.from_ndarray(tmp_path / "n", np.arange(4))
    shutil.copytree(tmp_path / "n", tmp_path / "n-copy", copy_function=os.link)
    assert np_ninja.open_existing(tmp_path / "n-copy", mode="r+").tolist() == [0, 1, 2, 3]
    after = snapshot(tmp_path)
    assert all(after[name] == content for name, content in before.items())  # (nothing written)


def test_numpy_stores_of_shapes_numpy_cannot_make(tmp_path):
    """np_empty wrote an (0, 2**62) int32 store and then failed in numpy; opening one gave
    numpy's bare 'array is too big'. An (0, 2**62) int8 array is one numpy makes: it is kept."""
    with pytest.raises(ValueError, match=f"{tmp_path / 'e'}: cannot make a store of shape \\(0, 4611686018427387904\\) "
                                         f"and dtype int32: axes must be >= 0, at most 64 of them"):
        np_ninja.empty(tmp_path / "e", np.int32, (0, 2**62))
    with pytest.raises(ValueError, match="cannot make a store of shape"):
        np_ninja.empty(tmp_path / "e", np.int8, (1,) * 65)
    assert not (tmp_path / "e").exists()
    d = tmp_path / "n"
    np_ninja.empty(d, np.int32, (0, 4))
    (d / "shape.ninja").write_bytes(np.array([0, 2**62], "<u8").tobytes())
    for attempt in (lambda: np_ninja.open_existing(d), lambda: open_existing(d)):
        with pytest.raises(ValueError, match=f"{d / 'shape.ninja'}: shape \\(0, 4611686018427387904\\) of int32 is one "
                                             f"numpy cannot make"):
            attempt()
    assert len(mmap_ninja._verify(str(d))) == 1
    empty = np.zeros((0, 2**62), np.int8)
    r = RaggedMmap.from_lists(tmp_path / "r", [empty, np.ones((1, 2), np.int8)])
    assert RaggedMmap(tmp_path / "r")[0].shape == (0, 2**62) and r.shape_of(0) == (0, 2**62)
    assert mmap_ninja._verify(str(tmp_path / "r")) == []


def test_a_regular_store_of_65_axes_is_damage_on_its_fast_path(tmp_path):
    """Every sample with the same number of axes takes the regular-layout path, which checks
    the whole store at once: it must refuse 65 axes as the page checks do."""
    d = tmp_path / "r"
    RaggedMmap.from_lists(d, [np.ones((1, 1), np.uint8), np.ones((1, 1), np.uint8)])
    RaggedMmap.from_lists(d / "shapes", [np.ones(65, np.int64)] * 2)
    expected = f"{d}: sample 0 spans elements 0 to 1, which does not fit its recorded shape of 65 axes"
    for read in (lambda s: s[:], lambda s: s[[0, 1]], lambda s: s.get_padded([0, 1]), lambda s: s[0]):
        with pytest.raises(ValueError, match=expected):
            read(RaggedMmap(d))


@pytest.mark.parametrize("moved", ["all", "some"])
def test_a_swap_killed_with_the_old_store_aside_is_not_read_as_empty(moved, tmp_path):
    # (an entry-by-entry swap, out_dir a mount point: killed once the old store's entries were
    # aside, the directory read as an empty store, took appends, and hid the old samples)
    d = tmp_path / "s"
    RaggedMmap.from_lists(d, [np.arange(3), np.arange(5)])
    (d / "notes.txt").write_text("mine")
    aside = d / ".ninja-old-4000000-abcdef"  # (a dead process's)
    aside.mkdir()
    for name in ["type.ninja", "data.ninja", "starts", "ends", "shapes", "flattened_shapes", "dtype.ninja",
                 "shape.ninja", "order.ninja", "shapes_are_flat.ninja"][:None if moved == "all" else 3]:
        if (d / name).exists():
            os.rename(d / name, aside / name)
    before = snapshot(d)
    message = (f"{d}: type.ninja is missing and the store's files are in {aside}: a re-creation was killed "
               f"while it swapped a new store in entry by entry; create the store again")
    for attempt in (lambda: RaggedMmap(d)[0], lambda: len(RaggedMmap(d)), lambda: RaggedMmap(d).append(np.arange(1)),
                    lambda: mmap_ninja.open_existing(d)):
        with pytest.raises(ValueError, match=re.escape(message)):
            attempt()
    assert snapshot(d) == before
    RaggedMmap.from_lists(d, [np.arange(7)])  # (replaces it, and the old store aside)
    assert [x.tolist() for x in RaggedMmap(d)] == [list(range(7))] and not aside.exists()
    assert (d / "notes.txt").read_text() == "mine"


def test_names_like_a_swaps_that_are_not_its_own(tmp_path):
    # a user's entries named like ours are kept by a re-creation (the swap's own carry a pid and
    # a suffix); one with a pid that is no number is not ours either
    d = tmp_path / "s"
    np_ninja.from_ndarray(d, np.arange(3))
    for name in (".ninja-old-backup", ".ninja-old-²-x", ".ninja-new-"):
        (d / name).mkdir()
        (d / name / "mine.txt").write_text(name)
    np_ninja.from_ndarray(d, np.arange(4))
    assert np_ninja.open_existing(d).tolist() == [0, 1, 2, 3]
    for name in (".ninja-old-backup", ".ninja-old-²-x", ".ninja-new-"):
        assert (d / name / "mine.txt").read_text() == name
    # an old store aside whose process is alive but holds no lock (pid 1) was killed: refused at
    # once, not waited for; a dead process's build inside out_dir is no old store: read as empty
    e = tmp_path / "e"
    np_ninja.from_ndarray(e, np.arange(2))
    (e / ".ninja-old-1-x").mkdir()
    os.rename(e / "type.ninja", e / ".ninja-old-1-x" / "type.ninja")
    started = time.monotonic()
    with pytest.raises(ValueError, match=re.escape(f"{e}: type.ninja is missing and the store's files are in "
                                                   f"{e / '.ninja-old-1-x'}: a re-creation was killed")):
        np_ninja.open_existing(e)
    with pytest.raises(ValueError, match="a re-creation was killed"):
        mmap_ninja.open_existing(e)
    assert time.monotonic() - started < 5
    f = tmp_path / "f"
    f.mkdir()
    RaggedMmap.from_lists(f / ".ninja-new-4000000-abc", [np.arange(2)])  # (a killed build's, complete or not)
    assert len(RaggedMmap(f)) == 0


def test_a_directory_without_type_ninja_says_what_left_it(tmp_path):
    """Without type.ninja, data means damage; the message tells a killed entry-by-entry swap
    (the old store waits in .ninja-old-*, .ninja-new-* before) from a copy in progress, and a
    data.ninja that is no regular file is refused rather than cleared."""
    d = tmp_path / "s"
    RaggedMmap.from_lists(d, [np.arange(5)])
    old = d / ".ninja-new-4000000-abc"  # (a dead process's)
    old.mkdir()
    for name in ("starts", "ends", "type.ninja"):
        os.rename(d / name, old / name)
    with pytest.raises(ValueError, match=f"{d}: type.ninja is missing, but the directory holds 40 bytes of data in "
                                         f"data.ninja: a re-creation was killed while it swapped the new store in; "
                                         f"the old store is in {old}: move its files back"):
        RaggedMmap(d)  # (as the previous version's swap left it: its old store in .ninja-new-*)
    e = tmp_path / "e"
    e.mkdir()
    (e / "data.ninja").mkdir()
    before = snapshot(e)
    with pytest.raises(ValueError, match=f"{e}: type.ninja is missing, but the directory holds a data.ninja that is "
                                         f"no regular file"):
        RaggedMmap(e).append(np.arange(2))
    assert snapshot(e) == before and (e / "data.ninja").is_dir()


def test_files_named_like_a_stores_parts_are_never_replaced_nor_cleared(tmp_path):
    """A directory without type.ninja where the user keeps shapes/circle.png or starts/ of
    their own: creating a store there swapped those entries out and deleted them, and an
    append cleared them as a killed creation's leftovers. Both are refused now; what a killed
    creation does leave (format names only, no data) is still cleared (see
    test_a_directory_without_type_ninja_is_no_store_yet)."""
    d = tmp_path / "mine"
    (d / "shapes").mkdir(parents=True)
    (d / "shapes" / "circle.png").write_bytes(b"PNG")
    (d / "starts").mkdir()
    (d / "starts" / "mine.csv").write_text("1,2")
    (d / "notes.txt").write_text("kept")
    before = snapshot(d)
    expected = (f"{d} holds {d / 'shapes' / 'circle.png'}, named like a part of a store, but no type.ninja, and it is "
                f"not what a killed creation leaves: mmap_ninja neither reads, replaces nor removes it")
    for attempt in (lambda: StringsMmap.from_strings(d, ["a"]), lambda: RaggedMmap.from_lists(d, [np.arange(2)]),
                    lambda: np_ninja.from_ndarray(d, np.arange(3)), lambda: RaggedMmap(d).append(np.arange(2)),
                    lambda: StringsMmap(d)):
        with pytest.raises(ValueError, match=expected):
            attempt()
    (tmp_path / "lines.txt").write_text("x\n")
    result = cli("from-lines", tmp_path / "lines.txt", d)
    assert result.returncode == 2 and expected in result.stderr
    assert snapshot(d) == before and hidden_leftovers(d) == []
    os.rename(d / "shapes", tmp_path / "moved")  # (the next one it names)
    with pytest.raises(ValueError, match=f"{d} holds {d / 'starts' / 'mine.csv'}, named like a part of a store"):
        StringsMmap.from_strings(d, ["a"])


def test_from_npy_refuses_archives_and_impossible_headers_in_one_line(tmp_path):
    header = repr({"descr": "<i8", "fortran_order": False, "shape": (2**60,)}).encode()
    header += b" " * ((-(10 + len(header) + 1)) % 64) + b"\n"
    (tmp_path / "huge.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 80)
    np.savez(tmp_path / "pair.npz", a=np.arange(3), b=np.arange(2))
    for source, expected in (("huge.npy", "is not a .npy file numpy can map"),
                             ("pair.npz", "is not a .npy file but an archive of several (NpzFile); convert each array on its own")):
        result = cli("from-npy", tmp_path / source, tmp_path / "out")
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith(f"error: {tmp_path / source} {expected}") and not (tmp_path / "out").exists()


def test_reads_of_samples_a_recreation_removed_name_the_store(tmp_path):
    """prefetch and get_padded checked indices against the count this object last saw, then
    mapped the smaller store and failed in numpy; shape_of named index 0."""
    d = tmp_path / "s"
    out_of_range = f"{d}: index 2000 is out of range for 1000 samples"
    for read, expected in ((lambda s: s.prefetch([2000]), out_of_range), (lambda s: s.get_padded([2000]), out_of_range),
                           (lambda s: s[[2000]], out_of_range),
                           (lambda s: s.shape_of(2000), f"{d}: sample 2000 is gone: the store now holds 1000 samples")):
        store = RaggedMmap.from_lists(d, [np.arange(2)] * 3000)
        store.append(np.arange(2))  # (an append drops this object's maps: it maps again next time)
        RaggedMmap.from_lists(d, [np.arange(2)] * 1000)  # re-created meanwhile, smaller
        with pytest.raises(IndexError, match=expected):
            read(store)
        assert store.shape_of(999) == (2,)


def test_the_sampler_refuses_a_0d_numpy_store_naming_it(tmp_path):
    scalar = np_ninja.from_ndarray(tmp_path / "z", np.array(7.0))
    with pytest.raises(TypeError, match=f"{tmp_path / 'z'} is a 0-d numpy store: one value, not a sequence of samples"):
        mmap_ninja.QuasiRandomSampler(scalar, 2)


@pytest.mark.parametrize("cold", [False, True])
def test_a_list_mixing_signed_and_unsigned_ints_indexes_like_any_list(cold, tmp_path):
    """numpy makes float64 of [-1, np.uint64(2)]: the indices come from the list itself, the
    same for every store kind, hot or cold."""
    flat = RaggedMmap.from_lists(tmp_path / "f", [np.arange(k + 1) for k in range(5)])
    nested = RaggedMmap.from_lists(tmp_path / "n", [np.full((1, k + 1), k) for k in range(5)])
    strings = StringsMmap.from_strings(tmp_path / "s", ["a", "b", "c", "d", "e"])
    sharded = ShardedMmap([tmp_path / "f", tmp_path / "n"])
    idx = [-1, np.uint64(2), np.int8(0)]
    for store in (flat, nested, strings):
        store.cold = cold
    assert [x.tolist() for x in flat[idx]] == [[0, 1, 2, 3, 4], [0, 1, 2], [0]]
    assert [x.tolist() for x in nested[idx]] == [[[4] * 5], [[2] * 3], [[0]]]
    assert strings[idx] == ["e", "c", "a"]
    assert [x.tolist() for x in sharded[idx]] == [[[4] * 5], [0, 1, 2], [0]]
    assert flat.get_padded(idx)[0].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0], [0, 0, 0, 0, 0]]
    flat.prefetch(idx), sharded.prefetch(idx)
    with pytest.raises(IndexError, match=f"{re.escape(str(tmp_path / 'f'))}: index 18446744073709551615 is out of range"):
        flat[[-1, np.uint64(2**64 - 1)]]
    for bad in ([-1, np.uint64(2), 1.5], [np.uint64(1), -1, np.timedelta64(1)], [2**64, np.timedelta64(1)]):
        with pytest.raises(TypeError, match=f"{re.escape(str(tmp_path / 'f'))}: index must be an int, a slice, a 1-D list/array of ints"):
            flat[bad]


def test_a_sharded_mmap_takes_the_single_indices_a_store_takes(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "a", [np.arange(k + 1) for k in range(4)])
    sharded = ShardedMmap([tmp_path / "a"])
    for item in (np.array(3), np.array(3, np.uint8), True, False, np.int16(-1)):
        assert sharded[item].tolist() == store[item].tolist() == list(range(int(item) % 4 + 1))


def test_get_padded_refuses_a_pad_value_of_several_values(tmp_path):
    store = RaggedMmap.from_lists(tmp_path / "t", [np.arange(3), np.arange(5)])
    for several in ([0, -1], [[1], [2, 3]], [], np.array([1, 2])):
        with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 't'))}: pad_value must be one value \\(a scalar\\), got "):
            store.get_padded([0, 1], pad_value=several)
    assert store.get_padded([0, 1], pad_value=[7])[0].tolist() == [[0, 1, 2, 7, 7], [0, 1, 2, 3, 4]]


def test_np_empty_takes_numpy_order_spellings_and_refuses_others_before_writing(tmp_path):
    d = tmp_path / "f"
    np_ninja.from_ndarray(d, np.arange(6.0))
    before = snapshot(d)
    for order in ("X", "A", ""):
        with pytest.raises(ValueError, match=f"{re.escape(str(d))}: order must be 'C' or 'F', got {order!r}"):
            np_ninja.empty(d, np.float32, (2, 3), order)
        assert snapshot(d) == before
    for shape in (2.7, (3.9, 2), (True, 2)):
        with pytest.raises(TypeError, match=f"{re.escape(str(d))}: shape must be an int or a sequence of ints"):
            np_ninja.empty(d, np.float32, shape)
        assert snapshot(d) == before
    arr = np_ninja.empty(d, np.float32, (2, 3), "f")  # (numpy takes "f"; so did the published package)
    assert arr.flags.f_contiguous and (d / "order.ninja").read_text() == "F"
    (d / "order.ninja").write_text("f")  # as the published np_empty writes it
    back = np_ninja.open_existing(d)
    assert back.shape == (2, 3) and back.flags.f_contiguous and back.dtype == np.float32


def test_structured_field_names_beyond_ascii_are_stored_and_read_back(tmp_path):
    """dtype.ninja is ASCII: a field named "température" is written escaped. Before, each writer
    wrote it as UTF-8, which no reader opens: the store it replaced was lost."""
    dt = np.dtype([("température", "<f4"), ("日", "<i2")])
    rows = np.array([(1.5, 7), (2.5, -1)], dt)
    np_ninja.from_ndarray(tmp_path / "n", rows)
    assert (tmp_path / "n" / "dtype.ninja").read_bytes().isascii()
    back = np_ninja.open_existing(tmp_path / "n")
    assert back.dtype == dt and back.tolist() == rows.tolist()
    np_ninja.from_ndarray(tmp_path / "z", rows[0])  # (a 0-d store: one record)
    assert np_ninja.open_existing(tmp_path / "z").tolist() == (1.5, 7)
    assert np_ninja.empty(tmp_path / "e", dt, 2).dtype == dt
    assert RaggedMmap.from_lists(tmp_path / "r0", [], dtype=dt).dtype == dt
    r = RaggedMmap(tmp_path / "r")
    r.append(rows)
    assert RaggedMmap(tmp_path / "r")[0].tolist() == rows.tolist() and RaggedMmap(tmp_path / "r").dtype == dt


def test_copy_before_wrapper_fn_copies_records_dicts_and_masked_arrays(tmp_path):
    """The sample a wrapper_fn gets is its own, as copy.copy makes it: a record of a structured
    store (np.array(record, copy=True) would still view the store's map), a dict, a masked array."""
    d = tmp_path / "records"
    np_ninja.from_ndarray(d, np.zeros(3, [("label", "<i4"), ("score", "<f4")]))

    def augment(record):
        record["label"] = 99
        return record
    assert open_existing(d, wrapper_fn=augment, mode="r+")[0]["label"] == 99
    assert [r[0] for r in Wrapped(np_ninja.open_existing(d, "r+"), augment)] == [99, 99, 99]
    assert open_existing(d, wrapper_fn=augment)[1]["label"] == 99  # (read-only map: the copy is writable)
    assert np_ninja.open_existing(d).tolist() == [(0, 0.0)] * 3
    data = [{"label": 1}]
    assert Wrapped(data, lambda s: s.update(label=2) or s)[0] == {"label": 2} and data == [{"label": 1}]
    np_ninja.from_ndarray(tmp_path / "rows", np.arange(6).reshape(3, 2))
    row = open_existing(tmp_path / "rows", wrapper_fn=lambda s: s)[1]  # (a row in memory, not a memmap)
    assert type(row) is np.ndarray and row.flags.owndata and row.tolist() == [2, 3]
    masked = [np.ma.array([1.0, 100.0, 3.0], mask=[0, 1, 0])]
    seen = Wrapped(masked, lambda s: s)[0]
    assert type(seen) is np.ma.MaskedArray and seen.mean() == 2.0 and seen.base is not masked[0].base


def test_numpy_mode_names_float_batch_sizes_and_lengths_that_raise(tmp_path):
    """What the published package takes: numpy's long mode names, a whole-number float batch
    size (1e4), verbose=True over an iterable whose __len__ raises TypeError."""
    np_ninja.from_ndarray(tmp_path / "a", np.arange(4))
    RaggedMmap.from_lists(tmp_path / "ra", [np.arange(2)])
    for mode, same in (("readonly", "r"), ("readwrite", "r+"), ("copyonwrite", "c")):
        assert np_ninja.open_existing(tmp_path / "a", mode=mode).mode == np_ninja.open_existing(tmp_path / "a", same).mode
        assert RaggedMmap(tmp_path / "ra", mode=mode).mode == same
    with pytest.raises(ValueError, match="world_size must be a positive integer, got 2.0"):  # (no published
        mmap_ninja.QuasiRandomSampler(RaggedMmap(tmp_path / "ra"), 1, world_size=2.0)     # sampler: ints)
    assert np_ninja.from_generator(tmp_path / "g", (np.arange(2) for _ in range(3)), 1e4).tolist() == [[0, 1]] * 3
    assert len(RaggedMmap.from_generator(tmp_path / "r", (np.arange(2) for _ in range(3)), 1e4)) == 3
    assert StringsMmap.from_generator(tmp_path / "s", iter(["a", "b"]), 1e4)[:] == ["a", "b"]

    class Rows:
        def __iter__(self):
            return iter([np.arange(2), np.arange(2)])

        def __len__(self):
            raise TypeError("no length")
    assert np_ninja.from_generator(tmp_path / "v", Rows(), 1, verbose=True).shape == (2, 2)
    for bad, message in ((1.5, "batch_size must be a positive integer, got 1.5"), (0, "got 0"),
                         (2**63, f"batch_size must be at most {sys.maxsize}, got {2**63}")):
        with pytest.raises(ValueError, match=re.escape(message)):
            StringsMmap.from_strings(tmp_path / "x", ["a"], batch_size=bad)
        with pytest.raises(ValueError, match=re.escape(message)):
            RaggedMmap.from_generator(tmp_path / "x", iter([np.arange(2)]), bad)
    assert not (tmp_path / "x").exists()


def test_np_from_generator_takes_its_dtype_from_the_first_batch_as_numpy_stacks_it(tmp_path):
    """As the published package (which stacks the first batch): np.float32(1) then 0.1 is a
    float64 store, not a float32 one that rounds 0.1; 1 then 2.5 is float64, not refused. One
    dtype throughout keeps its byte order; a later batch is cast as appends are."""
    cases = [([np.float32(1), 0.1, 0.2], np.float64, [1.0, 0.1, 0.2]),
             ([1, 2.5, 3], np.float64, [1.0, 2.5, 3.0]),
             ([np.int32(1), np.int64(2**40)], np.int64, [1, 2**40]),
             (["a", "hello"], np.dtype("<U5"), ["a", "hello"]),
             ([np.arange(2, dtype=">i4")] * 2, np.dtype(">i4"), [[0, 1], [0, 1]])]
    cases += [([np.uint64(2**63 + 1), np.int64(1)], np.uint64, [2**63 + 1, 1]),  # (not float64: IDs
              ([2**63 + 1, 1], np.uint64, [2**63 + 1, 1])]                        # stay exact)
    for k, (samples, dtype, values) in enumerate(cases):
        arr = np_ninja.from_generator(tmp_path / f"g{k}", iter(samples), 4)
        assert arr.dtype == dtype and arr.tolist() == values
    alive = []  # memory holds one batch: the first batch goes once written

    def rows():
        for i in range(40):
            if i == 30:
                alive.append(sum(r() is not None for r in refs[:8]))
            row = np.full(1000, i, np.int32)
            refs.append(weakref.ref(row))
            yield row
    refs = []
    assert np_ninja.from_generator(tmp_path / "m", rows(), 8)[:, 0].tolist() == list(range(40)) and alive == [0]
    with pytest.raises(TypeError, match="cannot store"):  # (2.5 after a first batch of ints)
        np_ninja.from_generator(tmp_path / "late", iter([1, 2, 2.5]), 2)
    assert not (tmp_path / "late").exists()


def test_strays_and_what_killed_swaps_leave(tmp_path, monkeypatch):
    """Follow-ups to the strays rule: a parent of shards may hold a folder of its own with a
    shapes/ in it; a dead build in out_dir does not switch the rule off; a user's
    results.tmp-2024.csv is not a leftover; a swap killed after the user's files moved into
    the build gives them back on the next run; and the entry-by-entry swap moves type.ninja
    out first, so that a kill leaves a directory that reads as no store, not a broken one."""
    parent = tmp_path / "parent"
    for name in ("a_train", "b_val"):
        RaggedMmap.from_lists(parent / name, [np.arange(3)] * 3)
    (parent / "raw" / "shapes").mkdir(parents=True)
    (parent / "raw" / "shapes" / "circle.png").write_bytes(b"PNG")
    assert len(ShardedMmap(parent)) == 6
    d = tmp_path / "byp"
    (d / "shapes").mkdir(parents=True)
    (d / "shapes" / "circle.png").write_bytes(b"PNG")
    (d / ".ninja-new-4000000-abcdef").mkdir()  # (a dead build, or a killed swap's old store)
    with pytest.raises(ValueError, match=f"{d} holds {d / 'shapes' / 'circle.png'}, named like a part of a store"):
        RaggedMmap.from_lists(d, [np.arange(2)])
    assert (d / "shapes" / "circle.png").read_bytes() == b"PNG"
    e = tmp_path / "e"
    e.mkdir()
    (e / "results.tmp-2024.csv").write_text("mine")
    RaggedMmap(e).append(np.arange(2))
    assert (e / "results.tmp-2024.csv").read_text() == "mine" and len(RaggedMmap(e)) == 1
    x = tmp_path / "x"
    RaggedMmap.from_lists(x, [np.arange(4)] * 5)
    (x / "notes.txt").write_text("mine")
    killed = run_python(f"""
        import os, numpy as np, mmap_ninja
        mmap_ninja._exchange = lambda a, b: os._exit(9)  # killed after the user's files moved into the build
        mmap_ninja.RaggedMmap.from_lists({str(x)!r}, [np.arange(2)])
    """)
    assert killed.returncode == 9 and not (x / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".x.ninja-new-")]
    RaggedMmap.from_lists(x, [np.arange(2)])
    assert (x / "notes.txt").read_text() == "mine" and not [p for p in tmp_path.iterdir() if p.name.startswith(".x.ninja-new-")]
    moved = []
    rename = os.rename
    monkeypatch.setattr(mmap_ninja, "_exchange", lambda a, b: False)
    monkeypatch.setattr(os, "rename", lambda a, b: (moved.append((os.fspath(a), os.fspath(b))), rename(a, b))[1])
    RaggedMmap.from_lists(x, [np.arange(3)])
    old_store = os.path.join(str(x), ".ninja-old-")  # (where the old store's entries go, inside x)
    out_of_target = [os.path.basename(a) for a, b in moved if os.path.dirname(a) == str(x) and b.startswith(old_store)]
    assert out_of_target[0] == "type.ninja" and len(out_of_target) > 3
    monkeypatch.undo()
    assert_same_samples(list(RaggedMmap(x)), [np.arange(3)]) and (x / "notes.txt").read_text() == "mine"
