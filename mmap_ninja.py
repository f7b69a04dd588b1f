"""mmap_ninja: memory-mapped datasets of numpy arrays and strings, in one file.

Training loops that open thousands of small files spend their time in the file system. mmap_ninja
keeps a whole dataset in a few memory-mapped files, so reading sample ``i`` costs about what
slicing an in-memory numpy array costs.

This single module is a drop-in for the published ``mmap_ninja`` package (0.8.2 / 0.9.0): it has
the same API and import paths (``from mmap_ninja import numpy as np_ninja``,
``from mmap_ninja.ragged import RaggedMmap``, ...) and reads and writes the same directories.
It needs only numpy. To vendor it, copy this file into your project (for example
``myproj/_vendor/mmap_ninja.py``); its submodule names register under the name it is imported as.

Stores
------
- numpy store: one ``np.memmap``; see ``np_from_ndarray``, ``np_from_generator``,
  ``np_open_existing``, ``np_extend_dir``.
- ``RaggedMmap``: a sequence of arrays of different shapes (one dtype).
- ``StringsMmap``: a sequence of ``str``, optionally zstd-compressed.
- ``ShardedMmap``: several stores read as one sequence.
- ``open_existing``: open any of them by what its directory says it is.

On-disk format (version 1, the published package's layout)
-----------------------------------------------------------
Every store is a directory. Numbers in ``*.ninja`` metadata are little-endian; text is ASCII.

numpy store::

    type.ninja    "numpy"
    dtype.ninja   text that np.dtype() parses to the exact dtype: the dtype's name where that is
                  exact ("float32", "bool"), else its str ("<U7", ">f4", "<M8[ns]"), else, for
                  structured dtypes, the Python literal of dtype.descr (parsed with
                  ast.literal_eval, never evaluated as code; readers without that support fail
                  with an error instead of returning wrong data).
    shape.ninja   every axis length as <u8, concatenated (empty for a 0-d array)
    order.ninja   "C" or "F"
    data.ninja    the raw array bytes in that order. Readers MUST ignore bytes past
                  prod(shape) * itemsize: a writer killed mid-append leaves them there.

ragged store: the directory is itself a numpy store (type "ragged") holding the 1-D concatenation
of all samples, each flattened in C order; plus

    starts/, ends/        numpy stores, int64, 1-D: sample i is data[starts[i]:ends[i]]
                          (element offsets). THE NUMBER OF SAMPLES IS len(starts).
    flattened_shapes/     numpy store, int64: element count of each sample
    shapes_are_flat.ninja <i4: 1 when every sample is 1-D or 0-d, else 0
    shapes/               flat: numpy store, int64, shape (n, 1), each sample's length; a 0-d
                          sample is recorded as 0 with 1 in flattened_shapes. Not flat: a ragged
                          store whose sample i is the int64 shape of sample i.

strings store::

    type.ninja       "string"
    data.ninja       UTF-8 bytes of every string, concatenated (raw, no metadata)
    starts/, ends/   numpy stores, int64: byte offsets; the number of strings is len(starts)
    zstd_level.ninja optional, ASCII integer: each string is one zstd frame
    zstd_dict.ninja  optional: the raw zstd dictionary used to compress and decompress

Commit protocol (what makes a killed writer harmless): an append first writes sample bytes past
the committed end of each file, then updates lengths, each with one 8-byte in-place write of
the first axis in ``shape.ninja``, in the order data, shapes, flattened_shapes, ends, starts. The
sample count (``starts``) is written last, so every reader sees either the old samples or the
new ones, and the next append overwrites whatever a killed writer left behind. A new store's
files are written in place and its ``type.ninja`` last, to a temporary name then ``os.replace``-d:
a directory is a store once ``type.ninja`` exists. Metadata changed later (the dtype of an empty
store, the flatness flag) is ``os.replace``-d too. Writers of one store are serialized
with ``flock`` on its directory where the platform has it. Appends are not fsync-ed unless
``durable=True`` is passed (or ``flush()`` called): a killed process never loses committed
samples, but power loss may lose the latest ones.
"""

__version__ = "1.0.0"
__version_info__ = (1, 0, 0)
FORMAT_VERSION = 1

__all__ = [
    "Wrapped", "RaggedMmap", "StringsMmap", "ShardedMmap", "open_existing",
    "np_from_ndarray", "np_from_generator", "np_open_existing", "np_extend_dir", "np_extend",
    "np_append", "np_empty", "__version__",
]

import argparse
import ast
import bisect
import contextlib
import functools
import itertools
import math
import mmap
import operator
import os
import shutil
import struct
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:  # POSIX: serialize writers with flock. Windows has no fcntl; writers are then not locked.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


###################################################################################################
# Format I/O: small helpers that read and write the metadata files with clear errors
###################################################################################################

_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")
# memoryview.cast("q") turns an index file into Python ints in ~30 ns. It reads native byte
# order, so big-endian machines use (slower) numpy views of "<i8" instead.
_NATIVE_LITTLE = sys.byteorder == "little"
# Python 3.13 lets a map live without holding a duplicate file descriptor.
_MMAP_KW = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def _read_bytes(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{what} is missing: {path} does not exist (the store is damaged, or this directory "
            f"is not a mmap_ninja store)") from None
    except PermissionError as e:
        raise PermissionError(f"cannot read {what} {path}: {e.strerror}") from None


def _read_text(path, what):
    raw = _read_bytes(path, what)
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not ASCII text: {raw[:40]!r}") from None


def _write_atomic(path, data, durable=False):
    """Write a whole small file so that readers see the old content or the new, never a mix."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_new(path, data, durable=False):
    """Write a small file of a store being created: no rename needed, because the store's
    type.ninja, written last (atomically), is what makes the directory a store."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _dtype_to_text(dtype, path=""):
    """The text stored in dtype.ninja: the oldest spelling that np.dtype() parses back exactly."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(f"{path}: dtype {dtype!r} holds Python objects, which cannot be "
                        f"memory-mapped; convert to a numeric, bool, bytes or str dtype first")
    candidates = [dtype.name, dtype.str] if dtype.names is None else [repr(dtype.descr)]
    for text in candidates:
        try:
            if _parse_dtype(text) == dtype:
                return text
        except (TypeError, ValueError, SyntaxError):
            pass
    raise TypeError(f"{path}: dtype {dtype!r} cannot be stored exactly (no text form of it "
                    f"round-trips through np.dtype)")


def _parse_dtype(text, path="dtype.ninja"):
    try:
        # Structured dtypes are stored as the literal of dtype.descr; literal_eval never runs code.
        spec = ast.literal_eval(text) if text.startswith("[") else text
        dtype = np.dtype(spec)
    except (TypeError, ValueError, SyntaxError, MemoryError) as e:
        raise ValueError(f"{path}: cannot parse dtype {text!r}: {e}") from None
    if dtype.hasobject:
        raise ValueError(f"{path}: dtype {text!r} holds Python objects; refusing to map it")
    return dtype


def _read_kind(store_dir):
    kind = _read_text(os.path.join(store_dir, "type.ninja"), "store type")
    if kind not in ("numpy", "ragged", "string"):
        raise ValueError(f"{store_dir}: unknown store type {kind!r} in type.ninja "
                         f"(expected 'numpy', 'ragged' or 'string')")
    return kind


def _read_meta(store_dir):
    """dtype, shape and order of the numpy store (or ragged data) in store_dir."""
    dtype = _parse_dtype(_read_text(os.path.join(store_dir, "dtype.ninja"), "dtype"),
                         os.path.join(store_dir, "dtype.ninja"))
    shape_path = os.path.join(store_dir, "shape.ninja")
    raw = _read_bytes(shape_path, "shape")
    if len(raw) % 8:
        raise ValueError(f"{shape_path} is {len(raw)} bytes long, not a multiple of 8: "
                         f"the shape file is damaged")
    shape = struct.unpack(f"<{len(raw) // 8}Q", raw)
    order_path = os.path.join(store_dir, "order.ninja")
    order = _read_text(order_path, "order") if os.path.exists(order_path) else "C"
    if order not in ("C", "F"):
        raise ValueError(f"{order_path}: order must be 'C' or 'F', found {order!r}")
    return dtype, shape, order


def _write_meta(store_dir, dtype, shape, order="C", kind="numpy", durable=False, part=False):
    """Create a numpy store's metadata; type.ninja comes last, so its presence means 'complete'
    (written atomically, unless the store is part of one being created, whose own type.ninja
    decides). A data file already there is kept."""
    os.makedirs(store_dir, exist_ok=True)
    join = os.path.join
    _write_new(join(store_dir, "dtype.ninja"), _dtype_to_text(dtype, store_dir).encode(), durable)
    _write_new(join(store_dir, "shape.ninja"), b"".join(_U64.pack(int(a)) for a in shape), durable)
    _write_new(join(store_dir, "order.ninja"), order.encode(), durable)
    os.close(os.open(join(store_dir, "data.ninja"), os.O_WRONLY | os.O_CREAT, 0o666))
    (_write_new if part else _write_atomic)(join(store_dir, "type.ninja"), kind.encode(), durable)


def _open_fd(path, writable):
    try:
        return os.open(path, (os.O_RDWR | os.O_CREAT) if writable else os.O_RDONLY, 0o666)
    except PermissionError as e:
        raise PermissionError(f"cannot open {path} for {'writing' if writable else 'reading'}: "
                              f"{e.strerror}; check the store's file permissions") from None


def _map(path, nbytes, access=mmap.ACCESS_READ, what="data"):
    """Map the first nbytes of path (None for 0 bytes, which mmap cannot map)."""
    fd = _open_fd(path, access == mmap.ACCESS_WRITE)
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise ValueError(f"{path} holds {size} bytes but its metadata needs {nbytes}: the "
                             f"{what} file is truncated or the store is damaged")
        return mmap.mmap(fd, nbytes, access=access, **_MMAP_KW) if nbytes else None
    finally:
        os.close(fd)


def _int64_view(mm, n):
    """Fast int64 lookups over the first n entries of a map (n fixed: the store's snapshot)."""
    if mm is None or n == 0:
        return memoryview(b"").cast("q") if _NATIVE_LITTLE else np.zeros(0, "<i8")
    if _NATIVE_LITTLE:
        return memoryview(mm)[: 8 * n].cast("q")
    return np.frombuffer(mm, "<i8", n)


_DTYPE, _SHAPE, _SIZE, _NBYTES = (operator.attrgetter(name) for name in ("dtype", "shape", "size", "nbytes"))


def _pack(arrays, nbytes):
    """Samples' bytes (nbytes in all) for os.writev: one joined buffer when they are small (a
    1 MB sample is written from its own memory rather than copied)."""
    if len(arrays) > 1 and nbytes < len(arrays) << 16:
        try:
            return [b"".join(arrays)]
        except (TypeError, ValueError, BufferError):  # non-contiguous or buffer-less samples
            pass
    return arrays


def _buffer(chunk):
    """chunk as a C-contiguous buffer for os.writev (numpy exports none for datetimes)."""
    if isinstance(chunk, np.ndarray) and (chunk.dtype.kind in "MmV" or not chunk.flags.c_contiguous):
        return np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
    return chunk


def _write_all(fd, offset, chunks):
    """Write chunks (bytes-like) at offset; torn bytes a killed writer left past it are dropped.
    Returns the offset after the last byte written."""
    if os.lseek(fd, 0, os.SEEK_END) > offset:  # the size, cheaper than fstat between writes
        os.ftruncate(fd, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return offset + _write_here(fd, chunks)


def _write_here(fd, chunks):
    """Write chunks at the descriptor's current position; returns the byte count."""
    buffers = [_buffer(c) for c in chunks]
    sizes = [b.nbytes if isinstance(b, np.ndarray) else len(b) for b in buffers]
    total, done = sum(sizes), 0
    while done < len(buffers):
        group = buffers[done:done + 1024]
        if hasattr(os, "writev"):  # one system call for many small samples
            written = os.writev(fd, group)
        else:  # pragma: no cover - Windows
            written = os.write(fd, group[0])
        while done < len(buffers) and written >= sizes[done]:
            written -= sizes[done]
            done += 1
        if written:  # a partial write (rare): continue inside this buffer
            rest = memoryview(buffers[done]).cast("B")[written:]
            buffers[done], sizes[done] = rest, rest.nbytes
    return total


def _pread(fd, size, offset):
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows has no pread
    return os.read(fd, size)


def _set_length(fd, n):
    """Commit a store's first-axis length: one 8-byte in-place write no killed process can tear."""
    if hasattr(os, "pwrite"):
        written = os.pwrite(fd, _U64.pack(n), 0)
    else:  # pragma: no cover - Windows
        os.lseek(fd, 0, os.SEEK_SET)
        written = os.write(fd, _U64.pack(n))
    if written != 8:  # pragma: no cover - never seen for 8 bytes
        raise OSError(f"short write committing length {n}")


def _as_sample(value, path, dtype=None):
    """value as an ndarray that can be stored; refuses objects and impossible casts up front."""
    if type(value) is np.ndarray and (dtype is None or value.dtype == dtype) and not value.dtype.hasobject:
        return value  # the common case, checked cheaply
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists and the like
        raise TypeError(f"{path}: cannot store {type(value).__name__} value as an array: {e}") from None
    if arr.dtype.hasobject:
        raise TypeError(f"{path}: sample {_short(value)} is not array-like (numpy gives it "
                        f"object dtype); samples must be numeric, bool, bytes or str arrays")
    if dtype is not None and arr.dtype != dtype:
        lossy = not np.can_cast(arr.dtype, dtype, casting="same_kind")
        if dtype.kind in "USV" and arr.dtype.kind == dtype.kind:  # would silently truncate
            lossy = lossy or arr.dtype.itemsize > dtype.itemsize
        if not lossy and arr.dtype.kind in "iu" and dtype.kind in "iu" and arr.size:
            info = np.iinfo(dtype)  # integers must fit: no silent wrap-around
            lossy = int(arr.min()) < info.min or int(arr.max()) > info.max
        if lossy:
            raise TypeError(f"{path}: cannot store a sample of dtype {arr.dtype} in a store of "
                            f"dtype {dtype} without losing values; convert it first")
        arr = arr.astype(dtype)
    return arr


def _short(value):
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


class _Lock:
    """flock on a store's directory: one writer at a time, across processes and objects. The
    directory stays open between uses (a writer appends many times); close() lets it go."""

    def __init__(self, store_dir):
        self.store_dir, self.fd, self.held = store_dir, None, False

    def __enter__(self):
        if fcntl is not None:
            try:
                if self.fd is None:
                    self.fd = os.open(self.store_dir, os.O_RDONLY)
                fcntl.flock(self.fd, fcntl.LOCK_EX)
                self.held = True
            except OSError:  # a file system without flock: carry on unlocked
                pass
        return self

    def __exit__(self, *exc):
        if self.held:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.held = False

    def close(self):
        self.__exit__()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


###################################################################################################
# Progress: tqdm when installed, otherwise a small text bar on stderr
###################################################################################################

def _progress(iterable, total=None, desc="", verbose=False):
    if not verbose:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc)


class _TextBar:
    """ASCII progress on one stderr line, redrawn at most every 0.1 s; never fails the job."""

    def __init__(self, iterable, total=None, desc="", stream=None, interval=0.1):
        self.iterable, self.total, self.desc = iterable, total, desc
        self.stream = stream if stream is not None else sys.stderr
        self.interval, self.width = interval, 0

    def __iter__(self):
        start = last = time.monotonic()
        count = 0
        try:
            for count, item in enumerate(self.iterable, 1):
                yield item
                now = time.monotonic()
                if now - last >= self.interval:
                    self._draw(count, now - start)
                    last = now
        finally:
            self._draw(count, time.monotonic() - start, end="\n")

    def _draw(self, count, elapsed, end=""):
        rate = count / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: " if self.desc else ""
        if self.total:
            eta = (self.total - count) / rate if rate else 0.0
            text += f"{100 * count / self.total:3.0f}% {count}/{self.total} [{rate:.1f} it/s, ETA {eta:.0f}s]"
        else:
            text += f"{count} [{rate:.1f} it/s]"
        pad = " " * max(0, self.width - len(text))
        self.width = len(text)
        try:
            self.stream.write("\r" + text + pad + end)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not kill the conversion
            pass


###################################################################################################
# base: Wrapped and indexing helpers
###################################################################################################

def _copy(sample):
    return np.array(sample, copy=True) if isinstance(sample, np.ndarray) else sample


def _is_int(item):
    return isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_))


def _indices(item, n, path):
    """A slice, list/array of ints or boolean mask as an int64 array of non-negative indices."""
    if isinstance(item, slice):
        return np.arange(*item.indices(n), dtype=np.int64)
    idx = np.asarray(item)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"{path}: boolean mask of shape {idx.shape} does not match the "
                             f"store's {n} samples")
        return np.flatnonzero(idx)
    if idx.size == 0:
        return np.zeros(0, np.int64)
    if idx.dtype.kind not in "iu" or idx.ndim != 1:
        raise TypeError(f"{path}: index must be an int, a slice, a 1-D list/array of ints or a "
                        f"boolean mask, got {_short(item)}")
    idx = idx.astype(np.int64, copy=False)
    if idx.view(np.uint64).max() < n:  # the common case, one reduction: negatives wrap to huge
        return idx
    bad = (idx < -n) | (idx >= n)
    if bad.any():
        raise IndexError(f"{path}: index {int(idx[bad][0])} is out of range for {n} samples")
    return np.where(idx < 0, idx + n, idx)


class _Windows(dict):
    """Strided views of a ragged store's data, one per trailing shape t = (a1, ..., ak) of its
    samples, made on first use: window[o, q] is the t-shaped block that starts at element
    q*row + o, where row = a1*...*ak. A sample of shape (a0, *t) that starts at element s is
    then one indexing step, window[s % row, s // row : s // row + a0], where slicing and
    reshaping take two (each view costs numpy ~130 ns). Keys pack t into one int."""

    def __init__(self, data, columns, lo, hi):
        super().__init__()
        self.data, self.columns = data, columns  # the store's shapes, axis by axis
        # no sample reaches further than its start plus this past the end of its window's row
        self.reach = math.prod(hi.tolist()) + math.prod(hi[1:].tolist())
        self.axes = len(columns) - 1
        self.bits = 62 // self.axes  # per axis of t in a key
        lo, hi = lo[1:].tolist(), hi[1:].tolist()  # each trailing axis's least and greatest length
        # no window for a zero-size row, nor for axes too long to pack into a key
        self.usable = data.itemsize > 0 and min(lo) > 0 and max(hi) < 1 << self.bits
        self.row = math.prod(hi) if lo == hi else None  # when every sample has this t
        self.code = sum(a << (self.bits * j) for j, a in enumerate(hi))

    def __missing__(self, code):
        mask = (1 << self.bits) - 1
        trailing = tuple((code >> (self.bits * j)) & mask for j in range(self.axes))
        row, size = math.prod(trailing), self.data.itemsize
        # q + a0 <= count keeps every view inside the data (checked by the caller)
        count = max((len(self.data) - row + 1) // row, 0)
        inner = tuple(size * math.prod(trailing[j + 1:]) for j in range(self.axes))
        window = np.lib.stride_tricks.as_strided(self.data, (row, count) + trailing, (size, row * size) + inner)
        self[code] = window
        return window


# get_padded gathers images through tables of byte masks only while a table stays this small
_PAD_MASKS_MAX = 1 << 20


@functools.lru_cache(maxsize=4)
def _pad_plan(rows, cols, c, size):
    """What get_padded needs for blocks of rows x cols x c elements of `size` bytes, made once:
    steps[w], the element offsets w*c*r of rows r = 0..rows-1 of a sample w wide, and
    masks[h, w], a void item of one block's bytes that is 0xFF where a sample (h, w, c) has
    elements and 0 elsewhere. The masks view one table holding, for each w, `rows` copies of
    its row then `rows` zero rows, so that every h is a contiguous span (read with stride -line)."""
    line = cols * c * size  # bytes per row of a block
    table = np.zeros((cols + 1, 2 * rows, line), np.uint8)
    table[:, :rows] = np.arange(line) < (np.arange(cols + 1) * c * size)[:, None, None]
    table *= 255
    span = rows * line
    h0w0 = table.reshape(-1)[span:2 * span].view(("V", span))  # all zeros: h = 0, w = 0
    masks = np.lib.stride_tricks.as_strided(h0w0, (rows + 1, cols + 1), (-line, 2 * span), writeable=False)
    steps = np.multiply.outer(np.arange(cols + 1, dtype=np.int64) * c, np.arange(rows, dtype=np.int64))
    steps.flags.writeable = False
    return masks, steps


class Wrapped:
    """Apply ``wrapper_fn`` lazily to each sample of ``data`` on ``__getitem__``.

    By default the sample is copied first, so ``wrapper_fn`` gets a writable array it owns
    (``torch.from_numpy`` then warns about nothing). A slice or list index gives a list.
    Pickles small when ``data`` is one of this module's stores.
    """

    def __init__(self, data, wrapper_fn, copy_before_wrapper_fn=True):
        self.data = data
        self.wrapper_fn = wrapper_fn
        self.copy_before_wrapper_fn = copy_before_wrapper_fn

    def _wrap(self, sample):
        return self.wrapper_fn(_copy(sample) if self.copy_before_wrapper_fn else sample)

    def __getitem__(self, item):
        if _is_int(item):
            return self._wrap(self.data[item])
        return [self._wrap(self.data[int(i)]) for i in _indices(item, len(self.data), "Wrapped")]

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for i in range(len(self.data)):
            yield self._wrap(self.data[i])

    def __repr__(self):
        return f"Wrapped({self.data!r}, {self.wrapper_fn!r})"


###################################################################################################
# numpy: a np.memmap per store
###################################################################################################

class _NinjaMemmap(np.memmap):
    """The np.memmap the numpy API returns. The array itself pickles as its directory (a few
    hundred bytes, reopened on load); its slices and views pickle as ordinary arrays."""

    _ninja_dir = None  # set only on the array np_open_existing returns, not on its views

    def __reduce__(self):
        if self._ninja_dir is None:
            return np.array(self).__reduce__()
        return (_reopen_memmap, (self._ninja_dir, self.mode, self.shape))


def _reopen_memmap(out_dir, mode, shape):
    return _open_memmap(out_dir, mode, rows=shape[0] if shape else None)


def _open_memmap(out_dir, mode="r", rows=None):
    out_dir = os.fspath(out_dir)
    if mode not in ("r", "r+", "c"):
        raise ValueError(f"{out_dir}: mode must be 'r', 'r+' or 'c', got {mode!r}")
    kind = _read_kind(out_dir)
    if kind != "numpy":
        raise ValueError(f"{out_dir} is a {kind} store, not a numpy store; open it with "
                         f"mmap_ninja.open_existing")
    dtype, shape, order = _read_meta(out_dir)
    if rows is not None and shape:
        shape = (min(rows, shape[0]),) + shape[1:]
    path = os.path.join(out_dir, "data.ninja")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:  # mmap cannot map nothing; an empty memmap-typed array stands in
        arr = np.ndarray.__new__(_NinjaMemmap, shape, dtype, order=order)
        arr.filename, arr.mode, arr.offset, arr._mmap = os.path.abspath(path), mode, 0, None
    else:
        _map(path, nbytes, what="data").close()  # the clear error for a short file
        arr = _NinjaMemmap(path, dtype=dtype, mode=mode, shape=shape, order=order)
    arr._ninja_dir = os.path.abspath(out_dir)
    return arr


def np_open_existing(out_dir, mode="r"):
    """Open the numpy store in ``out_dir`` as a ``np.memmap`` (``mode`` "r", "r+" or "c")."""
    return _open_memmap(out_dir, mode)


def np_empty(out_dir, dtype, shape, order="C"):
    """Create a numpy store of zeros and return it as a writable ``np.memmap``."""
    out_dir = os.fspath(out_dir)
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(a) for a in shape)
    _clear_store(out_dir)
    _write_meta(out_dir, dtype, (0,) + shape[1:] if shape else (), order)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    with open(os.path.join(out_dir, "data.ninja"), "r+b") as f:
        f.truncate(nbytes)
    if shape:
        fd = _open_fd(os.path.join(out_dir, "shape.ninja"), True)
        try:
            _set_length(fd, shape[0])
        finally:
            os.close(fd)
    return _open_memmap(out_dir, "r+")


def np_from_ndarray(out_dir, arr):
    """Write ``arr`` as a numpy store in ``out_dir``; returns it as a writable ``np.memmap``."""
    out_dir = os.fspath(out_dir)
    arr = _as_sample(arr, out_dir)
    _clear_store(out_dir)
    order = "F" if arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
    if arr.ndim == 0:
        _write_meta(out_dir, arr.dtype, (), order)
        with open(os.path.join(out_dir, "data.ninja"), "wb") as f:
            f.write(arr.tobytes())
        return _open_memmap(out_dir, "r+")
    _write_meta(out_dir, arr.dtype, (0,) + arr.shape[1:], order)
    with _NumpyWriter(out_dir, creating=True) as writer:
        writer.write([np.asarray(arr, order=order).reshape(-1, order="A")], arr.shape[0])
    return _open_memmap(out_dir, "r+")


def np_from_generator(out_dir, sample_generator, batch_size, verbose=False):
    """Stack the samples of a generator into a numpy store; at most one batch is held in memory
    and the store is committed every ``batch_size`` samples."""
    out_dir = os.fspath(out_dir)
    batch_size = _check_batch_size(batch_size)
    writer = None
    batch = []
    try:
        for sample in _progress(sample_generator, desc="numpy", verbose=verbose):
            if writer is None:
                first = _as_sample(sample, out_dir)
                _clear_store(out_dir)
                _write_meta(out_dir, first.dtype, (0,) + first.shape)
                writer = _NumpyWriter(out_dir).__enter__()
            batch.append(sample)
            if len(batch) == batch_size:
                writer.extend_rows(batch)
                batch = []
        if writer is None:
            raise ValueError(f"{out_dir}: the generator yielded no samples, so the store's dtype "
                             f"and shape cannot be inferred; use np_empty(out_dir, dtype, shape)")
        if batch:
            writer.extend_rows(batch)
    finally:
        if writer is not None:
            writer.__exit__()
    return _open_memmap(out_dir, "r+")


def np_extend_dir(out_dir, arr, durable=False):
    """Append the rows of ``arr`` to the numpy store in ``out_dir`` (crash-safe, O(len(arr))).
    Arrays already open keep their length (a snapshot); ``np_open_existing`` sees the rows."""
    out_dir = os.fspath(out_dir)
    with _NumpyWriter(out_dir, durable) as writer:
        writer.extend(arr)


def np_extend(np_mmap, arr, durable=False):
    """Append the rows of ``arr`` to the store that ``np_mmap`` was opened from."""
    np_extend_dir(_memmap_dir(np_mmap), arr, durable)


def np_append(np_mmap, sample, durable=False):
    """Append one sample (one row) to the store that ``np_mmap`` was opened from."""
    out_dir = _memmap_dir(np_mmap)
    np_extend_dir(out_dir, np.expand_dims(_as_sample(sample, out_dir), 0), durable)


def _memmap_dir(np_mmap):
    filename = getattr(np_mmap, "filename", None)
    if not filename:
        raise TypeError(f"expected a np.memmap opened by mmap_ninja, got {type(np_mmap).__name__}")
    return os.path.dirname(filename)


class _NumpyWriter:
    """Appends rows to one numpy store: write the bytes past the end, then commit the length."""

    def __init__(self, out_dir, durable=False, creating=False):
        self.out_dir = out_dir
        self.durable = durable
        self.creating = creating  # a new Fortran-order store is written whole, once
        self.lock = _Lock(out_dir)

    def __enter__(self):
        if _read_kind(self.out_dir) != "numpy":
            raise ValueError(f"{self.out_dir} is not a numpy store; only numpy stores extend by rows")
        self.lock.__enter__()
        try:
            self.dtype, shape, order = _read_meta(self.out_dir)
            if not shape:
                raise ValueError(f"{self.out_dir}: a 0-d store has no axis to append along")
            if order == "F" and len(shape) > 1 and not self.creating:
                raise ValueError(f"{self.out_dir}: appending to a Fortran-order store of "
                                 f"{len(shape)} dimensions would rewrite every byte; recreate it "
                                 f"from a C-order array (np.ascontiguousarray)")
            self.rows, self.tail = shape[0], shape[1:]
            self.fd = _open_fd(os.path.join(self.out_dir, "data.ninja"), True)
            self.shape_fd = _open_fd(os.path.join(self.out_dir, "shape.ninja"), True)
        except BaseException:
            self.lock.close()
            raise
        return self

    def __exit__(self, *exc):
        for fd in (getattr(self, "fd", None), getattr(self, "shape_fd", None)):
            if fd is not None:
                os.close(fd)
        self.fd = self.shape_fd = None
        self.lock.close()

    def extend(self, arr):
        arr = _as_sample(arr, self.out_dir, self.dtype)
        if arr.ndim == 0 or arr.shape[1:] != self.tail:
            raise ValueError(f"{self.out_dir}: cannot extend a store of shape "
                             f"{(self.rows,) + self.tail} with an array of shape {arr.shape}: "
                             f"rows must have shape {self.tail}")
        self.write([arr], arr.shape[0])

    def extend_rows(self, samples):
        """Append samples (each one row) without stacking them into a new array first."""
        rows = samples  # checked one by one only when the cheap checks (in C) do not pass
        if set(map(type, rows)) != {np.ndarray} or set(map(_DTYPE, rows)) != {self.dtype}:
            rows = [_as_sample(s, self.out_dir, self.dtype) for s in samples]
        if set(map(_SHAPE, rows)) != {self.tail}:
            bad = next(row.shape for row in rows if row.shape != self.tail)
            raise ValueError(f"{self.out_dir}: every sample must have shape {self.tail} "
                             f"(the first sample's), got {bad}")
        self.write(rows, len(rows))

    def write(self, chunks, rows):
        """chunks: C-order arrays (or, for a Fortran store's creation, flat bytes) of `rows` rows;
        many small ones are joined into one buffer first (_pack)."""
        rowbytes = int(np.prod(self.tail, dtype=np.int64)) * self.dtype.itemsize
        _write_all(self.fd, self.rows * rowbytes, _pack(chunks, rows * rowbytes))
        if self.durable:
            os.fsync(self.fd)
        self.rows += rows
        _set_length(self.shape_fd, self.rows)
        if self.durable:
            os.fsync(self.shape_fd)


###################################################################################################
# ragged: RaggedMmap, a sequence of arrays of different shapes
###################################################################################################

class _Column:
    """The writer's side of one numpy store inside a ragged or strings store (data, starts,
    ends, ...): its data and shape.ninja descriptors stay open between appends."""

    def __init__(self, store_dir, itemsize=8, raw=False):
        self.data_path = os.path.join(store_dir, "data.ninja")
        self.shape_path = None if raw else os.path.join(store_dir, "shape.ninja")
        self.itemsize = itemsize
        self.fd = self.shape_fd = self.pos = None

    def write(self, offset_items, chunks, total_items, durable):
        offset = offset_items * self.itemsize
        if self.fd is None:
            self.fd = _open_fd(self.data_path, True)
        if self.pos == offset:  # we wrote up to here and nobody has since (see _RaggedWriter.sync)
            self.pos = offset + _write_here(self.fd, chunks)
        else:  # checks the size and drops a dead writer's torn bytes
            self.pos = _write_all(self.fd, offset, chunks)
        if durable:
            os.fsync(self.fd)
        self.new_length = offset_items + total_items

    def commit(self, durable):
        if self.shape_path is not None:
            if self.shape_fd is None:
                self.shape_fd = _open_fd(self.shape_path, True)
            _set_length(self.shape_fd, self.new_length)
            if durable:
                os.fsync(self.shape_fd)

    def close(self):
        for fd in (self.fd, self.shape_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.shape_fd = self.pos = None


def _last_end(store_dir, n):
    """ends[n-1] of the ragged or strings store in store_dir (0 when empty)."""
    if n == 0:
        return 0
    fd = _open_fd(os.path.join(store_dir, "ends", "data.ninja"), False)
    try:
        raw = _pread(fd, 8, (n - 1) * 8)
    finally:
        os.close(fd)
    if len(raw) != 8:
        raise ValueError(f"{store_dir}/ends/data.ninja is shorter than its {n} samples: damaged")
    return _U64.unpack(raw)[0]


def _count(store_dir):
    """The committed number of samples of a ragged or strings store: len(starts)."""
    raw = _read_bytes(os.path.join(store_dir, "starts", "shape.ninja"), "sample count")
    if len(raw) < 8:
        raise ValueError(f"{store_dir}/starts/shape.ninja is {len(raw)} bytes: the sample count "
                         f"is damaged")
    return _U64.unpack_from(raw)[0]


def _shapes_dir(store_dir):
    """Where the shapes of a ragged store live; a writer killed while converting flat shapes
    to ragged ones may have left them complete under shapes.new."""
    path = os.path.join(store_dir, "shapes")
    if not os.path.isdir(path) and os.path.isdir(path + ".new"):
        return path + ".new"
    return path


def _create_ragged(store_dir, dtype, nested, raw=False, zstd=None, durable=False, part=False):
    """Metadata of an empty ragged (or strings, raw=True) store; type.ninja is written last
    (atomically, unless the store is part of one being created). Its parts' files are written
    in place: a store being created is not one until its type.ninja exists."""
    os.makedirs(store_dir, exist_ok=True)
    for name in ("starts", "ends") + (() if raw else ("flattened_shapes",)):
        _write_meta(os.path.join(store_dir, name), np.int64, (0,), durable=durable, part=True)
    if raw:
        if zstd is not None:
            level, dictionary = zstd
            if dictionary is not None:
                _write_new(os.path.join(store_dir, "zstd_dict.ninja"), dictionary, durable)
            _write_new(os.path.join(store_dir, "zstd_level.ninja"), str(level).encode(), durable)
        os.close(os.open(os.path.join(store_dir, "data.ninja"), os.O_WRONLY | os.O_CREAT, 0o666))
        _write_atomic(os.path.join(store_dir, "type.ninja"), b"string", durable)
        return
    shapes = os.path.join(store_dir, "shapes")
    if nested:
        _create_ragged(shapes, np.int64, nested=False, durable=durable, part=True)
    else:
        _write_meta(shapes, np.int64, (0, 1), durable=durable, part=True)
    _write_new(os.path.join(store_dir, "shapes_are_flat.ninja"), _I32.pack(0 if nested else 1), durable)
    _write_meta(store_dir, dtype, (0,), kind="ragged", durable=durable, part=part)


class _RaggedWriter:
    """Appends samples to a ragged store (or the raw bytes of a strings store) in place.

    Everything is written past the committed end first; then the lengths are committed in the
    order data, shapes, flattened_shapes, ends, starts, so that len(starts) (the sample count)
    moves last. A nested shapes store is written the same way, before its parent's counts.
    Descriptors and the count stay cached between appends; ``sync`` (under the store's lock)
    re-reads them when another writer has been at the store.
    """

    def __init__(self, store_dir, durable=False, raw=False):
        self.store_dir, self.durable, self.raw = store_dir, durable, raw
        self.n = None  # the count this writer last saw committed; None: read it again
        self.lock = _Lock(store_dir)
        self.columns = {}
        self.nested = None
        self.shapes_ino = None

    def sync(self, n=None):
        """Make the cached state match the disk; n: the parent's count for a nested store."""
        d = self.store_dir
        if n is None:
            if "starts" not in self.columns:
                n = _count(d)
            else:  # one pread: has anyone else committed since?
                n = _U64.unpack(_pread(self._col("starts").shape_fd, 8, 0))[0]
        shapes_dir = os.path.join(d, "shapes")
        try:  # another writer converting shapes/ to a ragged store replaces the directory
            ino = None if self.raw else os.stat(shapes_dir).st_ino
        except FileNotFoundError:
            ino = -1
        # Re-read everything when another writer committed, replaced shapes/, or may have set an
        # empty store's dtype; or when the data file does not end where we left it: a writer
        # died after writing part of a batch. (lseek to the end gives the size; on ext4 here an
        # fstat between writes cost ~7 us, the lseek 0.3.)
        data = self.columns.get("data")
        moved = data is not None and data.pos is not None and os.lseek(data.fd, 0, os.SEEK_END) != data.pos
        if n != self.n or n == 0 or ino != self.shapes_ino or moved:
            self.close()
            self.end = _last_end(d, n)
            self.n = n
            if not self.raw:
                _repair_shapes(d)
                self.dtype = _read_meta(d)[0]
                self.shapes_ino = os.stat(shapes_dir).st_ino
                if os.path.isdir(os.path.join(shapes_dir, "starts")):
                    self.nested = _RaggedWriter(shapes_dir, self.durable)
                    self.nested.sync(n)
        return n

    def _col(self, name):
        column = self.columns.get(name)
        if column is None:
            if name == "data":
                itemsize = 1 if self.raw else self.dtype.itemsize
                column = _Column(self.store_dir, itemsize, raw=self.raw)
            else:
                column = _Column(os.path.join(self.store_dir, name))
            if name == "starts":
                column.shape_fd = _open_fd(column.shape_path, True)
            self.columns[name] = column
        return column

    def append(self, payload, sizes, shapes):
        """Append after the cached count (call sync first). payload: byte chunks; sizes: element
        counts (None: from the shapes); shapes: the samples' shape tuples, or an int64 array of
        lengths for 1-D samples (None for a strings store). Returns the new count."""
        n, start = self.n, self.end
        lengths = shapes  # (a strings store has none)
        if self.nested is not None:  # the shapes are the samples of the nested store
            dims = list(map(len, shapes))
            flat_shapes = np.fromiter(itertools.chain.from_iterable(shapes), np.int64, sum(dims))
            if sizes is None and len(dims) > 64 and dims.count(dims[0]) == len(dims):
                sizes = flat_shapes.reshape(len(dims), dims[0]).prod(axis=1)  # one ndim: vectorized
            elif sizes is None:
                sizes = list(map(math.prod, shapes))
            dims = np.array(dims, np.int64)
        elif not (self.raw or isinstance(shapes, np.ndarray)):
            # a 0-d sample is recorded as length 0 with 1 element (the published layout)
            lengths = np.fromiter((s[0] if s else 0 for s in shapes), np.int64, len(shapes))
        sizes = np.asarray(sizes, np.int64)
        offsets = np.empty(len(sizes) + 1, np.int64)
        offsets[0] = start
        np.cumsum(sizes, out=offsets[1:])
        offsets[1:] += start
        data = self._col("data")
        payload = _pack(payload, int(offsets[-1] - start) * data.itemsize)
        data.write(start, payload, int(offsets[-1] - start), self.durable)
        data.commit(self.durable)
        if not self.raw:
            if self.nested is not None:
                self.nested.append([flat_shapes], dims, dims)
            else:
                self._column("shapes", n, lengths)
            self._column("flattened_shapes", n, sizes)
        self._column("ends", n, offsets[1:])
        self._column("starts", n, offsets[:-1])  # the commit point
        self.n, self.end = n + len(sizes), int(offsets[-1])
        return self.n

    def _column(self, name, n, values):
        column = self._col(name)
        column.write(n, [values.astype("<i8")], len(values), self.durable)
        column.commit(self.durable)

    def close(self):
        for column in self.columns.values():
            column.close()
        self.columns = {}
        if self.nested is not None:
            self.nested.close()
            self.nested = None
        self.n = None

    def __del__(self):  # raw descriptors are not closed by the garbage collector
        self.close()
        self.lock.close()


def _write_new_ragged(store_dir, arrays, durable=False):
    """Fill a just-created empty ragged store with arrays."""
    writer = _RaggedWriter(store_dir, durable)
    try:
        writer.sync()
        writer.append(arrays, [a.size for a in arrays], [a.shape for a in arrays])
    finally:
        writer.close()


def _convert_shapes_to_nested(store_dir, n, durable=False):
    """A flat store receives a sample of 2+ dimensions: rebuild shapes/ as a ragged store.
    Built completely under shapes.new, then swapped in by renames (readers fall back to
    shapes.new in the instant between them)."""
    join = os.path.join
    old, new, trash = join(store_dir, "shapes"), join(store_dir, "shapes.new"), join(store_dir, "shapes.old")
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)
    lengths = _read_int64(join(old, "data.ninja"), n)
    sizes = _read_int64(join(store_dir, "flattened_shapes", "data.ninja"), n)
    shapes = [() if (length == 0 and size == 1) else (int(length),) for length, size in zip(lengths, sizes)]
    _create_ragged(new, np.int64, nested=False, durable=durable)
    _write_new_ragged(new, [np.asarray(s, np.int64) for s in shapes], durable)
    os.rename(old, trash)
    os.rename(new, old)
    _write_atomic(join(store_dir, "shapes_are_flat.ninja"), _I32.pack(0), durable)
    shutil.rmtree(trash, ignore_errors=True)


def _read_int64(path, n):
    with open(path, "rb") as f:
        raw = f.read(8 * n)
    if len(raw) != 8 * n:
        raise ValueError(f"{path} holds fewer than the {n} entries its store needs: damaged")
    return np.frombuffer(raw, "<i8").tolist()


def _repair_shapes(store_dir):
    """Finish a conversion that a killed writer left half done (writers only)."""
    join = os.path.join
    shapes, new = join(store_dir, "shapes"), join(store_dir, "shapes.new")
    if not os.path.isdir(shapes) and os.path.isdir(new):
        os.rename(new, shapes)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(join(store_dir, "shapes.old"), ignore_errors=True)
    nested = os.path.isdir(join(shapes, "starts"))
    flag_path = join(store_dir, "shapes_are_flat.ninja")
    if os.path.exists(flag_path) and _read_bytes(flag_path, "flatness flag") != _I32.pack(0 if nested else 1):
        _write_atomic(flag_path, _I32.pack(0 if nested else 1))


class _Sequence:
    """What RaggedMmap and StringsMmap share: opening, snapshots, indexing forms, pickling by
    path (reopened lazily in the receiving process), close() and ``with``."""

    _kind = None
    # Note for maintainers: no __getattr__ and no self.__dict__ here. Either one stops CPython
    # from specializing attribute access, which costs ~70 ns on every __getitem__.

    def __getstate__(self):
        state = {key: getattr(self, key) for key in self._config_keys}
        state["_n"] = self._n  # the receiver sees the sender's snapshot
        return state

    def __setstate__(self, state):
        """Unpickled (in a worker, say): nothing is mapped until the first read."""
        self._init_state()
        for key, value in state.items():
            setattr(self, key, value)

    def _init_state(self):
        self._writer, self._closed, self._maps, self._n = None, False, [], 0
        self._dtype = self._zstd = None
        self._nested = False
        # which samples of a nested store have been checked to have their shapes at regular
        # positions (see RaggedMmap._shape_rows): (shape files' identity, ndim or -1, count,
        # each axis's least and greatest length)
        self._regular = (None, None, 0, None, None)
        self._release(keep_writer=True)

    def _unmap(self):
        """Inert state: the hot path misses (IndexError) and _ensure_mapped maps the files."""
        self._mapped = 0
        self._loaded = False
        self._starts = self._ends = _int64_view(None, 0)
        self._np_views = None

    def _release(self, keep_writer=False):
        if self._writer is not None and not keep_writer:
            self._writer.__del__()
            self._writer = None
        maps, self._maps = self._maps, []
        self._unmap()
        self._data = self._buf = self._shape_data = self._shape_starts = self._shape_ends = None
        self._flat_shapes = self._shapes_id = None
        for mm in maps:
            try:
                mm.close()
            except BufferError:  # a sample the caller still holds views this map; GC closes it
                pass

    def close(self):
        """Release the maps and descriptors. Samples already returned stay valid until dropped."""
        self._release()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        return self._n

    def __iter__(self):
        n = self._n
        for start in range(0, n, 256):  # batch reads: cheaper per sample than self[i]
            yield from self._get_other(slice(start, min(start + 256, n)))

    def _get(self, i):
        """Sample i (0 <= i < len): maps what this object appended since it last mapped."""
        if i >= self._mapped:
            self._ensure_mapped(i + 1)
        return self[i]

    def _get_other(self, item):
        """Indexing other than by a Python int (the subclasses' hot path): a list of samples."""
        if _is_int(item):
            return self[int(item)]
        self._map_all()
        if type(item) is list and item and len(item) != self._n and type(item[0]) is not bool:
            try:  # the lookups themselves check each key's type and range (negatives wrap)
                columns = self._lookup(item, "_starts", "_ends")
            except (IndexError, TypeError):
                columns = None  # _indices below says what is wrong
            if columns is not None:
                return self._build(item, columns)
        return self._batch(_indices(item, self._n, self.out_dir))

    def _batch(self, idx):
        """Samples idx (an int64 array of indices already checked against len(self))."""
        self._map_all()
        return self._build(idx, self._lookup(idx, "_starts", "_ends")) if len(idx) else []

    def _lookup(self, keys, *names):
        """column[k] for k in keys, for each named int64 view: a numpy gather for an index
        array, else one itemgetter call (C) over the view."""
        if isinstance(keys, np.ndarray):
            return [self._gather(name, keys).tolist() for name in names]
        get = operator.itemgetter(*keys)
        if len(keys) == 1:
            return [(get(getattr(self, name)),) for name in names]
        return [get(getattr(self, name)) for name in names]

    def _appended(self, n):
        """After an append: the maps no longer cover every sample, so the hot path (which
        indexes them) must miss once and remap."""
        self._n = n
        self._unmap()

    def get_single(self, item):
        return self[int(item)]

    def get_multiple(self, item):
        return self[item]

    def _map_all(self):
        if self._mapped < self._n:
            self._ensure_mapped(self._n)

    def _gather(self, name, idx):
        """column[idx] for an int64 index view, as a numpy array (vectorized batch lookups)."""
        if self._np_views is None:
            self._np_views = {}
        arrays = self._np_views
        view = arrays.get(name)
        if view is None:
            view = arrays[name] = np.asarray(getattr(self, name))
        return view[idx]

    def __setitem__(self, key, value):
        if _is_int(key):
            keys, values = [self._norm_index(int(key))], [value]
        else:
            keys = _indices(key, self._n, self.out_dir).tolist()
            values = list(value)
            if len(values) != len(keys):
                raise ValueError(f"{self.out_dir}: {len(values)} values for {len(keys)} samples")
        writes = [self._encode_replacement(i, v) for i, v in zip(keys, values)]  # all checked first
        fd = _open_fd(os.path.join(self.out_dir, "data.ninja"), True)
        try:
            for offset, chunk in writes:
                os.lseek(fd, offset, os.SEEK_SET)
                os.write(fd, chunk)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _writing(self, dtype=np.float64, nested=False):
        """Hold the store's write lock (creating the store, with dtype and nested shapes, if the
        directory has none) and yield its writer, synced with what other writers committed."""
        d = self.out_dir
        self._check_open()
        writer = self._writer
        if writer is None:
            os.makedirs(d, exist_ok=True)
            writer = self._writer = _RaggedWriter(d, self.durable, raw=self._kind == "string")
        with writer.lock:
            try:
                if not os.path.exists(os.path.join(d, "type.ninja")):
                    _create_ragged(d, dtype, nested, raw=writer.raw, durable=self.durable)
                writer.sync()
                yield writer
            except BaseException:
                writer.close()  # whatever happened, re-read the disk next time
                raise

    def _norm_index(self, i):
        n = self._n
        if not -n <= i < n:
            raise IndexError(f"{self.out_dir}: index {i} is out of range for {n} samples")
        return i + n if i < 0 else i

    def flush(self):
        """fsync every file and directory of the store: committed samples then survive power loss."""
        for root, _, files in os.walk(self.out_dir):
            for path in [os.path.join(root, name) for name in files] + [root]:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def _check_open(self):
        if self._closed:
            raise ValueError(f"{self.out_dir}: the store is closed")

    def _ensure_mapped(self, n_needed):
        if n_needed > self._mapped or not self._loaded:
            self._check_open()
            n = self._n
            self._release(keep_writer=True)
            self._reload(n)

    def _reload(self, snapshot):
        self._load(snapshot)  # the subclass maps its files
        self._loaded = True

    def _map_index(self, snapshot):
        """Map starts/ends for the first `snapshot` samples (all committed ones when None);
        returns (count, end of the last sample), or None when the directory holds no store."""
        d, join = self.out_dir, os.path.join
        self._n = self._mapped = 0  # (the rest was reset by _release)
        if not os.path.exists(join(d, "type.ninja")):
            if os.path.exists(join(d, "starts")):
                raise FileNotFoundError(f"{d}: type.ninja is missing but starts/ exists: the "
                                        f"store is damaged")
            return None
        kind = _read_kind(d)
        if kind != self._kind:
            raise ValueError(f"{d} is a {kind} store, not a {self._kind} store; open it with "
                             f"mmap_ninja.open_existing")
        # Read in the reverse of the commit order: the count first, then what it vouches for
        # (a writer committing meanwhile only makes the later files longer).
        n = _count(d)
        if snapshot is not None:
            n = min(n, snapshot)
        self._starts = self._index(join(d, "starts"), n)
        self._ends = self._index(join(d, "ends"), n)
        return n, (self._ends[n - 1] if n else 0)

    def _index(self, store_dir, n):
        """Map the first n entries of an int64 index store (starts, ends, shapes)."""
        _, shape, _ = _read_meta(store_dir)
        if not shape or shape[0] < n:
            raise ValueError(f"{store_dir} records {shape[0] if shape else 0} entries but the "
                             f"store has {n} samples: the store is damaged")
        mm = _map(os.path.join(store_dir, "data.ninja"), 8 * n, what="index")
        if mm is not None:
            self._maps.append(mm)
        return _int64_view(mm, n)


class RaggedMmap(_Sequence):
    """A sequence of numpy arrays of different shapes (one dtype), memory-mapped from ``out_dir``.

    ``ragged[i]`` is sample i (an ndarray view; a 0-d array for a scalar sample); a slice, a
    list/array of ints or a boolean mask gives a list. ``wrapper_fn`` is applied to each sample
    (to a copy unless ``copy_before_wrapper_fn=False``). ``mode`` "r" gives read-only views, "r+"
    writable ones. An object is a snapshot: its length changes only through its own appends.
    A directory holding no store opens as an empty one that ``append``/``extend`` fill.
    """

    _config_keys = ("out_dir", "wrapper_fn", "mode", "copy_before_wrapper_fn", "durable")
    _kind = "ragged"

    def __init__(self, out_dir, wrapper_fn=None, mode="r", copy_before_wrapper_fn=True, durable=False):
        if mode not in ("r", "r+", "c"):
            raise ValueError(f"{out_dir}: mode must be 'r', 'r+' or 'c', got {mode!r}")
        self.out_dir = os.fspath(out_dir)
        self.wrapper_fn = wrapper_fn
        self.mode = mode
        self.copy_before_wrapper_fn = copy_before_wrapper_fn
        self.durable = durable
        self._init_state()
        self._reload(None)

    def _load(self, snapshot):
        """Map the first `snapshot` samples (all committed ones when None); O(1) in the count."""
        d, join = self.out_dir, os.path.join
        opened = self._map_index(snapshot)
        if opened is None:
            self._dtype, self._data, self._nested = None, np.zeros(0), False
            self._flat_shapes = _int64_view(None, 0)
            return
        n, end = opened
        dtype, data_shape, _ = _read_meta(d)
        if data_shape[0] < end:
            raise ValueError(f"{d}: sample {n - 1} ends at element {end} but the data holds "
                             f"{data_shape[0]}: the store is damaged")
        access = {"r": mmap.ACCESS_READ, "r+": mmap.ACCESS_WRITE, "c": mmap.ACCESS_COPY}[self.mode]
        mm = _map(join(d, "data.ninja"), end * dtype.itemsize, access)
        self._maps.append(mm)
        # through a memoryview, so mmap.close() refuses (BufferError) while any sample is alive;
        # an ndarray made directly on the map would not stop it, and reading would crash
        self._data = np.frombuffer(memoryview(mm), dtype, end) if mm is not None else np.zeros(0, dtype)
        if access == mmap.ACCESS_READ:
            self._data.flags.writeable = False
        self._dtype = dtype
        shapes = _shapes_dir(d)
        self._nested = os.path.isdir(join(shapes, "starts"))
        if self._nested:
            starts_file = os.stat(join(shapes, "starts", "data.ninja"))
            self._shapes_id = (starts_file.st_dev, starts_file.st_ino)
            self._shape_starts = self._index(join(shapes, "starts"), n)
            self._shape_ends = self._index(join(shapes, "ends"), n)
            total = self._shape_ends[n - 1] if n else 0
            self._shape_data = self._index(shapes, total)
        else:
            self._flat_shapes = self._index(shapes, n)
        self._n = self._mapped = n

    def __getitem__(self, item):
        # The hot path, kept to one Python call: the int64 views hold exactly the mapped
        # samples, take Python and numpy ints and wrap negative indices.
        try:
            start = self._starts[item]
            end = self._ends[item]
            sample = self._data[start:end]
        except IndexError:  # out of range, or appended since this object mapped its files
            return self._get(self._norm_index(item))
        except TypeError:  # a slice, a list, a mask: start/end are not ints
            return self._get_other(item)
        if self._nested:
            sample = sample.reshape(self._shape_data[self._shape_starts[item]:self._shape_ends[item]].tolist())
        elif end - start == 1 and not self._flat_shapes[item]:
            sample = sample.reshape(())  # a 0-d sample
        if self.wrapper_fn is None:
            return sample
        return self.wrapper_fn(sample.copy() if self.copy_before_wrapper_fn else sample)

    def _get_other(self, item):
        if self.wrapper_fn is None and not _is_int(item):
            self._map_all()
            if self._nested:  # (flat stores: _Sequence's lookups, then _build)
                return self._views(_indices(item, self._n, self.out_dir))
        return _Sequence._get_other(self, item)

    def _batch(self, idx):
        if self.wrapper_fn is None and self._nested:
            self._map_all()
            return self._views(idx)
        return _Sequence._batch(self, idx)

    def _views(self, idx):
        """Samples idx (an int64 array) of a nested store (mapped), wrapper_fn not applied."""
        rows = self._shape_rows() if len(idx) else None
        views = self._window_views(idx, rows) if rows is not None and rows.shape[1] > 1 else None
        if views is None:
            data, (starts, ends) = self._data, self._lookup(idx, "_starts", "_ends")
            views = [data[s:e].reshape(shape) for s, e, shape in zip(starts, ends, self._shapes_of(idx))]
        return views

    def _window_views(self, idx, rows):
        """Samples idx (mapped) of a store whose samples all have ndim >= 2 dimensions, each
        one indexing step through a _Windows view (0.8x the time of slicing and reshaping);
        None for the rare batch that one of them cannot serve (see the checks below)."""
        data, windows = self._data, self._np_views.get("_windows")
        if windows is None:
            windows = self._np_views["_windows"] = _Windows(data, list(rows.T), *self._regular[3:])
        if not windows.usable:
            return None
        first = windows.columns[0][idx]
        if windows.row is not None:  # one trailing shape in the whole store
            row, code = windows.row, windows.code
        else:  # column by column: numpy's 2-D gathers and short-axis reductions cost more
            trailing = [column[idx] for column in windows.columns[1:]]
            row, code = trailing[0], trailing[0]  # elements per step along the first axis; key
            for j, axis in enumerate(trailing[1:], 1):
                row, code = row * axis, code | (axis << (windows.bits * j))
        starts = self._gather("_starts", idx)
        q, o = np.divmod(starts, row)
        stop = q + first
        # a window holds a sample that ends at least `row - s % row` elements before the end of
        # the data (stop * row + row <= len + 1, see _Windows.__missing__): all but the last
        # few, so the exact check runs only for batches that come near the end
        end = len(data) + 1
        if int(starts.max()) + windows.reach > end and int(((stop + 1) * row).max()) > end:
            return None
        o, q, stop = o.tolist(), q.tolist(), stop.tolist()
        if windows.row is not None:
            window = windows[code]
            return [window[a, b:c] for a, b, c in zip(o, q, stop)]
        return [windows[k][a, b:c] for k, a, b, c in zip(code.tolist(), o, q, stop)]

    def _build(self, keys, columns):
        """Samples keys (mapped), given their (starts, ends): with wrapper_fn, or of a flat store."""
        if self.wrapper_fn is not None:
            return [self[k] for k in keys]
        data = self._data
        starts, ends = columns
        out = [data[s:e] for s, e in zip(starts, ends)]
        for k, (s, e) in enumerate(zip(starts, ends)):
            if e - s == 1 and not self._flat_shapes[keys[k]]:
                out[k] = out[k].reshape(())  # a 0-d sample
        return out

    def _shapes_of(self, keys):
        """The shapes of samples keys (mapped; a list or an int64 array) as lists."""
        if not len(keys):
            return []
        if not self._nested:
            starts, ends, flat = self._lookup(keys, "_starts", "_ends", "_flat_shapes")
            return [[] if (e - s == 1 and not f) else [e - s] for s, e, f in zip(starts, ends, flat)]
        table, a, b = self._shape_table(keys)
        if table is not None:
            return table.tolist()
        shape_data = self._gather("_shape_data", slice(None))
        return [shape_data[x:y].tolist() for x, y in zip(a.tolist(), b.tolist())]

    def _shape_rows(self):
        """Row i is the shape of sample i, as an (n, ndim) int64 array over the map, when every
        mapped sample has ndim dimensions and its shape sits at entries [i*ndim, (i+1)*ndim) of
        the shape data, which is how writers lay such stores out; else None. Batch reads then
        look shapes up with one gather. Each sample is checked once: the store only grows, so
        the verdict is kept across remaps of the same shape files (and redone for new ones)."""
        if self._np_views is None:
            self._np_views = {}
        rows = self._np_views.get("_rows", False)
        if rows is not False:
            return rows
        n = self._mapped
        ident, ndim, checked, lo, hi = self._regular
        if ident != self._shapes_id:
            ndim, checked, lo, hi = None, 0, None, None
        while ndim != -1 and checked < n:  # in chunks: memory stays small for huge stores
            stop = min(checked + (1 << 20), n)
            a = self._gather("_shape_starts", slice(checked, stop))
            b = self._gather("_shape_ends", slice(checked, stop))
            if ndim is None:
                ndim = int(b[0] - a[0])
            expected = np.arange(checked, stop, dtype=np.int64) * ndim
            if not (np.array_equal(a, expected) and np.array_equal(b, expected + ndim)):
                ndim = -1
                break
            # and each axis's least and greatest length, for _Windows
            shapes = self._gather("_shape_data", slice(checked * ndim, stop * ndim)).reshape(stop - checked, ndim)
            lo = shapes.min(axis=0) if lo is None else np.minimum(lo, shapes.min(axis=0))
            hi = shapes.max(axis=0) if hi is None else np.maximum(hi, shapes.max(axis=0))
            checked = stop
        self._regular = (self._shapes_id, ndim, checked, lo, hi)
        rows = None
        if n and ndim != -1:
            rows = self._gather("_shape_data", slice(0, n * ndim)).reshape(n, ndim)
        self._np_views["_rows"] = rows
        return rows

    def _shape_table(self, keys):
        """(shapes of samples keys as an int64 array (len(keys), ndim), or None when their
        numbers of dimensions differ; where each shape starts and ends, unless the shapes are
        regular) for a nested store."""
        rows = self._shape_rows()
        if rows is not None:
            return rows.take(keys, 0), None, None  # take: 3x faster than rows[keys]
        kidx = np.asarray(keys, np.int64)
        a, b = self._gather("_shape_starts", kidx), self._gather("_shape_ends", kidx)
        ndim = int(b[0] - a[0]) if len(a) else 0
        if not (b - a == ndim).all():
            return None, a, b
        return self._gather("_shape_data", slice(None))[a[:, None] + np.arange(ndim)], a, b

    def shape_of(self, i):
        """The shape of sample i, without touching its data."""
        i = self._norm_index(int(i))
        self._ensure_mapped(i + 1)
        if self._nested:
            return tuple(self._shape_data[self._shape_starts[i]:self._shape_ends[i]])
        length = self._ends[i] - self._starts[i]
        return () if length == 1 and self._flat_shapes[i] == 0 else (length,)

    @property
    def dtype(self):
        """The store's dtype (None for a store that holds nothing yet)."""
        self._ensure_mapped(0)
        return self._dtype

    def get_padded(self, indices, pad_value=0):
        """Samples ``indices`` as one array padded to the largest shape, plus their true shapes.

        Returns ``(batch, shapes)``: ``batch`` has shape ``(len(indices), *max_shape)`` and is a
        new writable array; ``shapes`` is an int64 array ``(len(indices), ndim)``. All samples
        must have the same number of dimensions. Offsets and shapes are looked up vectorized.
        When only the first axis varies (1-D samples, sequences of vectors) the batch is one
        gather of fixed-size runs of the data, then the tails are masked; when the first two
        vary (images), one gather of every row, then one AND with byte masks. Other samples
        (three varying axes, or large images) are copied one by one. Meant for a DataLoader
        ``collate_fn`` or a batch sampler.
        """
        idx = _indices(indices, self._n, self.out_dir)
        self._map_all()
        starts = self._gather("_starts", idx)
        if self._nested:
            shapes, a, b = self._shape_table(idx)
            ndims = {shapes.shape[1]} if shapes is not None else set((b - a).tolist())
        else:  # lengths, and which samples are 0-d, in a few vectorized steps
            lengths = self._gather("_ends", idx) - starts
            scalar = (lengths == 1) & (self._gather("_flat_shapes", idx) == 0)
            ndims = {0} if scalar.all() and len(idx) else {0, 1} if scalar.any() else {1}
            shapes = lengths.reshape(-1, 1) if ndims == {1} else np.zeros((len(idx), 0), np.int64)
        if len(ndims) > 1:
            raise ValueError(f"{self.out_dir}: get_padded needs samples of one number of "
                             f"dimensions, got {sorted(ndims)}-dimensional ones")
        ndim, k = ndims.pop() if ndims else 1, len(idx)
        shapes = np.asarray(shapes, np.int64).reshape(k, ndim)
        pad = np.full((), pad_value, dtype=self._dtype or np.float64)
        if not k or ndim == 0:  # nothing, or one element per sample
            return (self._data[starts] if k else np.full((0,) + (0,) * ndim, pad)), shapes
        # which axes vary: known for the whole store when its shapes are regular, else per batch
        if ndim == 1:
            same, hi = [False], [None]
        else:
            lo, hi = (self._regular[3:] if self._nested and self._np_views.get("_rows") is not None
                      else (shapes.min(axis=0), shapes.max(axis=0)))
            same, hi = (lo == hi).tolist(), hi.tolist()
        if all(same[1:]):  # only the first axis varies (1-D samples, sequences of vectors)
            max_shape = (int(shapes[:, 0].max()), *hi[1:])
            row = math.prod(max_shape[1:])
            batch = self._runs(starts, shapes[:, 0] * row, max_shape[0] * row, pad)
            return batch.reshape((k,) + max_shape), shapes
        if all(same[2:]):  # the first two axes vary: (h, w, ...) images
            max_shape = (int(shapes[:, 0].max()), int(shapes[:, 1].max()), *hi[2:])
            return self._blocks(idx, starts, shapes, max_shape, pad), shapes
        # three or more varying axes: one copy per sample, destinations (j, :a0, :a1, ...)
        # built by zip and map, in C, in ascending position (sequential on disk)
        max_shape = tuple(shapes.max(axis=0).tolist())
        return self._copy_each(np.full((k,) + max_shape, pad), idx, shapes), shapes

    def _copy_each(self, batch, idx, shapes, which=None):
        """Copy samples idx (or idx[which]) into batch[j, :a0, :a1, ...], one by one."""
        which = np.argsort(idx, kind="stable") if which is None else which
        destinations = zip(which.tolist(), *[map(slice, axis) for axis in shapes[which].T.tolist()])
        for destination, sample in zip(destinations, self._views(idx[which])):
            batch[destination] = sample
        return batch

    def _blocks(self, idx, starts, shapes, max_shape, pad):
        """get_padded for samples whose first two axes vary, (h, w, *t) with one t: row r of
        sample j is the w*c elements (c = prod(t)) at starts[j] + r*w*c. One gather through a
        view of every run of `width` = W*c elements copies all rows at once, each with whatever
        follows it in the data, then one AND with byte masks from _pad_plan clears what lies
        outside each sample (and an OR sets a nonzero pad there). Samples too near the end of
        the data for a full row, or all of them when the masks would be large, are copied one
        by one."""
        data, k, (rows, cols) = self._data, len(idx), max_shape[:2]
        c = math.prod(max_shape[2:])
        width, size = cols * c, data.itemsize
        last = len(data) - width  # full runs start at elements 0..last
        if last < 0 or not width or not size or (cols + 1) * 2 * rows * width * size > _PAD_MASKS_MAX:
            return self._copy_each(np.full((k,) + max_shape, pad), idx, shapes)
        view = self._run_view(width)
        masks, steps = _pad_plan(rows, cols, c, size)
        h, w = shapes[:, 0], shapes[:, 1]
        offsets = steps.take(w, 0)  # take: 2.5x faster than steps[w] on a small table
        offsets += starts[:, None]
        late = None
        if offsets[:, -1].max() > last:  # the last rows of these would run past the data
            late = np.flatnonzero(offsets[:, -1] > last)
            offsets[late] = 0
        batch = view[offsets].view(np.uint8).reshape(-1)
        masks = masks[h, w].view(np.uint8)
        np.bitwise_and(batch, masks, out=batch)
        if pad.tobytes().strip(b"\0"):  # a nonzero pad where the masks cleared
            np.bitwise_or(batch.reshape(k, -1), ~masks.reshape(k, -1) & np.full(rows * width, pad).view(np.uint8),
                          out=batch.reshape(k, -1))
        batch = batch.view(data.dtype).reshape((k,) + max_shape)
        if late is not None:  # (their padding is already set: the masks cover them too)
            self._copy_each(batch, idx, shapes, late)
        return batch

    def _run_view(self, width):
        """A read-only view of the mapped data whose item e is the `width` elements (width > 0,
        at most the data's length) that start at element e, as one void item: gathering such
        runs copies each with one memcpy. Made once per width and mapping."""
        view = self._np_views.get(("_runs", width))
        if view is None:
            data = self._data
            view = np.lib.stride_tricks.as_strided(data[:width].view(("V", width * data.itemsize)),
                                                   (len(data) - width + 1,), (data.itemsize,), writeable=False)
            self._np_views[("_runs", width)] = view
        return view

    def _runs(self, starts, lengths, width, pad):
        """A new (len(starts), width) array whose row j is data[starts[j]:][:lengths[j]] padded
        with pad: one gather through _run_view, then one masked fill. Rows that start in the
        last `width` elements are copied one by one."""
        data = self._data
        last = len(data) - width  # full runs start at 0..last
        if last < 0 or not width or not data.itemsize:
            out, late = np.full((len(starts), width), pad), range(len(starts))
        else:
            out = self._run_view(width)[np.minimum(starts, last)[:, None]].view(data.dtype)  # a copy
            small = np.int16 if width < 1 << 15 else np.int64  # masks build 3x faster in int16
            np.copyto(out, pad, where=np.arange(width, dtype=small) >= lengths.astype(small)[:, None])
            late = np.flatnonzero(starts > last).tolist()
        for j in late:
            s, length = int(starts[j]), int(lengths[j])
            out[j, :length] = data[s:s + length]
        return out

    # ---- writing --------------------------------------------------------------------------

    def append(self, sample):
        """Append one sample (crash-safe; O(size of the sample), whatever the store's length)."""
        self.extend([sample])

    def extend(self, samples):
        """Append samples. Every sample is checked before anything is written, so refused input
        leaves the store as it was."""
        d = self.out_dir
        arrays = samples if type(samples) is list else list(samples)
        if set(map(type, arrays)) != {np.ndarray}:  # checked per sample only when needed
            arrays = [_as_sample(s, d) for s in arrays]
        if not arrays:
            return
        dtypes = set(map(_DTYPE, arrays))
        if any(dt.hasobject for dt in dtypes):
            arrays = [_as_sample(s, d) for s in arrays]  # raises, naming the offending sample
        # result_type would drop a byte order (">f4" -> float32): keep a lone dtype as it is
        first_dtype = next(iter(dtypes)) if len(dtypes) == 1 else np.result_type(*dtypes)
        shapes = list(map(_SHAPE, arrays))
        nested = any(len(shape) > 1 for shape in shapes)
        with self._writing(first_dtype, nested) as writer:
            arrays = self._prepare(writer, arrays, dtypes, first_dtype, nested)
            sizes = None if writer.nested is not None else list(map(_SIZE, arrays))  # (nested: from shapes)
            self._appended(writer.append(arrays, sizes, shapes))

    def _prepare(self, writer, arrays, dtypes, first_dtype, nested):
        """Adapt the store's metadata to arrays and return them cast to its dtype; everything
        is checked before anything is written."""
        d, join = self.out_dir, os.path.join
        if writer.n == 0 and writer.dtype != first_dtype:  # an empty store takes its first dtype
            _write_atomic(join(d, "dtype.ninja"), _dtype_to_text(first_dtype, d).encode(), self.durable)
            writer.close()
            writer.sync()
        if dtypes != {writer.dtype}:
            arrays = [_as_sample(a, d, writer.dtype) for a in arrays]
        if nested and writer.nested is None:
            _convert_shapes_to_nested(d, writer.n, self.durable)
            writer.close()
            writer.sync()
        self._dtype = writer.dtype
        return arrays

    def _encode_replacement(self, i, value):
        arr = _as_sample(value, self.out_dir, self._dtype)
        self._ensure_mapped(i + 1)
        start, end = self._starts[i], self._ends[i]
        if arr.size != end - start:
            raise ValueError(f"{self.out_dir}: sample {i} has {end - start} elements; a "
                             f"replacement must have as many, got shape {arr.shape}")
        return start * self._dtype.itemsize, np.ascontiguousarray(arr).tobytes()

    # ---- constructors ---------------------------------------------------------------------

    @classmethod
    def from_lists(cls, out_dir, lists, dtype=None, mode="r+", wrapper_fn=None, **kwargs):
        """Write a list of arrays (any shapes) as a ragged store and open it."""
        arrays = [_as_sample(x if dtype is None else np.asarray(x, dtype=dtype), out_dir) for x in lists]
        return cls._from_batches(out_dir, [arrays] if arrays else [], mode=mode,
                                 wrapper_fn=wrapper_fn, dtype=dtype, **kwargs)

    @classmethod
    def from_generator(cls, out_dir, sample_generator, batch_size, verbose=False, **kwargs):
        """Write a generator's samples as a ragged store, committing every ``batch_size``
        samples; memory holds at most one batch."""
        batch_size = _check_batch_size(batch_size)
        samples = _progress(sample_generator, desc="ragged", verbose=verbose)
        return cls._from_batches(out_dir, _batched(samples, batch_size), **kwargs)

    @classmethod
    def from_indexable(cls, out_dir, indexable, batch_size, n_jobs=None, verbose=False, **kwargs):
        """Write ``indexable[0], indexable[1], ...`` (or ``indexable(i)``) as a ragged store.
        Stops at ``len(indexable)`` or the first IndexError. ``n_jobs`` threads fetch each batch
        in order; memory holds one batch."""
        batch_size = _check_batch_size(batch_size)
        total = len(indexable) if hasattr(indexable, "__len__") else None
        samples = (s for batch in _indexable_batches(indexable, batch_size, n_jobs) for s in batch)
        samples = _progress(samples, total=total, desc="ragged", verbose=verbose)
        return cls._from_batches(out_dir, _batched(samples, batch_size), **kwargs)

    @classmethod
    def _from_batches(cls, out_dir, batches, mode="r+", wrapper_fn=None, dtype=None,
                      copy_before_wrapper_fn=True, durable=False):
        out_dir = os.fspath(out_dir)
        _clear_store(out_dir)
        with cls(out_dir, durable=durable) as writer:
            for batch in batches:
                if dtype is not None:
                    batch = [np.asarray(s, dtype=dtype) for s in batch]
                writer.extend(batch)
                batch.clear()  # let the samples go before the next batch is read
        if not os.path.exists(os.path.join(out_dir, "type.ninja")):
            _create_ragged(out_dir, np.dtype(dtype or np.float64), nested=False, durable=durable)
        return cls(out_dir, wrapper_fn=wrapper_fn, mode=mode,
                   copy_before_wrapper_fn=copy_before_wrapper_fn, durable=durable)

    def __repr__(self):
        return f"RaggedMmap({self.out_dir!r}, {len(self)} samples, dtype={self._dtype})"


def _clear_store(out_dir):
    """Creating a store over an old one: remove the old store's files (never foreign files)."""
    join = os.path.join
    if not os.path.exists(join(out_dir, "type.ninja")):
        return
    for name in ("type.ninja", "starts", "ends", "shapes", "shapes.new", "shapes.old",
                 "flattened_shapes", "shapes_are_flat.ninja", "zstd_level.ninja",
                 "zstd_dict.ninja", "dtype.ninja", "shape.ninja", "order.ninja", "data.ninja"):
        path = join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _batched(iterable, batch_size):
    iterator = iter(iterable)
    while True:
        batch = list(itertools.islice(iterator, batch_size))
        if not batch:
            return
        yield batch


def _indexable_batches(indexable, batch_size, n_jobs):
    """Batches of indexable[i] in order, until len() or the first IndexError; with n_jobs > 1 a
    thread pool fetches each batch (memory: one batch)."""
    fetch = indexable.__getitem__ if hasattr(indexable, "__getitem__") else indexable
    total = len(indexable) if hasattr(indexable, "__len__") else None
    pool = ThreadPoolExecutor(n_jobs) if n_jobs and n_jobs > 1 else None
    try:
        start = 0
        while total is None or start < total:
            stop = start + batch_size if total is None else min(start + batch_size, total)
            results = pool.map(fetch, range(start, stop)) if pool else map(fetch, range(start, stop))
            batch = []
            try:
                for sample in results:  # in index order, even with threads
                    batch.append(sample)
            except IndexError:
                if batch:
                    yield batch
                return
            yield batch
            start = stop
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


###################################################################################################
# string: StringsMmap, a sequence of str
###################################################################################################

def _zstd_module():
    """(codec, train) from the standard library's compression.zstd (3.14+) or the zstandard
    package, else None. codec(level, dictionary) gives one store's (compress, decompress);
    train(samples, size) a raw dictionary. Gate: drop the zstandard branch when Python 3.14 is
    the minimum. Contexts are made per call: neither library's are safe to share across threads."""
    try:
        from compression import zstd
    except ImportError:
        zstd = None
    if zstd is not None:
        def codec(level, dictionary):
            zd = zstd.ZstdDict(dictionary) if dictionary else None
            return (lambda data: zstd.compress(data, level=level, zstd_dict=zd),
                    lambda data: zstd.decompress(data, zstd_dict=zd))
        return codec, lambda samples, size: zstd.train_dict(samples, size).dict_content
    try:
        import zstandard
    except ImportError:
        return None

    def codec(level, dictionary):
        zd = zstandard.ZstdCompressionDict(dictionary) if dictionary else None
        return (lambda data: zstandard.ZstdCompressor(level=level, dict_data=zd).compress(data),
                lambda data: zstandard.ZstdDecompressor(dict_data=zd).decompress(data))
    return codec, lambda samples, size: zstandard.train_dictionary(size, samples).as_bytes()


def _require_zstd(path):
    module = _zstd_module()
    if module is None:
        raise ModuleNotFoundError(
            f"{path} is zstd-compressed: reading or writing it needs Python 3.14+ "
            f"(compression.zstd) or the zstandard package (pip install zstandard)")
    return module


def _utf8(strings, path):
    """The UTF-8 bytes of each string; non-str items and lone surrogates are refused here,
    before anything is written."""
    try:
        return list(map(str.encode, strings))
    except TypeError:
        bad = next(s for s in strings if not isinstance(s, str))
        raise TypeError(f"{path}: StringsMmap holds str only, got {type(bad).__name__} "
                        f"{_short(bad)}; decode bytes or convert with str() first") from None
    except UnicodeEncodeError as e:
        i, bad = next((i, s) for i, s in enumerate(strings) if not _encodable(s))
        raise UnicodeEncodeError(e.encoding, bad, e.start, e.end, (
            f"{path}: string {i} holds a lone surrogate, which UTF-8 cannot store; replace it "
            f"first, e.g. s.encode('utf-8', 'replace').decode()")) from None


def _encodable(string):
    try:
        string.encode()
        return True
    except UnicodeEncodeError:
        return False


def _utf8_chunks(strings, path):
    """(the UTF-8 bytes of the strings, as byte chunks to write in order; each string's
    length in bytes).

    Encoding one string costs ~120 ns, most of it per-object overhead, so many small strings
    are joined with NUL separators and encoded at once; the separators' positions then give
    the lengths, and bytes.replace drops them. Large strings, where that costs three more
    passes over the bytes, go one by one, and so do few strings, strings that hold NULs
    themselves, non-str items and lone surrogates (where _utf8 names what is wrong)."""
    small = len(strings) > 16 and all(type(s) is str and len(s) < 4096 for s in (strings[0], strings[-1]))
    try:
        joined = "\0".join(strings).encode() if small else None
    except (TypeError, UnicodeEncodeError):
        joined = None
    if joined is not None:
        bounds = np.empty(len(strings) + 1, np.int64)  # where each string's separator is
        seps = np.flatnonzero(np.frombuffer(joined, np.uint8) == 0)
        if len(seps) == len(strings) - 1:  # no string holds a NUL of its own
            bounds[0], bounds[1:-1], bounds[-1] = -1, seps, len(joined)
            return [joined.replace(b"\0", b"")], bounds[1:] - bounds[:-1] - 1
    encoded = _utf8(strings, path)
    return encoded, list(map(len, encoded))  # (the writer joins them when they are small)


class StringsMmap(_Sequence):
    """A sequence of ``str`` memory-mapped from ``out_dir``; ``strings[i]`` is a ``str``, a slice
    or list of indices gives a list. Reading never needs write permission (``mode`` is kept
    for compatibility). Stores compressed by 0.9.0 (zstd) are read and extended."""

    _config_keys = ("out_dir", "mode", "durable")
    _kind = "string"

    def __init__(self, out_dir, mode="r+b", durable=False):
        self.out_dir = os.fspath(out_dir)
        self.mode = mode
        self.durable = durable
        self._init_state()
        self._reload(None)

    def _load(self, snapshot):
        d, join = self.out_dir, os.path.join
        self._zstd = None
        opened = self._map_index(snapshot)
        if opened is None:
            self._buf = b""
            return
        n, end = opened
        mm = _map(join(d, "data.ninja"), end, what="strings data")
        self._buf = mm if mm is not None else b""
        if mm is not None:
            self._maps.append(mm)
        level_path = join(d, "zstd_level.ninja")
        if os.path.exists(level_path):
            codec = _require_zstd(d)[0]  # say so at open, not at the first read
            level = _read_text(level_path, "zstd level")
            dict_path = join(d, "zstd_dict.ninja")
            dictionary = _read_bytes(dict_path, "zstd dictionary") if os.path.exists(dict_path) else None
            self._zstd = codec(int(level), dictionary)  # (compress, decompress)
        self._n = self._mapped = n

    def __getitem__(self, item):
        try:  # the hot path, kept to one Python call (see RaggedMmap.__getitem__)
            raw = self._buf[self._starts[item]:self._ends[item]]
        except IndexError:  # out of range, or appended since this object mapped its files
            return self._get(self._norm_index(item))
        except TypeError:  # a slice, a list, a mask
            return self._get_other(item)
        if self._zstd is None:
            return raw.decode()  # UTF-8 (the default: faster than naming it)
        return self._zstd[1](raw).decode()

    def _build(self, keys, columns):
        """Strings keys (mapped), given their (starts, ends)."""
        if self._zstd is not None:
            return [self[k] for k in keys]
        buf = self._buf
        return [buf[s:e].decode() for s, e in zip(*columns)]

    def append(self, string):
        """Append one string (crash-safe; O(len(string)))."""
        self.extend([string])

    def extend(self, list_of_strings, verbose=False):
        """Append strings; a non-str item refuses the whole call before anything is written."""
        strings = list_of_strings if type(list_of_strings) is list and not verbose else \
            list(_progress(list_of_strings, desc="strings", verbose=verbose))
        if self._zstd is not None:  # one zstd frame per string
            chunks = list(map(self._zstd[0], _utf8(strings, self.out_dir)))
            sizes = list(map(len, chunks))
        else:
            chunks, sizes = _utf8_chunks(strings, self.out_dir)
        if not len(sizes):
            return
        with self._writing() as writer:
            self._appended(writer.append(chunks, sizes, None))

    def _encode_replacement(self, i, value):
        if not isinstance(value, str):
            raise TypeError(f"{self.out_dir}: StringsMmap holds str only, got {type(value).__name__}")
        if self._zstd is not None:
            raise ValueError(f"{self.out_dir}: strings of a zstd-compressed store cannot be "
                             f"replaced in place")
        raw = value.encode("utf-8")
        self._ensure_mapped(i + 1)
        start, end = self._starts[i], self._ends[i]
        if len(raw) != end - start:
            raise ValueError(f"{self.out_dir}: string {i} is {end - start} UTF-8 bytes; a "
                             f"replacement must be as long, got {len(raw)} bytes")
        return start, raw

    @classmethod
    def from_strings(cls, out_dir, strings, mode="r+b", verbose=False, zstd_level=None,
                     zstd_train_dictionary_size=None, batch_size=None, durable=False, **kwargs):
        """Write strings as a strings store. ``zstd_level`` compresses each string (0.9.0
        layout); ``zstd_train_dictionary_size`` first trains a dictionary of that many bytes on
        the strings (which are then held in memory)."""
        out_dir = os.fspath(out_dir)
        _clear_store(out_dir)
        if zstd_train_dictionary_size is not None and zstd_level is None:
            zstd_level = 3
        dictionary = None
        if zstd_level is not None:
            train = _require_zstd(out_dir)[1]
            if zstd_train_dictionary_size:
                strings = list(strings)
                dictionary = train(_utf8(strings, out_dir), int(zstd_train_dictionary_size))
        _create_ragged(out_dir, None, False, raw=True,
                       zstd=None if zstd_level is None else (int(zstd_level), dictionary), durable=durable)
        with cls(out_dir, durable=durable) as writer:
            for batch in _batched(_progress(strings, desc="strings", verbose=verbose), batch_size or 65536):
                writer.extend(batch)
                batch.clear()
        return cls(out_dir, mode=mode, durable=durable)

    @classmethod
    def from_generator(cls, out_dir, sample_generator, batch_size, verbose=False, **kwargs):
        """Write a generator of strings, committing every ``batch_size`` strings."""
        batch_size = _check_batch_size(batch_size)
        return cls.from_strings(out_dir, sample_generator, verbose=verbose, batch_size=batch_size, **kwargs)

    def __repr__(self):
        return f"StringsMmap({self.out_dir!r}, {len(self)} strings)"


###################################################################################################
# generic: open_existing, ShardedMmap
###################################################################################################

def open_existing(out_dir, wrapper_fn=None):
    """Open the store in ``out_dir``, whichever kind its type.ninja says it is."""
    out_dir = os.fspath(out_dir)
    kind = _read_kind(out_dir)
    if kind == "numpy":
        arr = np_open_existing(out_dir)
        return Wrapped(arr, wrapper_fn) if wrapper_fn is not None else arr
    if kind == "ragged":
        return RaggedMmap(out_dir, wrapper_fn=wrapper_fn)
    strings = StringsMmap(out_dir)
    return Wrapped(strings, wrapper_fn, copy_before_wrapper_fn=False) if wrapper_fn is not None else strings


class ShardedMmap:
    """Several stores (one per worker or node, say) read as one sequence, without copying.

    ``ShardedMmap(["shard-0", "shard-1"])`` or ``ShardedMmap("parent_dir")`` (its store
    subdirectories in sorted order). Supports len, int/slice/list indexing and iteration, and
    pickles as its paths.
    """

    def __init__(self, shards, wrapper_fn=None):
        if isinstance(shards, (str, os.PathLike)):
            parent = os.fspath(shards)
            shards = sorted(os.path.join(parent, name) for name in os.listdir(parent)
                            if os.path.exists(os.path.join(parent, name, "type.ninja")))
            if not shards:
                raise FileNotFoundError(f"{parent} holds no mmap_ninja store subdirectories")
        self.paths = [os.fspath(p) for p in shards]
        self.wrapper_fn = wrapper_fn
        self.shards = [open_existing(p, wrapper_fn) for p in self.paths]
        self._bounds = np.cumsum([0] + [len(s) for s in self.shards]).tolist()
        self._first = np.asarray(self._bounds[:-1], np.int64)  # each shard's first index

    def __reduce__(self):
        return (ShardedMmap, (self.paths, self.wrapper_fn))

    def __len__(self):
        return self._bounds[-1]

    def __getitem__(self, item):
        if _is_int(item):
            i = int(item)
            n = self._bounds[-1]
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} samples in {len(self.paths)} shards")
            if i < 0:
                i += n
            k = bisect.bisect_right(self._bounds, i) - 1
            return self.shards[k][i - self._bounds[k]]
        idx = _indices(item, len(self), "ShardedMmap")
        shard_of = np.searchsorted(self._first, idx, "right") - 1
        counts = np.bincount(shard_of, minlength=len(self.shards)).tolist()
        if sum(map(bool, counts)) * 16 > len(idx):  # a few indices per shard: one at a time
            return [self[i] for i in idx.tolist()]
        got, where = [], []  # each shard's batch read, and where its samples go
        for k, count in enumerate(counts):
            if count:
                mine = np.flatnonzero(shard_of == k) if count < len(idx) else None
                local, shard = (idx if mine is None else idx[mine]) - self._bounds[k], self.shards[k]
                got += shard._batch(local) if isinstance(shard, _Sequence) else [shard[i] for i in local.tolist()]
                where.append(mine)
        if len(where) == 1:
            return got
        order = np.empty(len(idx), np.int64)  # order[j]: where in got the sample asked j-th is
        order[np.concatenate(where)] = np.arange(len(idx))
        return list(operator.itemgetter(*order.tolist())(got))  # back to the order asked

    def __iter__(self):
        for shard in self.shards:
            for i in range(len(shard)):
                yield shard[i]

    def __repr__(self):
        return f"ShardedMmap({len(self.paths)} shards, {len(self)} samples)"


###################################################################################################
# Command line: python -m mmap_ninja info|verify|from-npy|from-lines
###################################################################################################

def _store_report(path):
    """(kind, lines of a human-readable summary) for the info command."""
    kind = _read_kind(path)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    lines = [f"path:     {os.path.abspath(path)}", f"kind:     {kind}"]
    if kind == "numpy":
        dtype, shape, order = _read_meta(path)
        lines += [f"samples:  {shape[0] if shape else 1}", f"dtype:    {dtype}",
                  f"shape:    {shape}", f"order:    {order}"]
    elif kind == "ragged":
        store = RaggedMmap(path)
        lines += [f"samples:  {len(store)}", f"dtype:    {store.dtype}"]
        lows, highs = {}, {}  # per ndim: the smallest and largest length of each axis
        for _, shapes in _shape_chunks(store):
            by_ndim = {}
            for shape in shapes:
                by_ndim.setdefault(len(shape), []).append(shape)
            for nd, group in by_ndim.items():
                arr = np.asarray(group, np.int64).reshape(-1, nd)
                lows[nd] = np.minimum(lows.get(nd, arr.min(0)), arr.min(0))
                highs[nd] = np.maximum(highs.get(nd, arr.max(0)), arr.max(0))
        lines.append(f"ndim:     {', '.join(map(str, sorted(lows))) or '-'}")
        for nd in sorted(lows):
            for axis in range(nd):
                lines.append(f"  {nd}-D axis {axis}: min {lows[nd][axis]}, max {highs[nd][axis]}")
        store.close()
    else:
        join = os.path.join
        lines.append(f"samples:  {_count(path)}")
        level = join(path, "zstd_level.ninja")
        compression = f"zstd level {_read_text(level, 'zstd level')}" if os.path.exists(level) else "none"
        if os.path.exists(join(path, "zstd_dict.ninja")):
            compression += " with dictionary"
        lines.append(f"compression: {compression}")
    lines.append(f"bytes on disk: {size}")
    return kind, lines


def _shape_chunks(store, chunk=1 << 16):
    """(first index, shapes) of every sample of a ragged store, a chunk at a time."""
    store._map_all()
    for start in range(0, len(store), chunk):
        yield start, store._shapes_of(np.arange(start, min(start + chunk, len(store))))


def _verify(path):
    """Every invariant of the format; returns a list of problems (empty when sound)."""
    problems = []
    join = os.path.join
    try:
        kind = _read_kind(path)
    except (OSError, ValueError) as e:
        return [str(e)]
    try:
        if kind == "numpy":
            dtype, shape, _ = _read_meta(path)
            need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            have = os.path.getsize(join(path, "data.ninja"))
            if have < need:
                problems.append(f"{path}/data.ninja holds {have} bytes, metadata needs {need}")
            return problems
        n = _count(path)
        starts = np.asarray(_read_int64(join(path, "starts", "data.ninja"), n))
        ends = np.asarray(_read_int64(join(path, "ends", "data.ninja"), n))
        for name in ("starts", "ends"):
            if _read_meta(join(path, name))[0] != np.int64:
                problems.append(f"{path}/{name} is not int64")
        if (ends < starts).any():
            problems.append(f"sample {int(np.argmax(ends < starts))}: ends before it starts")
        if n > 1 and (starts[1:] < ends[:-1]).any():
            problems.append(f"sample {int(np.argmax(starts[1:] < ends[:-1])) + 1} overlaps the previous one")
        if kind == "ragged":
            total = _read_meta(path)[1][0]
        else:
            total = os.path.getsize(join(path, "data.ninja"))
        if n and ends.max() > total:
            problems.append(f"offsets reach element {int(ends.max())} but the data holds {total}")
        if kind == "ragged":
            dtype = _read_meta(path)[0]
            have = os.path.getsize(join(path, "data.ninja"))
            if have < total * dtype.itemsize:
                problems.append(f"{path}/data.ninja holds {have} bytes, metadata needs {total * dtype.itemsize}")
            sizes = np.asarray(_read_int64(join(path, "flattened_shapes", "data.ninja"), n))
            if (sizes != ends - starts).any():
                problems.append(f"sample {int(np.argmax(sizes != ends - starts))}: flattened_shapes "
                                f"disagrees with ends - starts")
            store = RaggedMmap(path)
            for start, shapes in _shape_chunks(store):
                held = np.fromiter(map(math.prod, shapes), np.int64, len(shapes))
                bad = np.flatnonzero(held != sizes[start:start + len(shapes)])
                if len(bad):
                    i = start + int(bad[0])
                    problems.append(f"sample {i}: shape {tuple(shapes[bad[0]])} does not hold "
                                    f"{sizes[i]} elements")
                    break
            flag = _read_bytes(join(path, "shapes_are_flat.ninja"), "flatness flag")
            if flag != _I32.pack(0 if store._nested else 1):
                problems.append(f"shapes_are_flat.ninja says {flag!r} but shapes/ is "
                                f"{'ragged' if store._nested else 'flat'}")
            store.close()
        elif not os.path.exists(join(path, "zstd_level.ninja")) or _zstd_module() is not None:
            store = StringsMmap(path)
            for i in range(n):
                try:
                    store[i]
                except (UnicodeDecodeError, ValueError) as e:  # zstd errors are ValueErrors too
                    problems.append(f"string {i} cannot be decoded: {e}")
                    break
            store.close()
    except (OSError, ValueError) as e:
        problems.append(str(e))
    return problems


def main(argv=None):
    """The command line: ``python -m mmap_ninja --help``."""
    parser = argparse.ArgumentParser(
        prog="python -m mmap_ninja",
        description="Inspect, check and create mmap_ninja stores.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="kind, samples, dtype, shape statistics and size of a store")
    p.add_argument("path")
    p = sub.add_parser("verify", help="check every invariant of the on-disk format; exit 1 if unsound")
    p.add_argument("path")
    p = sub.add_parser("from-npy", help="convert a .npy file into a numpy store (memory-mapped, no full load)")
    p.add_argument("npy_file")
    p.add_argument("out_dir")
    p.add_argument("--batch-size", type=int, default=4096)
    p = sub.add_parser("from-lines", help="convert a UTF-8 text file, one string per line, into a strings store")
    p.add_argument("text_file")
    p.add_argument("out_dir")
    p.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print("\n".join(_store_report(args.path)[1]))
        elif args.command == "verify":
            problems = _verify(args.path)
            if problems:
                print(f"{args.path}: UNSOUND")
                for problem in problems:
                    print(f"  - {problem}")
                return 1
            print(f"{args.path}: ok")
        elif args.command == "from-npy":
            source = np.load(args.npy_file, mmap_mode="r")  # never loads the whole file
            batch = _check_batch_size(args.batch_size)
            np_from_ndarray(args.out_dir, np.ascontiguousarray(source[:batch] if source.ndim else source))
            if source.ndim:
                blocks = range(batch, len(source), batch)
                for b in _progress(blocks, total=len(blocks), desc="from-npy", verbose=True):
                    np_extend_dir(args.out_dir, source[b:b + batch])
            print(f"wrote {args.out_dir}")
        else:
            with open(args.text_file, encoding="utf-8") as f:
                lines = (line.rstrip("\n") for line in f)
                StringsMmap.from_generator(args.out_dir, lines, args.batch_size, verbose=True)
            print(f"wrote {args.out_dir}")
    except (OSError, ValueError, TypeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


###################################################################################################
# Import shims: the published package's submodules, served from this one file
###################################################################################################

def _register_shims():
    """Make ``import mmap_ninja.numpy`` and friends work. Keyed on __name__, so a vendored copy
    (``myproj._vendor.mmap_ninja``) registers its own names; safe to run twice (reload)."""
    this = sys.modules.get(__name__)
    shims = {
        "base": {"Wrapped": Wrapped},
        "numpy": {"from_ndarray": np_from_ndarray, "from_generator": np_from_generator,
                  "open_existing": np_open_existing, "extend": np_extend,
                  "extend_dir": np_extend_dir, "append": np_append, "empty": np_empty},
        "ragged": {"RaggedMmap": RaggedMmap},
        "string": {"StringsMmap": StringsMmap},
        "generic": {"open_existing": open_existing, "ShardedMmap": ShardedMmap},
    }
    for short, names in shims.items():
        full = f"{__name__}.{short}"
        module = sys.modules.get(full)
        if not isinstance(module, types.ModuleType) or getattr(module, "__mmap_ninja_shim__", None) is None:
            module = types.ModuleType(full, f"mmap_ninja.{short}, served by {__file__}")
            module.__mmap_ninja_shim__ = True
        module.__dict__.update(names)
        sys.modules[full] = module
        if this is not None:
            setattr(this, short, module)


_register_shims()

if __name__ == "__main__":
    sys.exit(main())
