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
    "np_append", "np_empty", "QuasiRandomSampler", "__version__",
]

import argparse
import ast
import bisect
import collections
import contextlib
import copy
import errno
import functools
import itertools
import json
import math
import mmap
import operator
import os
import pickle
import shutil
import stat
import struct
import sys
import threading
import time
import types
import warnings
import weakref
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed

import numpy as np

try:  # POSIX: serialize writers with flock. Windows has no fcntl; writers are then not locked.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

###################################################################################################
# Format I/O: the files of a store, read and written with clear errors
###################################################################################################
_U64 = struct.Struct("<Q")

_I32 = struct.Struct("<i")

# memoryview.cast("q") turns an index file into Python ints in ~30 ns. It reads native byte
# order, so big-endian machines use (slower) numpy views of "<i8" instead.
_NATIVE_LITTLE = sys.byteorder == "little"

# Python 3.13 lets a map live without holding a duplicate file descriptor.
_MMAP_KW = {"trackfd": False} if sys.version_info >= (3, 13) else {}

# Every name the format uses inside a store directory: what a writer clears from a store that
# was never completed. Anything else in the directory is the user's and is never touched.
_FORMAT_NAMES = ("type.ninja", "dtype.ninja", "shape.ninja", "order.ninja", "data.ninja", "starts",
                 "ends", "shapes", "shapes.new", "shapes.old", "flattened_shapes",
                 "shapes_are_flat.ninja", "zstd_level.ninja", "zstd_dict.ninja")

# Metadata files are a few bytes (a dtype literal at most a few KB): reads are bounded, so a
# hostile or damaged file (a device, a huge literal) cannot feed us without end.
_META_MAX = 1 << 16

_O_CLOEXEC, _O_NOFOLLOW = getattr(os, "O_CLOEXEC", 0), getattr(os, "O_NOFOLLOW", 0)

# O_NONBLOCK: opening a FIFO planted in a store returns at once (and is then refused) instead
# of waiting forever for a writer. It changes nothing for regular files.
_O_READ = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _O_CLOEXEC

_O_WRITE = os.O_RDWR | getattr(os, "O_NONBLOCK", 0) | _O_CLOEXEC | _O_NOFOLLOW

_BINARY = getattr(os, "O_BINARY", 0)  # Windows would otherwise translate newlines

_PAGE = 512  # offsets are checked a page (4 KB of each index file) at a time: 2**9 samples

_DTYPE, _SHAPE, _SIZE, _NBYTES = (operator.attrgetter(name) for name in ("dtype", "shape", "size", "nbytes"))


def _open_fd(path, what="file", write=False, root=None, linked=False):
    """A descriptor of the regular file at path. Readers follow symlinks to regular files;
    writers never write through a symlink nor outside `root` (the store's directory), nor
    (unless linked: a map that may only be read) to a file with other hard links."""
    if write and root is not None:
        _check_inside(path, root)
    try:
        fd = os.open(path, (_O_WRITE if write else _O_READ) | _BINARY)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{what} is missing: {path} does not exist (the store is damaged, or this directory "
            f"is not a mmap_ninja store)") from e
    except PermissionError as e:
        action = f"open {path} for writing" if write else f"read {what} {path}"
        raise PermissionError(f"cannot {action}: {e.strerror}; check the store's file "
                              f"permissions") from e
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise PermissionError(f"{path} is a symbolic link: mmap_ninja never writes through "
                                  f"links; replace it with the file it points to") from e
        raise OSError(e.errno, f"cannot open {what} {path}: {e.strerror}") from e
    info = os.fstat(fd)
    mode = info.st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "directory" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "device or socket"
        raise ValueError(f"{path} is a {kind}, not a regular file: the store is damaged (mmap_ninja "
                         f"reads and writes only regular files)")
    if write and not linked and info.st_nlink > 1:
        os.close(fd)
        raise _hard_linked(path, info.st_nlink)
    return fd


def _hard_linked(path, links):
    """Writes are in place: through a hard link they would reach the file's other names too."""
    return PermissionError(f"{path} has {links} hard links (a copy made with cp -al or rsync "
                           f"--link-dest, say): writing to it would change the other copies too; "
                           f"give the store files of its own (cp -r it) and write to that")


def _check_inside(path, root):
    """Refuse to write to path when a symlink leads it out of the store at root: no directory
    between root (which may itself be a link) and the file may be one (the file itself is
    opened with O_NOFOLLOW)."""
    parts = os.path.relpath(path, root).split(os.sep) if not path.startswith(root + os.sep) else \
        path[len(root) + 1:].split(os.sep)
    for depth in range(1, len(parts)):
        where = os.path.join(root, *parts[:depth])
        if parts[depth - 1] == ".." or os.path.islink(where):
            raise PermissionError(f"{path} leads outside the store {root} through a symbolic link: "
                                  f"mmap_ninja never writes outside a store; replace the link with "
                                  f"the file or directory itself")


def _check_directory(path):
    """A store is a directory: a missing one is an empty store, a file is refused."""
    if os.path.lexists(path) and not os.path.isdir(path):
        if os.path.islink(path) and not os.path.exists(path):
            raise FileNotFoundError(f"{path} is a symlink to nothing (dangling, or a loop): point it "
                                    f"at a store directory, or remove it")
        hint = " (a .npy file: np.load it, or convert it with python -m mmap_ninja from-npy)" \
            if str(path).endswith(".npy") else ""
        raise NotADirectoryError(f"{path} is a file, not a mmap_ninja store directory{hint}")


def _from_one_directory(path, load, undo):
    """Run load(), which opens a store's files by path one after another, so that they all
    come from one directory: a re-creation swapping a new directory in meanwhile would mix two
    stores (one's dtype, the other's data). The directory is held open meanwhile, so its inode
    cannot be freed and reused; if path names another one afterwards, undo() and load again."""
    try:
        return _load_from_one_directory(path, load, undo)
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise
        raise OSError(errno.EMFILE, f"{path}: this process has no file descriptor left to open the "
                      f"store with ({e.strerror}): an open store holds a few (one per mapped file "
                      f"before Python 3.13: up to 9; one that has written, up to ~20 more until "
                      f"close()), so many shards open at once can use up the limit; raise it "
                      f"(ulimit -n; resource.setrlimit(resource.RLIMIT_NOFILE, ...)) or close the "
                      f"stores you are done with") from e


def _load_from_one_directory(path, load, undo):
    swaps, free, deadline = 0, 0, None
    while swaps < 100:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
        except OSError:  # missing, a file, ...: load says what is wrong
            return load()
        try:
            held = os.fstat(fd)
            try:
                result = load()
            except (OSError, ValueError):  # (files of two stores can look damaged together)
                if _names(path, held):
                    # damaged, or in flux under a writer of another thread or process (a flat
                    # store converting to nested shapes, a swap entry by entry): read again
                    # while it works, and once after it lets go (10 s at most)
                    busy = _locked_by_another(fd, held)
                    free += busy is False
                    deadline = deadline or time.monotonic() + 10
                    if busy is None or free > 1 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.005 if busy else 0)
                undo()
                continue
            if _names(path, held):
                return result
            undo()
        finally:
            os.close(fd)
        swaps += 1
    raise RuntimeError(f"{path}: the store was re-created 100 times while this process opened "
                       f"it; open it again once its writer is done")


def _locked_by_another(fd, held):
    """Whether a writer other than this thread holds the lock of the store directory open as fd
    (held: its stat); None when that cannot be told (no flock here)."""
    if fcntl is None or _LOCKED.get((held.st_dev, held.st_ino)) == threading.get_ident():
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # (a file system without locks)
        return None
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _absolute(path):
    """path made absolute without normalising it (abspath would take link/.. lexically, not
    where the link leads): a store object keeps its store when the working directory changes."""
    path = os.fspath(path)
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def _names(path, stat):
    """Whether path names the file (or directory) that stat describes."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (stat.st_dev, stat.st_ino)


def _read_bytes(path, what, limit=_META_MAX):
    """A whole small file, refusing anything that is not a regular file of at most limit bytes."""
    fd = _open_fd(path, what)
    try:
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise ValueError(f"{what} {path} is larger than {limit} bytes: not a mmap_ninja {what} "
                         f"file (the store is damaged)")
    return b"".join(chunks)


def _read_text(path, what, limit=_META_MAX):
    raw = _read_bytes(path, what, limit)
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not ASCII text: {raw[:40]!r}") from e


def _write_bytes(fd, data, offset=None):
    """Write all of data (at offset, else at the current position): a write may be short
    (Linux writes at most 0x7ffff000 bytes per call), so loop until every byte is down."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        if offset is None or not hasattr(os, "pwrite"):
            if offset is not None:  # pragma: no cover - Windows has no pwrite
                os.lseek(fd, offset, os.SEEK_SET)
            written = os.write(fd, view)
        else:
            written = os.pwrite(fd, view, offset)
        if offset is not None:
            offset += written
        view = view[written:]


def _create_file(path, data, durable=False):
    """Create a small file of a store being created (never over an existing file or link): no
    rename needed, because the store's type.ninja, written last, makes the directory a store."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC | _BINARY, 0o666)
    try:
        _write_bytes(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(path, data, durable=False):
    """Replace a small file so that readers see the old content or the new, never a mix. The
    temporary file has an unpredictable name and is created exclusively: nothing planted at a
    guessable name can redirect the write."""
    tmp = _unique(path + ".tmp-")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC | _BINARY, 0o666)
    try:
        try:
            _write_bytes(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _unique(prefix):
    """prefix + this process's id + random letters: a name nobody can guess in advance (the
    caller creates it exclusively), that says which process made it."""
    return f"{prefix}{os.getpid()}-{os.urandom(6).hex()}"


def _dtype_to_text(dtype, path=""):
    """The text stored in dtype.ninja: the oldest spelling that np.dtype() parses back exactly."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(f"{path}: dtype {dtype!r} holds Python objects, which cannot be "
                        f"memory-mapped; convert to a numeric, bool, bytes or str dtype first")
    if dtype.itemsize == 0:
        raise TypeError(f"{path}: dtype {dtype!r} has size 0, so it holds no data; give strings "
                        f"and bytes a length (e.g. 'U8', 'S16') or store them in a StringsMmap")
    if dtype.shape:  # (numpy turns each element of one into an array: samples would grow axes)
        raise TypeError(f"{path}: dtype {dtype!r} is a sub-array dtype (each element an array of "
                        f"shape {dtype.shape}); pass its element dtype, {dtype.base}, and give the "
                        f"samples that shape as their last axes")
    # (a structured dtype's descr in ASCII: a field named "é" is written "\xe9", which
    # literal_eval reads back; UTF-8 text here is refused by the reader, _read_text)
    candidates = [dtype.name, dtype.str] if dtype.names is None else [ascii(dtype.descr)]
    for text in candidates:
        try:
            if _parse_dtype(text) == dtype:
                return text
        except (TypeError, ValueError, SyntaxError):
            pass
    raise TypeError(f"{path}: dtype {dtype!r} cannot be stored exactly (no text form of it "
                    f"round-trips through np.dtype)")


def _given_dtype(dtype, path):
    """The dtype= a user passed (None: the first samples choose), refused before anything is
    written when no store could hold it."""
    if dtype is None:
        return None
    dtype = np.dtype(dtype)
    _dtype_to_text(dtype, path)
    return dtype


def _chosen_dtype_text(dtype):
    """dtype.ninja's text for an empty store made with dtype=: numpy's type string ('<i2', '|u1').
    Every other writer spells a plain dtype by its name ('int16'), so an empty store whose text
    is a name (float64, the placeholder of one made without dtype=; or what a first append that
    failed left) takes its dtype from its first samples, and one made with dtype= keeps it."""
    try:
        if _parse_dtype(dtype.str) == dtype and dtype.str != dtype.name:
            return dtype.str
    except ValueError:
        pass
    return _dtype_to_text(dtype)  # (structured: its descr, never a name)


def _parse_dtype(text, path="dtype.ninja"):
    try:
        # Structured dtypes are stored as the literal of dtype.descr; literal_eval never runs code.
        spec = ast.literal_eval(text) if text.startswith("[") else text
        dtype = np.dtype(spec)
    except (TypeError, ValueError, SyntaxError, MemoryError, RecursionError) as e:
        why = str(e) if len(str(e)) < 60 else str(e)[:57] + "..."  # (numpy's repeats the text, in full)
        raise ValueError(f"{path}: cannot parse dtype {_short(text)}: {why}") from e
    if dtype.hasobject:
        raise ValueError(f"{path}: dtype {text!r} holds Python objects; refusing to map it")
    if dtype.itemsize == 0 or dtype.shape:
        why = "has size 0, so no sample could hold data" if dtype.itemsize == 0 else \
            f"is a sub-array dtype, which no writer stores (its shape {dtype.shape} would add axes)"
        raise ValueError(f"{path}: dtype {text!r} {why}: the store is damaged")
    return dtype


def _read_kind(store_dir):
    if not os.path.lexists(os.path.join(store_dir, "type.ninja")):
        _check_swap(store_dir)
    kind = _read_text(os.path.join(store_dir, "type.ninja"), "store type", 64)
    if kind not in ("numpy", "ragged", "string"):
        raise ValueError(f"{store_dir}: unknown store type {kind!r} in type.ninja "
                         f"(expected 'numpy', 'ragged' or 'string')")
    return kind


def _makeable(shape, itemsize):
    """Whether numpy can make an array of this shape: at most 64 axes, none negative, and the
    nonzero ones spanning fewer than 2**63 bytes, even when another axis is 0 (numpy refuses
    an empty (0, 2**62) array of int32). RaggedMmap's page checks apply the same rule."""
    return len(shape) <= 64 and min(shape, default=0) >= 0 and \
        math.prod(max(a, 1) for a in shape) * itemsize < 1 << 63


def _read_meta(store_dir):
    """dtype, shape and order of the numpy store (or ragged data) in store_dir."""
    join = os.path.join
    dtype = _parse_dtype(_read_text(join(store_dir, "dtype.ninja"), "dtype"), join(store_dir, "dtype.ninja"))
    shape_path = join(store_dir, "shape.ninja")
    raw = _read_bytes(shape_path, "shape", 8 * 64)  # numpy arrays have at most 64 axes
    if len(raw) % 8:
        raise ValueError(f"{shape_path} is {len(raw)} bytes long, not a multiple of 8: "
                         f"the shape file is damaged")
    shape = struct.unpack(f"<{len(raw) // 8}Q", raw)
    if not _makeable(shape, dtype.itemsize):
        raise ValueError(f"{shape_path}: shape {_short(shape)} of {dtype} is one numpy cannot make "
                         f"(its nonzero axes need 2**63 bytes or more): the shape file is damaged")
    order_path = join(store_dir, "order.ninja")
    order = _read_text(order_path, "order", 64) if os.path.lexists(order_path) else "C"
    if order not in ("C", "F", "c", "f"):  # (the published np_empty writes the order it is given)
        raise ValueError(f"{order_path}: order must be 'C' or 'F', found {order!r}")
    order = order.upper()
    return dtype, shape, order


def _write_meta(store_dir, dtype, shape, order="C", kind="numpy", durable=False, data=b"\0", typed=True):
    """Create a numpy store's metadata and data file in a new directory; type.ninja comes last
    (unless not typed: the caller writes it), so its presence means 'complete'."""
    os.makedirs(store_dir, exist_ok=True)
    join = os.path.join
    _create_file(join(store_dir, "dtype.ninja"), _dtype_to_text(dtype, store_dir).encode(), durable)
    _create_file(join(store_dir, "shape.ninja"), b"".join(_U64.pack(int(a)) for a in shape), durable)
    _create_file(join(store_dir, "order.ninja"), order.encode(), durable)
    # An empty store's data file holds one byte, not zero, as the published writer leaves it:
    # its readers cannot map an empty file. Ours read only what the metadata commits, and the
    # first append overwrites the byte.
    _create_file(join(store_dir, "data.ninja"), data, durable)
    if typed:
        _create_file(join(store_dir, "type.ninja"), kind.encode(), durable)


def _check_index(store_dir, n, tail=()):
    """An index store (starts, ends, flattened_shapes, flat shapes: int64 of shape (m, *tail))
    must record at least the n entries its store commits."""
    dtype, shape, _ = _read_meta(store_dir)
    if dtype != np.dtype("<i8") or shape[1:] != tail or shape[:1] < (n,):
        raise ValueError(f"{store_dir} is {dtype} of shape {shape}, not int64 of shape (at least "
                         f"{n}{', ' if tail else ','}{', '.join(map(str, tail))}): the store is damaged")


def _check_size(path, need, what):
    size = os.stat(path).st_size
    if size < need:
        raise ValueError(f"{path} holds {size} bytes but the store's metadata commits {need}: "
                         f"the {what} file was truncated or damaged; appends are refused (restore "
                         f"it from a copy or re-create the store)")


def _entry(store_dir, i):
    """Entry i of the int64 index store in store_dir, read on its own."""
    fd = _open_fd(os.path.join(store_dir, "data.ninja"), "index")
    try:
        return struct.unpack("<q", _pread(fd, 8, 8 * i))[0]
    finally:
        os.close(fd)


def _read_int64(path, n):
    _check_size(path, 8 * n, "index")
    fd = _open_fd(path, "index")
    try:
        raw = _pread(fd, 8 * n, 0)
    finally:
        os.close(fd)
    if len(raw) != 8 * n:
        raise ValueError(f"{path} holds fewer than the {n} entries its store needs: damaged")
    return np.frombuffer(raw, "<i8").tolist()


def _map(path, nbytes, access=mmap.ACCESS_READ, what="data", root=None):
    """Map the first nbytes of path (None for 0 bytes, which mmap cannot map); and its stat."""
    fd = _open_fd(path, what, access == mmap.ACCESS_WRITE, root, linked=True)  # (refused at a write)
    try:
        stat = os.fstat(fd)
        if not 0 <= nbytes <= stat.st_size:
            raise ValueError(f"{path} holds {stat.st_size} bytes but its metadata needs {nbytes}: the "
                             f"{what} file is truncated or the store is damaged")
        return (mmap.mmap(fd, nbytes, access=access, **_MMAP_KW) if nbytes else None), stat
    finally:
        os.close(fd)


def _int64_view(mm, n):
    """Fast int64 lookups over the first n entries of a map (n fixed: the store's snapshot)."""
    if mm is None or n == 0:
        return memoryview(b"").cast("q") if _NATIVE_LITTLE else np.zeros(0, "<i8")
    if _NATIVE_LITTLE:
        return memoryview(mm)[: 8 * n].cast("q")
    return np.frombuffer(mm, "<i8", n)


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


def _write_at(fd, offset, chunks):
    """Write chunks (bytes-like) at offset; torn bytes a killed writer left past it are dropped.
    Returns the offset after the last byte written. (Writing nothing changes nothing: an
    empty store's data file keeps the byte the published readers need to map it.)"""
    buffers = [_buffer(c) for c in chunks]
    if not any(b.nbytes if isinstance(b, np.ndarray) else len(b) for b in buffers):
        return offset
    if os.lseek(fd, 0, os.SEEK_END) > offset:  # the size, cheaper than fstat between writes
        os.ftruncate(fd, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return offset + _write_chunks(fd, buffers)


def _write_chunks(fd, chunks):
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
        if written:  # a short write: continue inside this buffer
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
    _write_bytes(fd, _U64.pack(n), 0)


@contextlib.contextmanager
def _naming(path, action="write to"):
    """OSErrors that name no file (disk full, I/O errors) name the store they happened in."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None or str(path) in str(e):
            raise
        raise OSError(e.errno, f"{e.strerror}: cannot {action} the store {path} (its committed "
                               f"samples are intact)") from e


def _short(value):
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _check_batch_size(value, name="batch_size", most=sys.maxsize, floats=True):
    if floats and isinstance(value, float) and value.is_integer():  # (1e4: the published package takes it)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if most is not None and value > most:  # (a batch is cut with islice, which takes at most this)
        raise ValueError(f"{name} must be at most {most}, got {value!r}")
    return int(value)


###################################################################################################
# Samples: what can be stored, and the one cast policy
###################################################################################################
def _as_sample(value, path, dtype=None):
    """value as an ndarray that can be stored (cast to dtype when given, see _cast); refuses
    objects and impossible casts up front."""
    if type(value) is np.ndarray and (dtype is None or value.dtype == dtype) and not value.dtype.hasobject:
        return value  # the common case, checked cheaply
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists and the like
        raise TypeError(f"{path}: cannot store {type(value).__name__} value as an array: {e}") from e
    if arr.dtype.kind == "T":
        raise TypeError(f"{path}: sample {_short(value)} has numpy's variable-width StringDType, "
                        f"which has no fixed size to store; use StringsMmap, or .astype(str)")
    if arr.dtype.hasobject:
        raise TypeError(f"{path}: sample {_short(value)} is not array-like (numpy gives it "
                        f"object dtype); samples must be numeric, bool, bytes or str arrays")
    return arr if dtype is None or arr.dtype == dtype else _cast(arr, dtype, path)


# Casting kinds that hold the same sort of values: numbers (bool, integers, floats, complex),
# str, bytes, datetimes, timedeltas. Structured and other void dtypes cast only safely.
_KIND_GROUPS = {kind: group for group in ("biufc", "U", "S", "M", "m") for kind in group}


def _cast(arr, dtype, path):
    """arr as dtype, refused with TypeError when any value would change: an integer that does
    not fit, a float that is not a whole number in range, a finite float that overflows, an
    integer a float cannot hold exactly, a string that would be cut, a date losing precision.
    One thing is allowed to change: rounding a float to a narrower float (0.1 into float32)."""
    source = arr.dtype
    group = _KIND_GROUPS.get(dtype.kind)
    exact = True  # numpy calls int64 -> float64 safe, though 2**53 + 1 does not survive it
    if source.kind in "iu" and dtype.kind in "fc":
        exact = np.iinfo(source).bits - (source.kind == "i") <= np.finfo(dtype).nmant + 1
    if np.can_cast(source, dtype, "safe") and exact and (group is None or _KIND_GROUPS.get(source.kind) == group):
        return arr.astype(dtype)
    if group is None or _KIND_GROUPS.get(source.kind) != group:
        raise TypeError(f"{path}: cannot store values of dtype {source} in a store of dtype "
                        f"{dtype}; convert them first")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (ComplexWarning: checked below)
        out = arr.astype(dtype)
        if source.kind in "fc" and dtype.kind in "fc":  # rounding is fine, overflow is not
            kept = np.isfinite(out) | ~np.isfinite(arr)
            if dtype.kind == "f" and source.kind == "c":
                kept &= arr.imag == 0
            lossless = bool(kept.all())
        elif source.kind in "iu" and dtype.kind in "iu":  # (a wrap-around, -1 to 255, survives a round trip)
            info = np.iinfo(dtype)
            lossless = not arr.size or (info.min <= int(arr.min()) and int(arr.max()) <= info.max)
        else:
            lossless = np.array_equal(out.astype(source), arr, equal_nan=source.kind in "fcmM")
    if not lossless:
        raise TypeError(f"{path}: cannot store a sample of dtype {source} in a store of dtype "
                        f"{dtype} without losing values; convert it first")
    return out


def _scalar(length, recorded):
    """Whether a flat ragged sample of `length` elements whose recorded shape is (recorded,)
    is a scalar: the format records one as length 0 holding one element. Elementwise for arrays."""
    return (length == 1) & (recorded == 0)


def _copy(sample):
    """A writable copy of a sample (of each array of a list of them), as copy.copy makes one (a
    record of a structured store, a dict, a masked array keep their type); an array in memory."""
    if type(sample) is np.ndarray:  # (the common case: 60 ns less than np.array(copy=True))
        return sample.copy(order="K")
    if isinstance(sample, np.ndarray):  # a subclass keeps its type (a masked array its mask); a
        return np.array(sample, copy=True, subok=not isinstance(sample, np.memmap))  # memmap's rows: memory
    if type(sample) is list:
        return [_copy(s) for s in sample]
    return copy.copy(sample)  # (a record: np.array(record, copy=True) would still view the map)


def _is_int(item):
    return type(item) is int or isinstance(item, (int, np.integer)) and \
        not isinstance(item, (bool, np.bool_, np.timedelta64))  # (numpy calls timedelta64 an integer)


def _int_0d(item):
    return type(item) is np.ndarray and item.shape == () and item.dtype.kind in "iu"


def _as_indices(item, n, path):
    """A slice, list/array of ints or boolean mask as an int64 array of non-negative indices."""
    if isinstance(item, tuple):
        raise TypeError(f"{path}: index must be an int, a slice, a 1-D list/array of ints or a "
                        f"boolean mask, got the tuple {_short(item)}; to index within a sample, "
                        f"read it first (store[i][j])")
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
    # Ints numpy gives no int dtype: past int64 (object), or a list mixing int64 and uint64
    # (float64, so the values come from the list itself)
    if idx.ndim == 1 and (idx.dtype.kind == "O" or idx.dtype.kind == "f" and not isinstance(item, np.ndarray)):
        values = idx.tolist() if idx.dtype.kind == "O" else list(item)
        if all(map(_is_int, values)):
            values = list(map(operator.index, values))
            big = [v for v in values if not -(1 << 63) <= v < 1 << 63]
            if big:
                raise IndexError(f"{path}: index {big[0]} is out of range for {n} samples")
            idx = np.array(values, np.int64)
    if idx.dtype.kind not in "iu" or idx.ndim != 1:
        raise TypeError(f"{path}: index must be an int, a slice, a 1-D list/array of ints or a "
                        f"boolean mask, got {_short(item)}")
    if idx.dtype.kind == "u" and idx.dtype.itemsize == 8 and idx.max() > np.iinfo(np.int64).max:
        raise IndexError(f"{path}: index {int(idx.max())} is out of range for {n} samples")
    idx = idx.astype(np.int64, copy=False)
    if idx.view(np.uint64).max() < n:  # the common case, one reduction: negatives wrap to huge
        return idx
    bad = (idx < -n) | (idx >= n)
    if bad.any():
        raise IndexError(f"{path}: index {int(idx[bad][0])} is out of range for {n} samples")
    return np.where(idx < 0, idx + n, idx)


###################################################################################################
# Writers: one at a time per store; new stores built aside and swapped in
###################################################################################################
class _Lock:
    """flock on a store's directory: one writer at a time, across processes and objects. The
    directory stays open between uses (a writer appends many times); close() lets it go. A
    forked child never uses (nor unlocks) the descriptor it inherited, which shares its lock
    with the parent: the fork closes the child's copy (kept, it would hold the parent's lock
    for as long as the child lives, after the parent died), and the child opens its own."""

    def __init__(self, store_dir):
        self.store_dir, self.fd, self.pid, self.held = store_dir, None, os.getpid(), False

    def __enter__(self):
        if fcntl is None:  # pragma: no cover - Windows: writers are not locked
            return self
        if self.pid != os.getpid():
            self.fd, self.held, self.pid = None, False, os.getpid()  # (closed by the fork: _LOCK_FDS)
        if self.fd is None:
            self.fd = os.open(self.store_dir, os.O_RDONLY | _O_CLOEXEC)
            _LOCK_FDS.add(self.fd)
            info = os.fstat(self.fd)
            self.key = info.st_dev, info.st_ino
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.held = True
            _LOCKED[self.key] = threading.get_ident()
        except OSError as e:  # a file system without locks (some NFS setups)
            warnings.warn(f"{self.store_dir}: cannot lock the store ({e.strerror}); writing without "
                          f"a lock, so do not let two processes write to it at once", RuntimeWarning, 2)
        return self

    def __exit__(self, *exc):
        if self.pid != os.getpid():  # (a forked child: the descriptor was the parent's, and is closed)
            self.fd, self.held = None, False
        if self.held:
            self.held = False
            _LOCKED.pop(self.key, None)
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def current(self):
        """Whether the directory locked is still the one at store_dir (a store re-created by
        from_* is swapped in as a new directory)."""
        return self.fd is None or self.pid != os.getpid() or _names(self.store_dir, os.fstat(self.fd))

    def close(self):
        if self.pid == os.getpid():
            self.__exit__()
            if self.fd is not None:
                _LOCK_FDS.discard(self.fd)
                os.close(self.fd)
        self.fd = None


_LOCK_FDS = set()  # the descriptors _Locks hold open (a forked child closes its copies)
_LOCKED = {}  # (device, inode) of each store directory this process holds locked: the thread


@contextlib.contextmanager
def _creating(out_dir, durable=False):
    """Yield a new, empty directory to build a store in, then swap it in for what out_dir held.

    Until the swap the old store (if any) stays readable and intact, and a failure or a killed
    process leaves it as it was: the build lives in a hidden directory beside out_dir (inside
    it when out_dir is a mount point), removed on failure or by the next build once its
    process is gone. Where the platform can exchange two directories atomically (Linux's
    renameat2) readers see the old store or the new one, never neither. Files in out_dir that
    are not part of the format are kept."""
    shown = os.fspath(out_dir)
    target = os.path.realpath(shown)  # a symlinked out_dir keeps its link
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{shown} is a file, not a directory: a store is a directory; "
                                 f"choose another path")
    if os.path.isdir(target) and not os.path.lexists(os.path.join(target, "type.ninja")):
        # (before the build: what is swapped out is deleted, so only leftovers may be; a swap
        # killed midway leaves the old store aside, in .ninja-old-*, and new data here)
        swapped = any(_pid_of(name) is not None for name in os.listdir(target))
        stray = _stray(target, data_ok=swapped)
        if stray is not None:
            raise _stray_error(shown, stray.replace(target, shown, 1))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    # (built inside out_dir when it is a mount point, or when only out_dir is writable)
    inside = os.path.isdir(target) and (os.stat(target).st_dev != os.stat(parent).st_dev or not os.access(
        parent, os.W_OK | os.X_OK) and os.access(target, os.W_OK | os.X_OK))
    where, prefix = (target, ".ninja-new-") if inside else (parent, f".{os.path.basename(target)}.ninja-new-")
    _remove_dead_builds(where, prefix, target)
    if os.path.isdir(target):  # (an old store a swap killed midway left aside: replaced now)
        _remove_dead_builds(target, ".ninja-old-", target)
    build = _unique(os.path.join(where, prefix))
    os.mkdir(build)  # (exclusive; permissions as for any directory the user makes)
    try:
        with _naming(shown, "create"):
            yield build
            if durable:
                _fsync_tree(build)
            here = _names(".", os.stat(target)) if os.path.isdir(target) else False
            _swap_in(build, target, inside)
            if here:  # the working directory was the old store: follow the new one
                os.chdir(target)
            if durable:
                _fsync_tree(parent, recurse=False)
    except BaseException as e:
        shutil.rmtree(build, ignore_errors=True)
        _relabel(e, build, shown)
        raise


def _relabel(error, build, shown):
    """Messages about a store being built name the path the user gave, not the hidden one."""
    for attr in ("args", "strerror", "reason", "filename", "filename2"):
        value = getattr(error, attr, None)
        if isinstance(value, str) and build in value:
            setattr(error, attr, value.replace(build, shown))
        elif attr == "args" and isinstance(value, tuple):
            error.args = tuple(a.replace(build, shown) if isinstance(a, str) else a for a in value)


def _remove_dead_builds(where, prefix, target):
    """Remove what builds killed before their swap left behind (named with their process id).
    Files of target's that the swap had moved into one (not the format's) go back first; a
    build that still holds one (its name taken in target meanwhile) is kept."""
    with contextlib.suppress(OSError):
        for name in os.listdir(where):
            pid = _pid_of(name, prefix)
            if pid is not None:
                build, kept = os.path.join(where, name), False
                if not _alive(pid) and stat.S_ISDIR(os.lstat(build).st_mode):  # (never through a link)
                    for entry in os.listdir(build):
                        if entry.split(".tmp-")[0] not in _FORMAT_NAMES:
                            if os.path.isdir(target) and not os.path.lexists(os.path.join(target, entry)):
                                os.rename(os.path.join(build, entry), os.path.join(target, entry))
                            else:
                                kept = True
                    if not kept:
                        shutil.rmtree(build, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # (another user's, or we cannot tell: leave it)
    return True


def _swap_in(build, target, inside):
    """Put the complete store in build at target. The old store is deleted before its writer
    lock is released, so a writer waiting on it then finds it gone (see _SequenceWriter.stale)."""
    if not os.path.isdir(target):
        try:
            return os.rename(build, target)
        except OSError:  # created meanwhile: swap as below
            pass
    lock = _Lock(target)
    try:
        with lock:
            _move_foreign(target, build)  # files that are not the store's move with it
            if not inside and _exchange(build, target):
                old = build  # (now holds the old store)
            else:  # entry by entry: type.ninja leaves first and comes back last
                old = _unique(os.path.join(target, ".ninja-old-"))  # (see _is_store)
                os.mkdir(old)
                for name in sorted(os.listdir(target), key=lambda n: n != "type.ninja"):
                    if name.split(".tmp-")[0] in _FORMAT_NAMES:
                        os.rename(os.path.join(target, name), os.path.join(old, name))
                for name in sorted(os.listdir(build), key=lambda n: n == "type.ninja"):
                    os.rename(os.path.join(build, name), os.path.join(target, name))
                os.rmdir(build)
            shutil.rmtree(old)
    finally:
        lock.close()


_ASIDE = (".ninja-new-", ".ninja-old-")  # a build, and an old store a swap moves aside


def _pid_of(name, prefixes=_ASIDE):
    """The process id in a name that _unique made from one of prefixes (prefix, pid, "-", hex:
    by default a build or an old store a swap moved aside), else None: not ours (a user's)."""
    for prefix in (prefixes,) if isinstance(prefixes, str) else prefixes:
        if name.startswith(prefix):
            pid, _, rest = name[len(prefix):].partition("-")
            return int(pid) if pid.isascii() and pid.isdecimal() and rest else None
    return None


def _move_foreign(target, build):
    """Move the entries of target that are not the format's (the user's files) into build;
    if one cannot move (a mount point, an immutable file, an interrupt), move back those that
    did and raise: the build is then removed, and the user's files must not go with it."""
    moved, name = [], None
    try:
        for name in os.listdir(target):
            if name.split(".tmp-")[0] not in _FORMAT_NAMES and _pid_of(name) is None:
                moved.append(name)  # (first: an interrupt may land between the two)
                os.rename(os.path.join(target, name), os.path.join(build, name))
    except BaseException as e:
        failed = name
        for name in reversed(moved):
            if os.path.lexists(os.path.join(build, name)):
                os.rename(os.path.join(build, name), os.path.join(target, name))
        if isinstance(e, OSError):
            raise type(e)(e.errno, f"{target}: cannot move {failed!r}, which is not the store's, into "
                                   f"the new store ({e.strerror}); the old store and every file "
                                   f"are kept where they were") from e
        raise


def _exchange(a, b):
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where that is
    not available (other platforms, old kernels, file systems such as NFS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (ImportError, OSError, AttributeError):  # pragma: no cover - musl, very old glibc
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _fsync_tree(root, recurse=True):
    """fsync every file and directory under root (root alone when not recurse); what is
    neither (a symlink, a FIFO: not a store's) is skipped."""
    for top, dirs, files in os.walk(root) if recurse else [(root, [], [])]:
        for path in [os.path.join(top, name) for name in files] + [top]:
            if path != top and not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            fd = os.open(path, _O_READ | (_O_NOFOLLOW if path != top else 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _is_store(path, kind, strays=True):
    """Whether the directory at path holds a store (of a sequence kind, None: any; strays: refuse
    entries named like a store's that no creation left, see _stray). Without type.ninja
    it holds none yet: a store being created, or the parts a creation killed before its end
    left, which hold no sample (and at most the one byte of an empty store's data.ninja).
    Samples or data without type.ninja are damage or a copy in progress, not an empty store."""
    if os.path.lexists(os.path.join(path, "type.ninja")):
        return True
    _check_directory(path)
    _check_swap(path)
    try:
        n = _count(path) if os.path.lexists(os.path.join(path, "starts", "shape.ninja")) else 0
    except (OSError, ValueError):  # (a creation killed while writing it)
        n = 0
    data = os.path.join(path, "data.ninja")
    size = 0  # (-1: a data.ninja that is no regular file, which no creation leaves)
    if os.path.lexists(data):
        try:
            info = os.stat(data)
            size = info.st_size if stat.S_ISREG(info.st_mode) else -1
        except OSError:  # (a dangling link, a loop)
            size = -1
    stray = None
    if n:
        held = f"{n} samples"
    elif size > 1:
        held = f"{size} bytes of data in data.ninja"
    elif size < 0:
        held = "a data.ninja that is no regular file"
    else:
        held = stray = _stray(path) if strays else None
    if held is None:
        return False
    old = sorted(name for name in os.listdir(path) if _pid_of(name) is not None)
    if old:  # (_swap_in's entry-by-entry swap, killed midway)
        raise ValueError(f"{path}: type.ninja is missing, but the directory holds {held}: a "
                         f"re-creation was killed while it swapped the new store in; the old "
                         f"store is in {os.path.join(path, old[0])}: move its files back, or "
                         f"remove the directory to start afresh")
    if stray:
        raise _stray_error(path, stray)
    where = os.path.join(path, "type.ninja")
    restore = f"if it is a {kind} store, restore the file (printf {kind} > {where})" if kind else \
        f"restore {where} (its kind: ragged, string or numpy)"
    raise ValueError(f"{path}: type.ninja is missing, but the directory holds {held}: the "
                     f"store is damaged, or not completely copied (finish the copy); {restore}, "
                     f"or remove the directory to start afresh")


def _check_swap(path):
    """Refuse a directory without type.ninja whose store an entry-by-entry swap (_swap_in)
    moved aside into .ninja-old-*: killed before it finished, it holds no store to read as
    empty; still at work (its process holds the lock), it is read again once done (see
    _load_from_one_directory)."""
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else ():
        aside, pid = os.path.join(path, name), _pid_of(name, ".ninja-old-")  # (type.ninja: its first move)
        if pid is None or not os.path.lexists(os.path.join(aside, "type.ninja")):
            continue
        if _alive(pid) and _locked_dir(path):
            raise ValueError(f"{path}: process {pid} is swapping a new store in entry by entry (its "
                             f"old store is in {aside}); open it again once it is done")
        raise ValueError(f"{path}: type.ninja is missing and the store's files are in {aside}: a "
                         f"re-creation was killed while it swapped a new store in entry by entry; "
                         f"create the store again (from_* at this path replaces it), or restore the "
                         f"old one: remove the store's files from {path} (not your own), move those "
                         f"of {aside} back, then remove {aside}")


def _locked_dir(path):
    """Whether another thread or process holds the writer lock of the directory at path."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    except OSError:
        return False
    try:
        return bool(_locked_by_another(fd, os.fstat(fd)))
    finally:
        os.close(fd)


def _stray(path, data_ok=False):
    """In a directory without type.ninja, the first format-named entry that a creation killed
    before its end does not leave (it leaves a store's empty metadata: format names only, each
    data.ninja at most one byte; data_ok: any size, as a killed swap leaves), else None. Such
    an entry is someone else's: a store made there would replace it, and a writer clearing the
    leftovers would delete it."""
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else ():
        if name.split(".tmp-")[0] not in _FORMAT_NAMES:
            continue  # (not the format's: kept wherever a store is made)
        top = os.path.join(path, name)
        tree = os.walk(top) if os.path.isdir(top) and not os.path.islink(top) else [(path, [], [name])]
        for where, dirs, files in tree:
            for entry in dirs + files:
                full = os.path.join(where, entry)
                if entry.split(".tmp-")[0] not in _FORMAT_NAMES or os.path.islink(full) or (
                        entry == "data.ninja" and not data_ok and os.lstat(full).st_size > 1):
                    return full
    return None


def _stray_error(path, stray):
    return ValueError(f"{path} holds {stray}, named like a part of a store, but no type.ninja, and "
                      f"it is not what a killed creation leaves: mmap_ninja neither reads, replaces "
                      f"nor removes it; move it elsewhere, or use another directory")


def _clear_unfinished(store_dir):
    """A directory without type.ninja holds no store: remove the parts a creation killed
    before its end left (format names and their temporary files only; a writer, under the lock)."""
    for name in os.listdir(store_dir):
        path = os.path.join(store_dir, name)
        if name.split(".tmp-")[0] in _FORMAT_NAMES:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)


###################################################################################################
# Progress: tqdm when installed, otherwise a small text bar on stderr
###################################################################################################
def _progress(iterable, total=None, desc="", verbose=False):
    if not verbose:
        return iterable
    if total is None:
        total = _length(iterable)  # (None when it has none, or its __len__ raises TypeError)
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
# Cold reads: data that is not in the page cache
###################################################################################################
# A page fault on a mapping reads a whole read-around window (8 MB on this project's VM)
# synchronously: right for scans, ruinous for random samples (16 to 950 times the bytes asked;
# with MADV_RANDOM, one synchronous 4 KB read per page instead). Asking the kernel for a
# sample's pages first (MADV_WILLNEED: the I/O is asynchronous) makes a cold read cost what
# os.pread of the same bytes costs, and lets a batch's reads overlap. But the call costs 0.7 us
# per page even when the pages are there, several times a hot read, so a store asks only while
# its data is found cold, by probing a byte now and then with os.preadv(RWF_NOWAIT), which fails
# rather than wait for the disk (and starts that read). Where madvise or the probe is missing,
# reads are plain; store.cold = True asks anyway.
_ADVISE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_WILLNEED")

_PROBE = hasattr(os, "preadv") and hasattr(os, "RWF_NOWAIT")

_CHUNK = 128 << 10  # bytes per WILLNEED call where sysfs does not say more (_honoured); gaps read along

_SYSFS = "/sys"
_HONOURED = {}  # st_dev: the WILLNEED size asked per call for files on that device (_honoured)


def _honoured(fd):
    """The bytes to ask for per WILLNEED call for fd's file: the kernel cuts a call to the
    larger of its device's read-ahead and largest request (queue/read_ahead_kb, max_sectors_kb),
    and fewer, larger calls read faster (2 MB ones: a cold quasi-random epoch 1.31 -> 1.63 GB/s
    here). That, up to 2 MB, where sysfs says it; else 128 KB (a file system without a block
    device of its own: tmpfs, NFS, btrfs, overlay)."""
    dev = os.fstat(fd).st_dev
    if dev not in _HONOURED:
        honoured, base = 0, os.path.join(_SYSFS, "dev", "block", f"{os.major(dev)}:{os.minor(dev)}")
        for queue in (os.path.join(base, "queue"), os.path.join(base, "..", "queue")):  # (a partition's: its disk's)
            with contextlib.suppress(OSError, ValueError):
                honoured = max(int(_read_text(os.path.join(queue, name), "sysfs", 64)) << 10
                               for name in ("read_ahead_kb", "max_sectors_kb"))
                break
        honoured -= honoured % mmap.PAGESIZE  # (whole pages: each call must start on one)
        _HONOURED[dev] = min(honoured, 2 << 20) if honoured >= mmap.PAGESIZE else _CHUNK
    return _HONOURED[dev]


class _ColdSlices:
    """What the store's hot path slices (store._source) instead of the data while the data is
    found cold: slicing it asks for the slice's pages first. One per mapping, holding that
    mapping's data: asking lets other threads run, and a remap meanwhile (another thread's
    append, say) would give the offsets the hot path read with the old maps the bytes of new
    ones, so a slice that a remap overtook misses (IndexError) into the slow path."""

    __slots__ = ("io", "data", "mm", "itemsize")

    def __init__(self, io):
        self.io, self.data, self.mm, self.itemsize = io, io.data, io.mm, io.itemsize

    def __getitem__(self, item):  # item is a slice of elements
        io = self.io
        start, stop = item.start * self.itemsize, item.stop * self.itemsize
        io.count += 1
        if stop > start and (io.count % io.PROBE_EVERY or not io.seen(start)):
            _willneed(self.mm, start, stop, io.chunk)
        try:
            sample = self.data[item]
        except ValueError:  # (a strings store's map, which the remap closed)
            raise IndexError from None
        if io.slices is not self:  # (a remap began meanwhile: the offsets may be another map's)
            raise IndexError
        return sample


class _ReadAhead:
    """The cold-read state of one mapping of a store's data. While the data is found cold the
    store's hot path reads through a _ColdSlices, which asks for a sample's pages first. Batch
    reads ask for all their samples' pages; scans are left to the kernel's own read-ahead,
    which reads sequentially in large blocks."""

    PROBE_EVERY = 64  # probe every 64th read (single or batch) to notice the data turning
    HOT_AFTER = 16    # consecutive resident probes before cold data is called hot again
    PENDING = 8       # prefetches waiting for the aside thread, at most (older ones are dropped)

    def __init__(self, store):
        # (a weak reference: a store dropped without close() is freed at once, maps and all)
        self.store, self.data, self.mm, self.fd, self.itemsize = weakref.ref(store), None, None, None, 1
        self.slices = None  # the _ColdSlices the store's hot path reads through, while cold
        self.cold, self.forced, self.count, self.streak, self.scanning = False, None, 0, 0, 0
        self.chunk = _CHUNK  # bytes per WILLNEED call (_honoured)
        self.asked = []  # the byte ranges of the last prefetches: (starts, ends) arrays
        self.pending = collections.deque(maxlen=self.PENDING)  # prefetches not yet asked for: ranges
        self.aside, self.aside_pid = None, 0  # the thread asking for them (_advise_aside), and its process
        self.probing = False  # whether fd can tell cached pages (_resident)
        self.nowait = _PROBE  # whether the file system may (False once a probe found it cannot)

    def remap(self, data, mm, path, itemsize, starts):
        """A new mapping of the data (the store's verdict carries over remaps; a first mapping
        probes a few samples across the store, at start indices starts)."""
        self.close()
        self.data, self.mm, self.itemsize = data, mm, itemsize
        if mm is not None and (_PROBE or hasattr(os, "posix_fadvise")):  # (to probe, and to prefetch)
            self.fd = os.open(path, _O_READ)
            self.chunk, self.probing = _honoured(self.fd), self.nowait
        first = self.count == 0 and self.forced is None
        self.count += 1
        for i in sorted({0, len(starts) // 3, 2 * len(starts) // 3, len(starts) - 1}) if first and len(starts) else ():
            self.seen(starts[i] * itemsize)
        self.set(self.cold)

    def resident(self, offset):
        """Whether the page holding byte offset is in the page cache (True when that cannot be
        told); probing a page that is not starts reading it."""
        if not self.probing or self.fd is None or not 0 <= offset < len(self.mm):
            return True
        resident = _resident(self.fd, offset)
        if resident is None:  # a file system without RWF_NOWAIT (NFS, CIFS): stop probing
            self.probing = self.nowait = False
        return resident is not False

    def seen(self, offset):
        """Probe one byte offset and update the verdict (one miss: cold; HOT_AFTER hits in a
        row: hot); returns whether it was resident. (Called from the hot path too, lock-free:
        a new verdict is set under the store's mutex, so that it never installs a mapping that
        a remap is replacing; never waiting for it, so that a read never waits for a writer.)"""
        resident = self.resident(offset)
        self.streak = self.streak + 1 if resident else 0
        cold = not resident or (self.cold and self.streak < self.HOT_AFTER)
        store = self.store()
        if self.forced is None and cold != self.cold and store is not None:
            mutex = store._lock()
            if mutex.acquire(blocking=False):  # (busy: a writer; a later probe sets it)
                try:
                    if self.forced is None and cold != self.cold:
                        self.set(cold)
                finally:
                    mutex.release()
        return resident

    def set(self, cold):
        """Read the data as cold or not (under the store's mutex)."""
        self.cold = cold
        store = self.store()
        self.slices = _ColdSlices(self) if cold and self.data is not None else None
        if store is not None:
            store._source = self.data if self.slices is None else self.slices

    def due(self):
        """Whether the next batch read needs batch(): always while cold, now and then while hot."""
        self.count += 1
        return self.cold or self.count % self.PROBE_EVERY == 0

    def batch(self, starts, ends):
        """Before reading samples with these element offsets (int64 arrays, when due()): while
        cold, ask for their pages unless probes find them there (prefetched, say); while hot,
        probe one. A scan (iteration) is left to the kernel's read-ahead."""
        if not len(starts) or self.scanning:
            return
        probes = [self.seen(int(starts[k]) * self.itemsize) for k in {0, len(starts) // 2}]
        starts, ends = starts * self.itemsize, ends * self.itemsize
        # (where nothing can be probed, cold data is asked for)
        if self.cold and not (self.probing and all(probes)) and not self.asked_for(starts, ends):
            self.ask(starts, ends)

    def ask(self, starts, ends, prefetch=False):
        """MADV_WILLNEED for the byte ranges [starts, ends) (arrays), joined where they nearly
        touch (a gap under one chunk is read along). A prefetch is asked for by a thread of its
        own, which skips chunks found cached, so that it returns at once (asking costs 0.7 us
        per page: ~14 ms for 64 MB); and it is remembered (the last two), so that the batch
        reads it announced do not ask again while the pages are on their way (a probe cannot
        tell pages being read from pages not asked for)."""
        ranges = _joined(starts, ends)
        if prefetch:
            self.asked = self.asked[-1:] + [ranges]
            middles = (ranges[0] + ranges[1]) // 2  # (a range's first page may be its neighbour's)
            cached = all([self.resident(m) for m in middles[::max(1, len(middles) // 8)].tolist()])
            if cached and self.probing:
                return  # (a few probes across the ranges found them all cached)
        if prefetch and self.fd is not None and hasattr(os, "posix_fadvise"):
            with _ASIDE_LOCK:  # one thread per store asks, in the order asked; it ends when done
                self.pending.append(ranges)
                new = None
                if self.aside is None or self.aside_pid != os.getpid():  # (none, or the parent's)
                    new = self.aside = _aside_thread(self)
                    self.aside_pid = os.getpid()
                running = self.aside is not None
            if new is not None:  # (started with the lock released: starting runs code, GC too)
                running = _start_aside(new, self)
            if running:
                return
            self.pending.clear()  # (no thread could start: asked for here)
        for lo, hi in zip(*(r.tolist() for r in ranges)):
            _willneed(self.mm, lo, hi, self.chunk)

    def asked_for(self, starts, ends):
        """Whether every byte range [starts, ends) lies in a range of the last prefetches."""
        for lo, hi in self.asked:
            k = np.searchsorted(lo, starts, "right") - 1
            if ((k >= 0) & (ends <= hi[np.maximum(k, 0)])).all():
                return True
        return False

    @contextlib.contextmanager
    def scan(self):
        """A sequential pass: cold data is read ahead by the kernel, in large blocks (and pages
        are dropped sooner after use, MADV_SEQUENTIAL), not sample by sample."""
        self.scanning += 1
        mm = self.mm  # (the map advised: close() or a remap may drop it meanwhile)
        sequential = self.cold and _ADVISE and mm is not None
        if sequential:
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap.MADV_SEQUENTIAL)
        try:
            yield
        finally:
            self.scanning -= 1
            if sequential:
                with contextlib.suppress(OSError, ValueError):  # (ValueError: closed meanwhile)
                    mm.madvise(mmap.MADV_NORMAL)

    def close(self):  # (under the store's mutex, or from __del__: never two at once)
        fd, self.fd, self.probing, self.asked, self.slices = self.fd, None, False, [], None
        self.aside = None  # (a thread still asking stops: a remap may bring a new file)
        self.pending.clear()
        if fd is not None:
            os.close(fd)

    __del__ = close


def _joined(starts, ends):
    """Byte ranges [starts, ends) (arrays) sorted and joined where they nearly touch."""
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    first = np.r_[0, np.flatnonzero(starts[1:] > ends[:-1] + _CHUNK) + 1]
    return starts[first], ends[np.r_[first[1:] - 1, len(starts) - 1]]


def _willneed(mm, start, stop, chunk=_CHUNK):
    """Ask the kernel to start reading bytes [start, stop) of mm, in chunks it honours whole."""
    if not _ADVISE or mm is None:
        return
    start -= start % mmap.PAGESIZE
    try:  # (mm may have been closed meanwhile: by another thread's remap, or close())
        stop = min(stop, len(mm))
        for offset in range(start, stop, chunk):
            mm.madvise(mmap.MADV_WILLNEED, offset, min(chunk, stop - offset))
    except (OSError, ValueError):  # (advice only: reading works without it)
        pass


# A store's prefetches are asked for by one thread at a time, on a descriptor of its own: at
# most one thread and one descriptor per store, whatever the loader announces, and at most
# PENDING prefetches waiting (a loader far ahead of the disk drops its oldest). A forked child
# has none of these threads: it closes their descriptors, and a prefetch there starts its own.
_ASIDE_LOCK = threading.RLock()  # guards every _ReadAhead's pending and aside
_ASIDE_FDS = set()  # the descriptors the aside threads hold


def _aside_thread(io):
    """A thread to ask for io's pending prefetches, not started, with a descriptor of its own
    (None if there is none to be had: the prefetches are advice only). Under _ASIDE_LOCK."""
    try:
        fd = os.dup(io.fd)
    except (OSError, TypeError):  # (out of descriptors; closed)
        return None
    _ASIDE_FDS.add(fd)
    # (a weak reference: a store dropped meanwhile is freed at once, and its prefetches with it)
    thread = threading.Thread(target=_advise_aside, args=(weakref.ref(io), fd), daemon=True)
    thread.fd = fd
    return thread


def _start_aside(thread, io):
    """Start io's new aside thread; False if it cannot (out of threads)."""
    try:
        thread.start()
        return True
    except RuntimeError:
        with _ASIDE_LOCK:
            if io.aside is thread:
                io.aside = None
            _ASIDE_FDS.discard(thread.fd)
            os.close(thread.fd)
        return False


def _advise_aside(ref, fd):
    """_willneed's work for the pending prefetches of ref() (a _ReadAhead), oldest first,
    through fd (posix_fadvise releases the GIL); ends, closing fd, when none are left."""
    try:
        while True:
            with _ASIDE_LOCK:
                io = ref()
                if io is None or io.aside is not threading.current_thread():
                    return  # (the store is gone, or closed or remapped: its file may be another)
                try:
                    (starts, ends), chunk = io.pending.popleft(), io.chunk
                except IndexError:  # (nothing is left)
                    io.aside = None
                    return
                io = None
            with contextlib.suppress(OSError):  # (advice only)
                for lo, hi in zip(starts.tolist(), ends.tolist()):
                    for offset in range(lo - lo % mmap.PAGESIZE, hi, chunk):
                        os.posix_fadvise(fd, offset, min(chunk, hi - offset), os.POSIX_FADV_WILLNEED)
    finally:
        with _ASIDE_LOCK:
            io = ref()
            if io is not None and io.aside is threading.current_thread():
                io.aside = None
            _ASIDE_FDS.discard(fd)
            os.close(fd)


def _after_fork_in_child():
    global _ASIDE_LOCK
    _ASIDE_LOCK = threading.RLock()  # (a thread of the parent may have held it)
    for fd in _ASIDE_FDS | _LOCK_FDS:  # (closing a copy never unlocks the parent's flock)
        with contextlib.suppress(OSError):
            os.close(fd)
    _ASIDE_FDS.clear()
    _LOCK_FDS.clear()
    _LOCKED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: _ASIDE_LOCK.acquire(), after_in_parent=lambda: _ASIDE_LOCK.release(),
                        after_in_child=_after_fork_in_child)


def _resident(fd, offset):
    """Whether the page of fd's file holding byte offset is in the page cache (None: cannot
    tell). A 1-byte read that fails rather than wait for the disk, and starts that read."""
    try:
        os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    except (OSError, AttributeError):
        return None
    return True


###################################################################################################
# base: Wrapped
###################################################################################################
class Wrapped:
    """Apply ``wrapper_fn`` lazily to each sample of ``data`` on ``__getitem__``.

    By default the sample is copied first, so ``wrapper_fn`` gets a writable array it owns
    (``torch.from_numpy`` then warns about nothing). As in the published package, a slice or
    list index passes ``data[item]`` (a batch array for a numpy store) to one call of
    ``wrapper_fn``. Pickles small when ``data`` is one of this module's stores.
    """

    def __init__(self, data, wrapper_fn, copy_before_wrapper_fn=True):
        self.data = data
        self.wrapper_fn = wrapper_fn
        self.copy_before_wrapper_fn = copy_before_wrapper_fn

    def _wrap(self, sample):
        return self.wrapper_fn(_copy(sample) if self.copy_before_wrapper_fn else sample)

    def __getitem__(self, item):
        return self._wrap(self.data[item])

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

    # np.memmap turns what is no longer its map (a copy, a ufunc's result, a reduction) into a
    # plain array or a numpy scalar, but only for np.memmap itself: the same for this subclass,
    # so that m.sum() is a numpy scalar (hashable) and m[[0, 2]] an ndarray, as in the published package
    def __array_wrap__(self, arr, context=None, return_scalar=None):
        arr = super().__array_wrap__(arr, context)
        if self is arr:  # (a ufunc's output given as this map)
            return arr
        if arr.shape == () if return_scalar is None else return_scalar:  # (numpy < 2 passes none)
            return arr[()]
        return arr.view(np.ndarray)

    def __getitem__(self, index):  # (np.memmap's own, for this subclass)
        res = np.ndarray.__getitem__(self, index)
        if type(res) is _NinjaMemmap and res._mmap is None:
            return res.view(np.ndarray)
        return res

    def __reduce__(self):
        if self._ninja_dir is None:
            return np.array(self).__reduce__()
        return (_reopen_memmap, (self._ninja_dir, self.mode, self.shape))


def _reopen_memmap(out_dir, mode, shape):
    return _open_memmap(out_dir, mode, rows=shape[0] if shape else None)


def _open_memmap(out_dir, mode="r", rows=None):
    out_dir = os.fspath(out_dir)
    return _from_one_directory(out_dir, lambda: _map_memmap(out_dir, mode, rows), lambda: None)


_MODE_NAMES = {"readonly": "r", "readwrite": "r+", "copyonwrite": "c"}  # numpy's (np.memmap's) long names


def _map_memmap(out_dir, mode, rows):
    mode = _MODE_NAMES.get(mode, mode) if isinstance(mode, str) else mode
    if mode not in ("r", "r+", "c"):
        raise ValueError(f"{out_dir}: mode must be 'r', 'r+' or 'c', got {mode!r}")
    _check_directory(out_dir)
    kind = _read_kind(out_dir)
    if kind != "numpy":
        raise ValueError(f"{out_dir} is a {kind} store, not a numpy store; open it with "
                         f"mmap_ninja.open_existing")
    dtype, shape, order = _read_meta(out_dir)
    if rows is not None and shape:
        shape = (min(rows, shape[0]),) + shape[1:]
    path = os.path.join(out_dir, "data.ninja")
    nbytes = math.prod(shape) * dtype.itemsize
    fd = _open_fd(path, "data", mode == "r+", out_dir, linked=True)  # (regular file, inside the store)
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size < nbytes or (not shape and size != nbytes):  # (a 0-d store holds exactly one item)
        raise ValueError(f"{path} holds {size} bytes but shape.ninja says {shape} of {dtype}, "
                         f"{nbytes} bytes: the store is damaged")
    if nbytes == 0:  # mmap cannot map nothing; an empty memmap-typed array stands in
        arr = np.ndarray.__new__(_NinjaMemmap, shape, dtype, order=order)
        arr.mode, arr.offset = mode, 0
    else:
        arr = _NinjaMemmap(path, dtype=dtype, mode=mode, shape=shape, order=order)
    arr._ninja_dir = _absolute(out_dir)
    arr.filename = os.path.join(arr._ninja_dir, "data.ninja")  # (numpy's abspath takes link/.. lexically)
    return arr


def np_open_existing(out_dir, mode="r"):
    """Open the numpy store in ``out_dir`` as a ``np.memmap`` (``mode`` "r", "r+" or "c")."""
    return _open_memmap(out_dir, mode)


def np_empty(out_dir, dtype, shape, order="C", *, durable=False):
    """Create a numpy store of zeros and return it as a writable ``np.memmap`` (``durable``:
    fsync-ed first)."""
    dtype = np.dtype(dtype)
    try:  # (ints only, as numpy takes them: int(2.7) would make a store of 2)
        given = [shape] if np.ndim(shape) == 0 else list(shape)
        if any(isinstance(a, (bool, np.bool_)) for a in given):
            raise TypeError("a bool is not a length")
        shape = tuple(map(operator.index, given))
    except TypeError as e:
        raise TypeError(f"{out_dir}: shape must be an int or a sequence of ints, got {_short(shape)} ({e})") from e
    if order not in ("C", "F", "c", "f"):
        raise ValueError(f"{out_dir}: order must be 'C' or 'F', got {order!r}")
    order = order.upper()
    nbytes = math.prod(shape) * dtype.itemsize
    if not _makeable(shape, dtype.itemsize):
        raise ValueError(f"{out_dir}: cannot make a store of shape {_short(shape)} and dtype {dtype}: "
                         f"axes must be >= 0, at most 64 of them, and the nonzero ones must span "
                         f"fewer than 2**63 bytes (numpy's limits)")
    with _creating(out_dir, durable) as build:
        _write_meta(build, dtype, shape, order, data=b"")
        fd = _open_fd(os.path.join(build, "data.ninja"), "data", True, build)
        try:  # blocks allocated now: on a full disk, ENOSPC here rather than SIGBUS at first write
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, max(nbytes, 1))
            else:  # pragma: no cover - macOS, Windows: a sparse file
                os.ftruncate(fd, max(nbytes, 1))
        finally:
            os.close(fd)
    return _open_memmap(out_dir, "r+")


def np_from_ndarray(out_dir, arr, *, durable=False):
    """Write ``arr`` as a numpy store in ``out_dir``; returns it as a writable ``np.memmap``.
    ``durable``: fsync the store (and its swap into place) before returning."""
    arr = _as_sample(arr, out_dir)
    order = "F" if arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
    with _creating(out_dir, durable) as build:
        if arr.ndim == 0:
            _write_meta(build, arr.dtype, (), order, data=arr.tobytes())
        else:
            _write_meta(build, arr.dtype, (0,) + arr.shape[1:], order)
            with _NumpyWriter(build, creating=True) as writer:
                writer.write([np.asarray(arr, order=order).reshape(-1, order="A")], arr.shape[0])
    return _open_memmap(out_dir, "r+")


def np_from_generator(out_dir, sample_generator, batch_size, verbose=False, *, durable=False):
    """Stack the samples of a generator into a numpy store; at most one batch is held in memory.
    The store appears when the generator is exhausted (an old one stays until then);
    ``durable``: fsync-ed first."""
    batch_size = _check_batch_size(batch_size)
    samples = iter(_progress(sample_generator, desc="numpy", verbose=verbose))
    with _creating(out_dir, durable) as build:
        first = list(itertools.islice(samples, batch_size))
        if not first:
            raise ValueError(f"{out_dir}: the generator yielded no samples, so the store's dtype "
                             f"and shape cannot be inferred; use np_empty(out_dir, dtype, shape)")
        # the first sample chooses the row shape; the first batch the dtype, as numpy stacks it
        # (and the published package): np.float32(1) then 0.1 make float64, 1 then 2.5 float64
        rows = [_as_sample(x, out_dir) for x in first]
        dtype = rows[0].dtype
        if any(r.dtype != dtype for r in rows):  # (promote_types: native byte order, so only then)
            try:
                promoted = functools.reduce(np.promote_types, (r.dtype for r in rows))
                # (int64 with uint64 promotes to float64, which would refuse big IDs: keep the first)
                dtype = dtype if promoted.kind == "f" and all(r.dtype.kind in "biu" for r in rows) else promoted
            except TypeError:  # (kinds that do not promote: the first one's, cast as appends are)
                pass
        _write_meta(build, dtype, (0,) + rows[0].shape)
        batches = itertools.chain(iter(rows), samples)  # (an iterator lets the list go once read:
        del first, rows  # memory holds one batch)
        with _NumpyWriter(build) as writer:
            _write_batches(batches, batch_size, writer.extend_rows)
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


def np_append(np_mmap, arr, durable=False):
    """Append one sample (one row) to the store that ``np_mmap`` was opened from."""
    out_dir = _memmap_dir(np_mmap)
    np_extend_dir(out_dir, np.expand_dims(_as_sample(arr, out_dir), 0), durable)


def _memmap_dir(np_mmap):
    filename = getattr(np_mmap, "filename", None)
    if not filename:
        raise TypeError(f"expected a np.memmap opened by mmap_ninja, got {type(np_mmap).__name__}")
    return os.path.dirname(filename)  # (in any mode, as published: appends write the store, not the map)


class _NumpyWriter:
    """Appends rows to one numpy store: write the bytes past the end, then commit the length."""

    def __init__(self, out_dir, durable=False, creating=False):
        self.out_dir = out_dir
        self.durable = durable
        self.creating = creating  # a new Fortran-order store is written whole, once
        self.lock = _Lock(out_dir)
        self.fd = self.shape_fd = None

    def __enter__(self):
        # _from_one_directory's loop, with the lock's descriptor (which holds the directory
        # already) as its witness: opening the directory once more would add 2 us per append
        for _ in range(100):
            self._open()
            if self.lock.current():  # (the files opened by path are the locked store's)
                return self
            self.__exit__()  # re-created between the lock and the opens: lock the new one
        raise RuntimeError(f"{self.out_dir}: the store was re-created 100 times while this process "
                           f"opened it; append once its writer is done")

    def _open(self):
        _check_directory(self.out_dir)
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
            self.rowbytes = math.prod(self.tail) * self.dtype.itemsize
            join = os.path.join
            self.fd = _open_fd(join(self.out_dir, "data.ninja"), "data", True, self.out_dir)
            _check_size(join(self.out_dir, "data.ninja"), self.rows * self.rowbytes, "data")
            self.shape_fd = _open_fd(join(self.out_dir, "shape.ninja"), "shape", True, self.out_dir)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc):
        for fd in (self.fd, self.shape_fd):
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
        with _naming(self.out_dir):
            _write_at(self.fd, self.rows * self.rowbytes, _pack(chunks, rows * self.rowbytes))
            if self.durable:
                os.fsync(self.fd)
            self.rows += rows
            _set_length(self.shape_fd, self.rows)
            if self.durable:
                os.fsync(self.shape_fd)


###################################################################################################
# Sequence stores (ragged and strings): the writer and the snapshot reader
###################################################################################################
class _PartWriter:
    """The writer's side of one numpy store inside a ragged or strings store (data, starts,
    ends, ...): its data and shape.ninja descriptors stay open between appends."""

    def __init__(self, store_dir, root, itemsize=8, raw=False):
        self.data_path = os.path.join(store_dir, "data.ninja")
        self.shape_path = None if raw else os.path.join(store_dir, "shape.ninja")
        self.root, self.itemsize = root, itemsize
        self.fd = self.shape_fd = self.pos = None

    def open_shape(self):
        if self.shape_fd is None:
            self.shape_fd = _open_fd(self.shape_path, "shape", True, self.root)
        return self.shape_fd

    def open(self):
        if self.fd is None:
            self.fd = _open_fd(self.data_path, "data", True, self.root)
        if self.shape_path is not None:
            self.open_shape()

    def write(self, offset_items, chunks, total_items, durable):  # (after open: see open_all)
        offset = offset_items * self.itemsize
        if self.pos == offset:  # we wrote up to here and nobody has since (see _SequenceWriter.sync)
            self.pos = offset + _write_chunks(self.fd, chunks)
        else:  # checks the size and drops a dead writer's torn bytes
            end = _write_at(self.fd, offset, chunks)
            self.pos = end if end > offset else None  # (writing nothing does not move the descriptor)
        if durable:
            os.fsync(self.fd)
        self.new_length = offset_items + total_items

    def commit(self, durable):
        if self.shape_path is not None:
            _set_length(self.open_shape(), self.new_length)
            if durable:
                os.fsync(self.shape_fd)

    def close(self):
        for fd in (self.fd, self.shape_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.shape_fd = self.pos = None


def _count(store_dir, fd=None):
    """The committed number of samples of a ragged or strings store: len(starts) (read through
    fd, starts/shape.ninja held open, when given)."""
    path = os.path.join(store_dir, "starts", "shape.ninja")
    raw = _pread(fd, 8, 0) if fd is not None else _read_bytes(path, "sample count", 8 * 64)
    if len(raw) < 8:
        raise ValueError(f"{path} is {len(raw)} bytes, too short to hold the sample count: "
                         f"the store is damaged")
    return _U64.unpack_from(raw)[0]


def _shapes_dir(store_dir):
    """Where the shapes of a ragged store live; a writer killed while converting flat shapes
    to ragged ones may have left them complete under shapes.new."""
    path = os.path.join(store_dir, "shapes")
    if not os.path.isdir(path) and os.path.isdir(path + ".new"):
        return path + ".new"
    return path


def _create_sequence(store_dir, dtype, nested, raw=False, zstd=None, durable=False, part=False):
    """Metadata of an empty ragged (or strings, raw=True) store, in a directory without one;
    type.ninja is written last (atomically, unless the store is part of one being created)."""
    os.makedirs(store_dir, exist_ok=True)
    join = os.path.join
    for name in ("starts", "ends") + (() if raw else ("flattened_shapes",)):
        _write_meta(join(store_dir, name), np.int64, (0,), durable=durable)
    if raw:
        if zstd is not None:
            level, dictionary = zstd
            if dictionary is not None:
                _create_file(join(store_dir, "zstd_dict.ninja"), dictionary, durable)
            _create_file(join(store_dir, "zstd_level.ninja"), str(level).encode(), durable)
        _create_file(join(store_dir, "data.ninja"), b"\0", durable)  # (one byte: see _write_meta)
        kind = b"string"
    else:
        shapes = join(store_dir, "shapes")
        if nested:
            _create_sequence(shapes, np.int64, nested=False, durable=durable, part=True)
        else:
            _write_meta(shapes, np.int64, (0, 1), durable=durable)
        _create_file(join(store_dir, "shapes_are_flat.ninja"), _I32.pack(0 if nested else 1), durable)
        _write_meta(store_dir, dtype, (0,), kind="ragged", durable=durable, typed=False)
        kind = b"ragged"
    (_create_file if part else _replace_file)(join(store_dir, "type.ninja"), kind, durable)


class _SequenceWriter:
    """Appends samples to a ragged store (or the raw bytes of a strings store) in place.

    Everything is written past the committed end first; then the lengths are committed in the
    order data, shapes, flattened_shapes, ends, starts, so that len(starts) (the sample count)
    moves last. A nested shapes store is written the same way, before its parent's counts.
    Descriptors and the count stay cached between appends; ``sync`` (under the store's lock)
    re-reads them when another writer has been at the store, and refuses a store whose files
    do not hold what its metadata commits.
    """

    def __init__(self, store_dir, durable=False, raw=False, root=None):
        self.store_dir, self.durable, self.raw = store_dir, durable, raw
        self.root = store_dir if root is None else root  # writes never leave this directory
        self.pid = os.getpid()  # a forked child makes its own writer (see _Sequence._writing)
        self.n = None  # the count this writer last saw committed; None: read it again
        self.lock = _Lock(store_dir)
        self.links = 1  # the links of the count file, as stale() last found them
        self.columns = {}
        self.nested = None
        self.shapes_ino = None
        self.compress = None  # a zstd strings store's compressor, read from its files

    def stale(self):
        """Whether the store this writer holds was deleted (re-created by from_*) since its
        last append: its directory, or its cached count file, has no name left."""
        starts = self.columns.get("starts")
        if self.lock.fd is not None and os.fstat(self.lock.fd).st_nlink == 0:
            return True
        count_fd = starts.shape_fd if starts is not None else None
        self.links = os.fstat(count_fd).st_nlink if count_fd is not None else 1
        return self.links == 0

    def sync(self, n=None):
        """Make the cached state match the disk; n: the parent's count for a nested store."""
        d = self.store_dir
        if self.links > 1:  # (linked since its files were opened: cp -al of a store being written)
            raise _hard_linked(os.path.join(d, "starts", "shape.ninja"), self.links)
        if n is None:
            starts = self.columns.get("starts")
            n = _count(d, starts.open_shape() if starts is not None else None)
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
            if not self.raw:
                _repair_shapes(d)
                self.dtype = _read_meta(d)[0]
                self.shapes_ino = os.stat(shapes_dir).st_ino
                if os.path.isdir(os.path.join(shapes_dir, "starts")):
                    self.nested = _SequenceWriter(shapes_dir, self.durable, root=self.root)
                    self.nested.sync(n)
            else:
                self.compress = (_zstd_codec(d) or (None,))[0]
            self.end = self._check_committed(n)
            if self.raw and self.compress is None and n and _starts_with_zstd_frame(d):
                raise _lost_zstd_level(d)  # (plain strings appended to it would be unreadable)
            self.n = n
        return n

    def open_all(self):
        """Open every file an append writes (once per sync that re-read the store), so that one
        refused (a link) refuses the append before anything is written."""
        starts = self.columns.get("starts")
        if starts is None or starts.shape_fd is None:
            for name in ("data",) + self._index_names():
                self._part(name).open()
            if self.nested is not None:
                self.nested.open_all()

    def _index_names(self):
        """The index stores of this store that an append writes (a nested shapes/ has its own writer)."""
        return ("starts", "ends") + (() if self.raw else ("flattened_shapes",) + (() if self.nested else ("shapes",)))

    def _check_committed(self, n):
        """The end of the last of n samples, after checking that every file holds what the
        metadata commits: appending to a store that lost data would make the loss silent."""
        join, d = os.path.join, self.store_dir
        for name in self._index_names():
            _check_index(join(d, name), n, (1,) if name == "shapes" else ())
            _check_size(join(d, name, "data.ninja"), 8 * n, "index")
        if self.root != d and self.dtype != np.dtype("<i8"):  # a nested shapes store holds int64
            raise ValueError(f"{d} holds {self.dtype}, not the int64 shapes of its store: the store "
                             f"is damaged; appends are refused")
        end = 0
        if n:  # an append builds on the last sample: its offsets must agree with each other
            start, end = _entry(join(d, "starts"), n - 1), _entry(join(d, "ends"), n - 1)
            previous = _entry(join(d, "ends"), n - 2) if n > 1 else 0
            size = end - start if self.raw else _entry(join(d, "flattened_shapes"), n - 1)
            if not 0 <= previous == start <= end or end - start != size:
                raise ValueError(f"{d}: the last sample's offsets ({start} to {end}, after {previous}, "
                                 f"{size} elements) disagree: the store is damaged; appends are refused "
                                 f"(they could overwrite samples): restore it from a copy or re-create it")
        itemsize = 1 if self.raw else self.dtype.itemsize
        if not self.raw and _read_meta(d)[1][:1] < (end,):
            raise ValueError(f"{d}: the samples end at element {end} but shape.ninja commits "
                             f"fewer: the store is damaged; appends are refused")
        _check_size(join(d, "data.ninja"), end * itemsize, "data")
        return end

    def _part(self, name):
        column = self.columns.get(name)
        if column is None:
            if name == "data":
                itemsize = 1 if self.raw else self.dtype.itemsize
                column = _PartWriter(self.store_dir, self.root, itemsize, raw=self.raw)
            else:
                column = _PartWriter(os.path.join(self.store_dir, name), self.root)
            self.columns[name] = column
        return column

    def append(self, payload, sizes, shapes):
        """Append after the cached count (call sync first). payload: byte chunks; sizes: element
        counts (None: from the shapes); shapes: the samples' shape tuples, or an int64 array of
        lengths for 1-D samples (None for a strings store). Returns the new count."""
        self.open_all()
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
        data = self._part("data")
        payload = _pack(payload, int(offsets[-1] - start) * data.itemsize)
        data.write(start, payload, int(offsets[-1] - start), self.durable)
        data.commit(self.durable)
        if not self.raw:
            if self.nested is not None:
                self.nested.append([flat_shapes], dims, dims)
            else:
                self._write_index("shapes", n, lengths)
            self._write_index("flattened_shapes", n, sizes)
        self._write_index("ends", n, offsets[1:])
        self._write_index("starts", n, offsets[:-1])  # the commit point
        self.n, self.end = n + len(sizes), int(offsets[-1])
        return self.n

    def _write_index(self, name, n, values):
        column = self._part(name)
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


def _offsets_problem(starts, ends, lo, hi, size):
    """The first of samples lo..hi-1 (or a neighbour) whose offsets do not follow the previous
    sample's or do not fit inside size (starts, ends: int64 views), else None."""
    a, b = max(lo - 1, 0), min(hi + 1, len(starts))
    first, last = np.asarray(starts[a:b]), np.asarray(ends[a:b])
    # A sound page first, in two numpy calls and a memcmp (a read pays for its page's check the
    # first time, which a cold read of a 2 KB sample notices: a flat store's page check costs
    # 4.2 us instead of 8.9 with the test below in _page_problem): each sample starts where the
    # previous one ends and none ends before it starts, so all lie between first[0] >= 0 and
    # last[-1] <= size, and the first sample at 0. (Comparisons only: a difference of damaged
    # offsets can wrap around.)
    if first[1:].tobytes() == last[:-1].tobytes() and (last >= first).all() and first[0] >= 0 \
            and last[-1] <= size and (a or first[0] == 0):
        return None
    bad = (last < first) | (last > size)
    bad[1:] |= first[1:] != last[:-1]
    bad[0] |= first[0] < 0 or (a == 0 and first[0] != 0)
    return a + int(bad.argmax()) if bad.any() else None


def _fill_ragged(store_dir, arrays, durable=False):
    """Fill a just-created empty ragged store with arrays."""
    writer = _SequenceWriter(store_dir, durable)
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
    shapes = [() if _scalar(size, length) else (int(length),) for length, size in zip(lengths, sizes)]
    _create_sequence(new, np.int64, nested=False, durable=durable)
    _fill_ragged(new, [np.asarray(s, np.int64) for s in shapes], durable)
    os.rename(old, trash)
    os.rename(new, old)
    _replace_file(join(store_dir, "shapes_are_flat.ninja"), _I32.pack(0), durable)
    shutil.rmtree(trash, ignore_errors=True)


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
    if os.path.exists(flag_path) and _read_bytes(flag_path, "flatness flag", 64) != _I32.pack(0 if nested else 1):
        _replace_file(flag_path, _I32.pack(0 if nested else 1))


class _Sequence:
    """What RaggedMmap and StringsMmap share: opening, snapshots, indexing forms, pickling by
    path (reopened lazily in the receiving process), close() and ``with``."""

    _kind = None
    _noun, _unit = "sample", "element"  # (for messages)
    # Note for maintainers: no __getattr__ and no self.__dict__ here. Either one stops CPython
    # from specializing attribute access, which costs ~70 ns on every __getitem__.

    def __getstate__(self):
        state = {key: getattr(self, key) for key in self._config_keys}  # (out_dir is absolute)
        state["_n"] = self._n  # the receiver sees the sender's snapshot
        return state

    def __setstate__(self, state):
        """Unpickled (in a worker, say): nothing is mapped until the first read."""
        self._init_state()
        for key, value in state.items():
            setattr(self, key, value)

    def _init_state(self):
        self._writer, self._closed, self._maps, self._n = None, False, [], 0
        self._io = _ReadAhead(self)  # how the data is read while not in the page cache
        # one thread at a time maps, remaps or writes through this object (made anew in a
        # forked child, where a copy could be held by a thread that does not exist there)
        self._mutex, self._pid = threading.RLock(), os.getpid()
        self._release(keep_writer=True)

    def _unmap(self):
        """Inert state: the hot path misses (IndexError) and _ensure_mapped maps the files."""
        self._io.slices = None  # (a cold read in flight misses too: see _ColdSlices)
        self._mapped = 0
        self._loaded = False
        self._starts = self._ends = _int64_view(None, 0)
        self._arrays = None
        self._checked, self._unchecked = [], 0  # which pages of offsets are checked (see _paged)

    def _release(self, keep_writer=False):
        if self._writer is not None and not keep_writer:
            self._writer.__del__()
            self._writer = None
        maps, self._maps = self._maps, []
        self._data_id = None  # (device, inode) of the data file mapped: see __setitem__
        self._unmap()
        self._io.close()
        self._io.data = self._io.mm = self._source = None
        self._drop_arrays()  # (before closing the maps they view)
        for mm in maps:
            try:
                mm.close()
            except BufferError:  # a sample the caller still holds views this map; GC closes it
                pass

    def _drop_arrays(self):
        """Drop the subclass's arrays over the maps."""

    def close(self):
        """Release the maps and descriptors. Samples already returned stay valid until dropped."""
        with self._lock():  # (a prefetch or read in another thread must not map it again)
            self._closed = True
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        return self._n

    def __iter__(self):
        n = self._n
        self._map_all()
        with self._io.scan():  # (cold data: the kernel's read-ahead, see _ReadAhead.scan)
            for start in range(0, n, 256):  # batch reads: cheaper per sample than self[i]
                yield from self._read_many(slice(start, min(start + 256, n)))

    def prefetch(self, indices):
        """Start reading samples ``indices`` (an int, slice, list, array or mask) from disk and
        return at once, so that a loader can announce batch k+1 while it works on batch k.
        Pages found in the page cache are skipped (where it can be probed); it never changes
        what is read. One thread per store asks the kernel, and at most 8 prefetches wait for
        it (a loader far ahead of the disk drops its oldest); where ``posix_fadvise`` is
        missing (macOS), the call asks itself. Batch reads ask for their own samples while the
        data is cold; see ``cold``."""
        with self._lock():
            self._map_all()  # (first: a store re-created meanwhile may hold fewer samples)
            idx = _as_indices([indices] if _is_int(indices) else indices, self._n, self.out_dir)
            if len(idx):
                size = self._io.itemsize
                self._io.ask(self._gather("_starts", idx) * size, self._gather("_ends", idx) * size, prefetch=True)

    @property
    def cold(self):
        """Whether reads treat the data as not in the page cache: each read then first asks the
        kernel for the sample's pages (MADV_WILLNEED), so that it costs what os.pread of the
        same bytes costs instead of a page fault's read-around. Found by probing now and then
        (see _ReadAhead); set it True or False to decide yourself, None to probe again."""
        self._map_all()
        return self._io.cold

    @cold.setter
    def cold(self, value):
        with self._lock():  # (a remap in another thread must not be half seen)
            self._map_all()
            self._io.forced = value
            self._io.set(bool(value) if value is not None else self._io.cold)

    def _ask(self, idx, reach=0):
        """Before reading samples idx (checked): their pages, while the data is cold (and
        reach elements from each start, for reads that run past a sample's end)."""
        if self._io.due():
            idx = np.asarray(idx, np.int64) if type(idx) is list else idx  # (numpy makes floats of [-1, np.uint64(2)])
            starts = self._gather("_starts", idx)
            self._io.batch(starts, np.maximum(self._gather("_ends", idx), starts + reach))

    def _read_one(self, i):
        """Sample i (0 <= i < len): maps what this object appended since it last mapped, and
        checks the page of offsets it is in."""
        with self._lock():
            self._map_sample(i)
            self._check_page(i >> 9)
            return self[i] if self._checked[i >> 9] else self._sample(i)

    def _map_sample(self, i):
        """Map sample i (0 <= i < len when this object last looked), or say it is gone."""
        if i >= self._mapped:
            self._ensure_mapped(i + 1)
            if i >= self._mapped:
                raise IndexError(f"{self.out_dir}: sample {i} is gone: the store now holds "
                                 f"{self._mapped} samples (re-created or replaced since this "
                                 f"object opened it); open it again")

    def _paged(self, n):
        """Map the page flags of n samples, none checked yet: one flag per page of _PAGE
        samples, then as many False, where a negative index lands (item >> 9 is negative) so
        that the slow path checks the page of the sample it means. (A list: indexing one by
        an int costs 12 ns, a bytearray 18.)"""
        pages = -(-n // _PAGE)  # (True: checked; None: checked, but left to the slow path)
        self._checked, self._unchecked = [False] * (2 * pages), pages

    def _check_page(self, page):
        """Check the offsets of one page of samples the first time a read needs it (the hot
        paths test one flag): each sample starts where the previous one ends and ends inside
        the data, and (ragged) spans its recorded shape. So a damaged offset is an error, never
        the bytes of other samples, and no read allocates from one; the cost is one page of
        each index file, which the read needs anyway, and ~17 ns per read."""
        if self._checked[page] is not False:
            return
        lo = page * _PAGE
        bad, plain = self._page_problem(lo, min(lo + _PAGE, self._mapped))
        if bad is not None:
            if bad == 0 and self._starts[0] != 0:
                raise ValueError(f"{self.out_dir}: {self._noun} 0 starts at {self._unit} {self._starts[0]}, "
                                 f"not at 0: the store is damaged (python -m mmap_ninja verify "
                                 f"{self.out_dir} lists what is wrong)")
            raise self._damaged(bad)
        self._checked[page] = True if plain else None
        self._unchecked -= 1

    def _all_checked(self, plain):
        """Every page checked at once (RaggedMmap's regular layout checks all its samples):
        True, or None when some sample is a scalar, left to the slow path."""
        pages = len(self._checked) // 2
        self._checked[:pages] = [True if plain else None] * pages
        self._unchecked = 0

    def _check_pages(self, keys):
        """_check_page for the pages of samples keys (ints, negatives wrapping)."""
        if self._unchecked:  # (until every page has been read once)
            for page in np.unique(np.asarray(keys, np.int64) % self._mapped >> 9).tolist():
                self._check_page(page)

    def _read_many(self, item):
        """Indexing other than by a Python int (the subclasses' hot path): a list of samples."""
        if _is_int(item):
            return self[int(item)]
        with self._lock():
            return self._read_selection(item)

    def _read_selection(self, item):
        self._map_all()
        if type(item) is list and item and len(item) != self._n and type(item[0]) is not bool:
            try:  # the lookups themselves check each key's type and range (negatives wrap)
                columns = self._entries(item, "_starts", "_ends")
            except (IndexError, TypeError):
                columns = None  # _as_indices below says what is wrong
            if columns is not None:
                self._check_pages(item)
                self._ask(item)
                return self._from_offsets(item, columns)
        return self._read_batch(_as_indices(item, self._n, self.out_dir))

    def _read_batch(self, idx):
        """Samples idx (an int64 array of indices already checked against len(self))."""
        with self._lock():
            self._map_all()
            if not len(idx):
                return []
            self._check_pages(idx)
            self._ask(idx)
            return self._read_checked(idx)

    def _read_checked(self, idx):
        """Samples idx (checked, their pages checked and asked for), under the lock."""
        return self._from_offsets(idx, self._entries(idx, "_starts", "_ends"))

    def _entries(self, keys, *names):
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

    # The published package's attributes, which code in the wild reads (length-bucketed
    # batching reads ends - starts, say): read-only arrays over the maps, made on demand, under
    # the mutex (another thread's append remaps: the maps are placeholders meanwhile).

    @property
    def starts(self):
        """Where each sample starts: element offsets (bytes for strings), an int64 array."""
        with self._lock():
            self._map_all()
            return self._gather("_starts", slice(None))

    @property
    def ends(self):
        """Where each sample ends, as ``starts``."""
        with self._lock():
            self._map_all()
            return self._gather("_ends", slice(None))

    @property
    def range(self):
        return np.arange(len(self))

    def _map_all(self):
        if self._mapped < self._n:
            self._ensure_mapped(self._n)

    def _gather(self, name, idx):
        """column[idx] for an int64 index view, as a numpy array (vectorized batch lookups)."""
        if self._arrays is None:
            self._arrays = {}
        arrays = self._arrays
        view = arrays.get(name)
        if view is None:
            view = arrays[name] = np.asarray(getattr(self, name))
        return view[idx]

    def __setitem__(self, key, value):
        """Replace samples in place, each by one with as many elements (or UTF-8 bytes)."""
        d = self.out_dir
        if not any(c in self.mode for c in "+wc"):
            raise ValueError(f"{d} is open read-only (mode={self.mode!r}): open it with "
                             f"mode='r+' to replace samples in place")
        if self.mode == "c":  # copy-on-write: into this process's private map only
            with self._lock():
                writes = self._replacements(key, value)  # (may map the store anew: then take its bytes)
                data = self._private_bytes()
                for offset, chunk in writes:
                    data[offset:offset + len(chunk)] = np.frombuffer(chunk, np.uint8)
            return
        # under the store's lock, so that no append, re-creation or other replacement runs
        # meanwhile; an object that outlives a re-creation replaces samples of the new store
        with self._writing(create=False) as writer:
            fd = _open_fd(os.path.join(d, "data.ninja"), "data", True, d)
            try:
                stat = os.fstat(fd)
                if (stat.st_dev, stat.st_ino) != self._data_id:
                    self._appended(writer.n)  # mapped from a store since replaced: map this one
                    self._ensure_mapped(writer.n)
                writes = self._replacements(key, value)
                with _naming(d):
                    for offset, chunk in writes:
                        _write_bytes(fd, chunk, offset)
            finally:
                os.close(fd)

    def _replacements(self, key, value):
        """(byte offset, bytes) of each replacement, every one checked before any is written."""
        if _is_int(key):
            keys, values = [self._position(int(key))], [value]
        else:
            keys = _as_indices(key, self._n, self.out_dir).tolist()
            values = list(value)
            if len(values) != len(keys):
                raise ValueError(f"{self.out_dir}: {len(values)} values for {len(keys)} samples")
        return [self._encode_replacement(i, v) for i, v in zip(keys, values)]

    def set_single(self, idx, value):  # (the published names: self[idx] = value)
        self[int(idx)] = value

    def set_multiple(self, item, value):
        self[item] = value

    def _lock(self):
        """This object's mutex (see _init_state): held to write, map, and read by anything but
        the hot path, which reads a consistent set of maps or misses into the slow path."""
        if self._pid != os.getpid():
            self._mutex, self._pid = threading.RLock(), os.getpid()
        return self._mutex

    @contextlib.contextmanager
    def _writing(self, dtype=np.float64, nested=False, create=True):
        """Hold the store's write lock (creating the store, with dtype and nested shapes, if the
        directory has none and create) and yield its writer, synced with what other writers
        committed."""
        d = self.out_dir
        with self._lock(), _naming(d):
            self._check_open()
            writer = self._writer
            if writer is not None and writer.pid != os.getpid():  # inherited through a fork
                writer.__del__()  # (closes this process's copies; the parent's lock stays)
                writer = self._writer = None
            if writer is None:
                _check_directory(d)
                if not create and not os.path.isdir(d):
                    raise FileNotFoundError(f"{d} does not exist: there is no sample to replace")
                os.makedirs(d, exist_ok=True)
                writer = self._writer = _SequenceWriter(d, self.durable, raw=self._kind == "string")
            for _ in range(100):
                writer.lock.__enter__()
                if not writer.stale():
                    break
                writer.lock.__exit__()  # re-created meanwhile: lock and read the new store
                writer.close()
                writer.lock.close()
            else:
                raise RuntimeError(f"{d}: the store changed 100 times while this process locked it "
                                   f"(re-created or removed over and over); try again once its "
                                   f"writers are done")
            try:
                if not _is_store(d, self._kind):
                    if not create:
                        raise FileNotFoundError(f"{d} holds no store (removed, or being created): "
                                                f"there is no sample to replace")
                    _clear_unfinished(d)  # what a creation killed before its end left
                    _dtype_to_text(dtype, d)  # refuse a dtype before writing anything
                    _create_sequence(d, dtype, nested, raw=writer.raw, durable=self.durable)
                writer.sync()
                yield writer
            except BaseException:
                writer.close()  # whatever happened, re-read the disk next time
                raise
            finally:
                writer.lock.__exit__()

    def _position(self, i):
        i, n = operator.index(i), self._n  # (an np.int8 would overflow at i + n)
        if not -n <= i < n:
            raise IndexError(f"{self.out_dir}: index {i} is out of range for {n} samples")
        return i + n if i < 0 else i

    def flush(self):
        """fsync every file and directory of the store: committed samples then survive power loss."""
        _fsync_tree(self.out_dir)

    def _check_open(self):
        if self._closed:
            raise ValueError(f"{self.out_dir}: the store is closed")

    def _ensure_mapped(self, n_needed):
        if n_needed > self._mapped or not self._loaded:
            with self._lock():
                if n_needed > self._mapped or not self._loaded:  # (another thread may have)
                    self._check_open()
                    n = self._n
                    self._release(keep_writer=True)
                    self._reload(n)

    def _reload(self, snapshot):
        _from_one_directory(self.out_dir, lambda: self._load(snapshot), lambda: self._release(keep_writer=True))
        self._loaded = True

    def _map_offsets(self, snapshot):
        """Map starts/ends for the first `snapshot` samples (all committed ones when None);
        returns (count, end of the last sample), or None when the directory holds no store."""
        d, join = self.out_dir, os.path.join
        if not _is_store(d, self._kind):  # no store yet (or one being created)
            if snapshot:  # (a store this object, or the one pickled into it, has read)
                raise FileNotFoundError(f"{d} holds no store now, where this object saw {snapshot} "
                                        f"{self._noun}s: it was removed, or is not mounted on this "
                                        f"machine; open it again once it is there")
            self._n = self._mapped = 0
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
        self._starts = self._map_column(join(d, "starts"), n)
        self._ends = self._map_column(join(d, "ends"), n)
        self._paged(n)
        end = self._ends[n - 1] if n else 0
        if end < 0:
            raise ValueError(f"{d}/ends: sample {n - 1} ends at {end}, before the data: the store "
                             f"is damaged")
        return n, end

    def _map_column(self, store_dir, n, tail=()):
        """Map the first n entries of an int64 index store (starts, ends, shapes)."""
        _check_index(store_dir, n, tail)
        return _int64_view(self._map(os.path.join(store_dir, "data.ninja"), 8 * n, what="index"), n)

    def _map(self, path, nbytes, access=mmap.ACCESS_READ, what="data"):
        """_map, kept to be closed with the store."""
        mm, stat = _map(path, nbytes, access, what, self.out_dir)
        if what != "index":  # the data file: __setitem__ checks that it is still the store's
            self._data_id = stat.st_dev, stat.st_ino
        if mm is not None:
            self._maps.append(mm)
        return mm


def _write_batches(samples, batch_size, extend):
    """extend(batch) for each batch of batch_size samples: how every converter writes an
    iterable into a store, holding one batch in memory at a time."""
    for batch in _batched(samples, batch_size):
        extend(batch)
        batch.clear()  # let the samples go before the next batch is read


def _batched(iterable, batch_size):
    iterator = iter(iterable)
    while True:
        batch = list(itertools.islice(iterator, batch_size))
        if not batch:
            return
        yield batch


def _length(indexable):
    """len(indexable), or None when it has none (an object whose __len__ raises TypeError too)."""
    try:
        return len(indexable)
    except TypeError:
        return None


def _indexable_batches(indexable, batch_size, n_jobs, path):
    """Batches of indexable[i] in order: up to len(indexable), else until the first IndexError
    or KeyError; with n_jobs > 1 a thread pool fetches each batch (memory: one batch)."""
    fetch = indexable.__getitem__ if hasattr(indexable, "__getitem__") else indexable
    total = _length(indexable)
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
            except (IndexError, KeyError) as e:
                if total is not None:  # the source's own bug: not the end of the data
                    raise type(e)(f"{path}: reading item {start + len(batch)} of an indexable "
                                  f"whose len() is {total} raised {type(e).__name__}: "
                                  f"{e}") from e
                if batch:
                    yield batch
                return
            yield batch
            start = stop
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


_KEYS = {"starts_key": "starts", "ends_key": "ends", "shapes_key": "shapes",
         "flattened_shapes_key": "flattened_shapes"}


def _check_keys(keys, where, allowed=_KEYS):
    """The published package's *_key arguments name a store's subdirectories. Only the
    standard names exist in the format, so they are accepted and any other is refused; any
    other keyword is a typo, refused naming the public function."""
    for key, value in keys.items():
        if key not in allowed:
            raise TypeError(f"{where}() got an unexpected keyword argument {key!r}")
        if value != allowed[key]:
            raise ValueError(f"{where}: {key}={value!r} is not supported: stores use the "
                             f"format's standard names only ({key}={allowed[key]!r})")


###################################################################################################
# ragged: RaggedMmap, a sequence of arrays of different shapes
###################################################################################################
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

    def __init__(self, out_dir, wrapper_fn=None, mode="r", starts_key="starts", ends_key="ends",
                 shapes_key="shapes", flattened_shapes_key="flattened_shapes",
                 copy_before_wrapper_fn=True, *, durable=False):
        _check_keys(dict(starts_key=starts_key, ends_key=ends_key, shapes_key=shapes_key,
                         flattened_shapes_key=flattened_shapes_key), "RaggedMmap")
        mode = _MODE_NAMES.get(mode, mode) if isinstance(mode, str) else mode
        if mode not in ("r", "r+", "c"):
            raise ValueError(f"{out_dir}: mode must be 'r', 'r+' or 'c', got {mode!r}")
        self.out_dir = _absolute(out_dir)
        self.wrapper_fn = wrapper_fn
        self.mode = mode
        self.copy_before_wrapper_fn = copy_before_wrapper_fn
        self.durable = durable
        self._init_state()
        self._reload(None)

    def _init_state(self):
        self._layout = _Layout()  # what batch reads know (see "ragged: batch reads")
        self._dtype, self._nested = None, False
        self._tail = False  # the shape every nested sample read by the hot path has (_narrow_tail)
        _Sequence._init_state(self)

    def _unmap(self):
        if getattr(self, "_mapped", 0):  # a remap: off for good (see _narrow_tail)
            self._tail = None
        _Sequence._unmap(self)
        self._layout.unmap()

    def _private_bytes(self):
        return self._data.view(np.uint8)

    def close(self):
        _Sequence.close(self)
        self._layout.forget()

    def _drop_arrays(self):
        self._data = self._shape_data = self._shape_starts = self._shape_ends = self._shape_ndims = None
        self._flat_shapes = None

    def _load(self, snapshot):
        """Map the first `snapshot` samples (all committed ones when None); O(1) in the count."""
        d, join = self.out_dir, os.path.join
        opened = self._map_offsets(snapshot)
        if opened is None:
            self._dtype, self._data, self._nested = None, np.zeros(0), False
            self._flat_shapes = _int64_view(None, 0)
            self._source = self._data
            return
        n, end = opened
        dtype, data_shape, _ = _read_meta(d)
        if data_shape[:1] < (end,):
            raise ValueError(f"{d}: sample {n - 1} ends at element {end} but the data holds "
                             f"{data_shape[0] if data_shape else 0}: the store is damaged")
        access = {"r": mmap.ACCESS_READ, "r+": mmap.ACCESS_WRITE, "c": mmap.ACCESS_COPY}[self.mode]
        mm = self._map(join(d, "data.ninja"), end * dtype.itemsize, access)
        # through a memoryview, so mmap.close() refuses (BufferError) while any sample is alive;
        # an ndarray made directly on the map would not stop it, and reading would crash
        self._data = np.frombuffer(memoryview(mm), dtype, end) if mm is not None else np.zeros(0, dtype)
        if access == mmap.ACCESS_READ:
            self._data.flags.writeable = False
        self._io.remap(self._data, mm, join(d, "data.ninja"), dtype.itemsize, self._starts)
        self._dtype = dtype
        shapes = _shapes_dir(d)
        self._nested = os.path.isdir(join(shapes, "starts"))
        if self._nested:
            self._layout.follow(join(shapes, "starts", "data.ninja"))
            self._shape_starts = self._map_column(join(shapes, "starts"), n)
            self._shape_ends = self._map_column(join(shapes, "ends"), n)
            self._shape_ndims = self._map_column(join(shapes, "shapes"), n, (1,))  # (the shapes' lengths)
            total = self._shape_ends[n - 1] if n else 0
            self._shape_data = self._map_column(shapes, total)
        else:
            self._flat_shapes = self._map_column(shapes, n, (1,))
        self._n = self._mapped = n

    def __getitem__(self, item):
        # The hot path, kept to one Python call: a page's flag (offsets are checked a page at a
        # time, see _check_page), then the int64 views, which hold exactly the mapped samples
        # and take Python and numpy ints. Negative indices find their flag False (the guard
        # zone) and go to the slow path, which wraps them. No locals: each costs ~5 ns here.
        try:
            if not self._checked[item >> 9]:
                raise IndexError
            sample = self._source[self._starts[item]:self._ends[item]]  # (the data, or a _ReadAhead while cold)
            if self._nested:  # (pages holding a scalar sample take the slow path: see _sample)
                sample = sample.reshape(self._tail or self._shape_data[self._shape_starts[item]:self._shape_ends[item]].tolist())
        except IndexError:  # out of range, appended since this object mapped its files, or unchecked
            return self._read_one(self._position(item))
        except (TypeError, NotImplementedError):  # a slice, a list, a mask, a tuple: not an int;
            return self._read_many(item)  # or arrays another thread's remap dropped meanwhile (None)
        if self.wrapper_fn is None:
            return sample
        return self.wrapper_fn(_copy(sample) if self.copy_before_wrapper_fn else sample)

    def _sample(self, i):
        """Sample i (mapped, its page checked) when its page holds a scalar sample (recorded as
        length 0 with one element, or as shape ()), which reads as a Python scalar, as the
        published package returns it; the hot path leaves such pages to this slow path."""
        start, end = self._starts[i], self._ends[i]
        sample = self._data[start:end]
        if self._nested:
            shape = self._shape_data[self._shape_starts[i]:self._shape_ends[i]].tolist()
            sample = sample.reshape(shape) if shape else sample.reshape(()).item()
        elif _scalar(end - start, self._flat_shapes[i]):
            sample = sample.item()
        if self.wrapper_fn is None:
            return sample
        return self.wrapper_fn(_copy(sample) if self.copy_before_wrapper_fn else sample)

    def _page_problem(self, lo, hi):
        """(The first of samples lo..hi-1 whose offsets do not follow their neighbours', fit the
        data and span their recorded shape, else None; whether none is a scalar)."""
        bad = _offsets_problem(self._starts, self._ends, lo, hi, len(self._data))
        if bad is not None:
            return bad, False
        sizes = np.asarray(self._ends[lo:hi]) - np.asarray(self._starts[lo:hi])
        if not self._nested:  # (a scalar is recorded as length 0 with one element)
            flat = np.asarray(self._flat_shapes[lo:hi])
            if sizes.tobytes() == flat.tobytes():  # (so no scalar: 2.4 us less per page)
                return None, True
            scalars = _scalar(sizes, flat)
            ok = (sizes == flat) | scalars
        else:
            bad = _offsets_problem(self._shape_starts, self._shape_ends, lo, hi, len(self._shape_data))
            if bad is not None:
                return bad, False
            a, b = np.asarray(self._shape_starts[lo:hi]), np.asarray(self._shape_ends[lo:hi])
            ndims = b - a
            axes = np.append(np.asarray(self._shape_data[a[0]:b[-1]]), 1)  # (a 1 for trailing 0-d shapes)
            products = np.multiply.reduceat(axes, a - a[0])
            products[ndims == 0] = 1
            # in floats too: an int64 product that wraps around (2**32 * 2**32 == 0) is damage, and
            # so is a shape numpy cannot make (_makeable: over 64 axes, or nonzero ones of 2**63
            # bytes or more, as in an empty (0, 2**62) sample of int32)
            nonzero = np.maximum(axes, 1).astype(np.float64)
            exact = (np.multiply.reduceat(nonzero, a - a[0]) < 2.0 ** 63 / self._data.itemsize) | (ndims == 0)
            ok = (ndims == np.asarray(self._shape_ndims[lo:hi])) & (products == sizes) & exact & (axes >= 0).all() \
                & (ndims <= 64)
            scalars = ndims == 0
            if ok.all() and not scalars.any():  # (the page's flag will say checked: see _narrow_tail)
                rows = axes[:-1].reshape(-1, ndims[0]) if (ndims == ndims[0]).all() else None
                same = rows is not None and (rows[:, 1:] == rows[0, 1:]).all()
                self._narrow_tail(tuple(rows[0, 1:].tolist()) if same else None)
        return (None if ok.all() else lo + int(ok.argmin())), not scalars.any()

    def _narrow_tail(self, trailing):
        """Trick: the hot path reshapes a nested sample to self._tail, (-1, *trailing axes), when
        every sample of every page it reads has those trailing axes (images (h, 256, 3), say). A
        tuple made once, where reading the sample's own shape and listing it cost ~130 ns of a
        ~450 ns read (images random get 1.45-1.55x the floor without it). Called before a page's
        flag says checked, with that page's common trailing axes (None: they differ). It only
        narrows: set by the first page, None for this object's life once a page differs (or an
        axis is 0, beside which -1 cannot be inferred), and after any remap (_unmap): a thread
        may read a flag of the old pages, then the new maps, whose new samples no page check
        has seen. Objects that only read (a training loop's) map once and keep it."""
        if trailing is None or 0 in trailing or self._tail not in (False, (-1,) + trailing):
            self._tail = None
        else:
            self._tail = (-1,) + trailing

    def _damaged(self, item):
        i = self._position(int(item))
        axes = self._shape_ends[i] - self._shape_starts[i] if self._nested else 1
        shape = self._recorded_shape(i) if 0 <= axes <= 64 else f"of {axes} axes"  # (damaged too)
        return ValueError(f"{self.out_dir}: sample {i} spans elements {self._starts[i]} to "
                          f"{self._ends[i]}, which does not fit its recorded shape {shape}: the "
                          f"store is damaged (python -m mmap_ninja verify {self.out_dir} lists "
                          f"what is wrong)")

    def _read_selection(self, item):
        if self.wrapper_fn is None:
            self._map_all()
            if self._nested or type(item) is not list:  # (lists of ints: _Sequence's lookups, then _from_offsets)
                return self._read_batch(_as_indices(item, self._n, self.out_dir))
        return _Sequence._read_selection(self, item)

    def _read_checked(self, idx):
        return _Sequence._read_checked(self, idx) if self.wrapper_fn is not None else self._views(idx)

    def _check_pages(self, keys):
        if self._nested and self._unchecked:
            self._layout.regular_rows(self)  # (a regular layout checks every page at once)
        _Sequence._check_pages(self, keys)

    def _views(self, idx):
        """Samples idx (an int64 array; mapped, pages checked), wrapper_fn not applied: through
        strided windows where they serve (see "ragged: batch reads"), else sliced."""
        if self._nested:
            views = self._layout.window_views(self, idx)
            return views if views is not None else self._slices(idx, *self._entries(idx, "_starts", "_ends"))
        starts, ends = self._gather("_starts", idx), self._gather("_ends", idx)
        data = self._data
        out = [data[s:e] for s, e in zip(starts.tolist(), ends.tolist())]
        for k in np.flatnonzero(ends - starts == 1).tolist():  # maybe scalars
            if _scalar(1, self._flat_shapes[idx[k]]):
                out[k] = out[k].item()
        return out

    def _from_offsets(self, keys, columns):
        """Samples keys (mapped, pages checked), given their (starts, ends): as read, wrapper_fn applied."""
        if self.wrapper_fn is not None:
            return [self[k] for k in keys]
        return self._slices(keys, *columns)

    def _slices(self, keys, starts, ends):
        """Samples keys (mapped, pages checked), sliced from their starts and ends (lists) and,
        when nested, reshaped; scalar samples read as Python scalars (see _sample)."""
        data = self._data
        if self._nested:
            shapes = self._layout.shapes(self, keys)
            out = [data[s:e].reshape(shape) for s, e, shape in zip(starts, ends, shapes)]
            return out if all(shapes) else [v if v.ndim else v.item() for v in out]
        out = [data[s:e] for s, e in zip(starts, ends)]
        for k in [k for k, (s, e) in enumerate(zip(starts, ends)) if e - s == 1]:  # maybe scalars
            if _scalar(1, self._flat_shapes[keys[k]]):
                out[k] = out[k].item()
        return out

    @property
    def memmap(self):
        """Every sample's elements, concatenated: a 1-D array over the data file's map."""
        with self._lock():
            self._map_all()
            return self._data

    @property
    def flattened_shapes(self):
        """Each sample's element count, an int64 array."""
        with self._lock():  # (both of one mapping)
            return self.ends - self.starts

    @property
    def shapes(self):
        """Each sample's shape: an (n, 1) int64 array when every sample is 1-D or 0-d (a 0-d
        sample recorded as length 0), else a RaggedMmap whose sample i is sample i's shape."""
        with self._lock():
            self._map_all()
            if self._nested:
                return RaggedMmap(_shapes_dir(self.out_dir))
            return self._gather("_flat_shapes", slice(None)).reshape(-1, 1)

    @property
    def shapes_are_flat(self):
        with self._lock():
            self._map_all()
            return not self._nested

    @property
    def n(self):
        return len(self)

    def shape_of(self, i):
        """The shape of sample i, without touching its data."""
        with self._lock():  # (another thread's append remaps: the maps are placeholders meanwhile)
            i = self._position(i)
            if i >= self._mapped or self._checked[i >> 9] is False:
                self._map_sample(i)
                self._check_page(i >> 9)  # (offsets a read would refuse give no shape either)
            return self._recorded_shape(i)

    def _recorded_shape(self, i):
        """Sample i's shape as its shapes record it (mapped; unchecked: see _damaged)."""
        if self._nested:
            return tuple(self._shape_data[self._shape_starts[i]:self._shape_ends[i]])
        recorded = int(self._flat_shapes[i])
        return () if _scalar(self._ends[i] - self._starts[i], recorded) else (recorded,)

    @property
    def dtype(self):
        """The store's dtype (None for a store that holds nothing yet)."""
        with self._lock():
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
        if _is_int(indices):
            raise TypeError(f"{self.out_dir}: get_padded takes a list of indices, got the int {indices}; "
                            f"ask for get_padded([{indices}])")
        with self._lock():
            self._map_all()  # (first: a store re-created meanwhile may hold fewer samples)
            return _padded(self, _as_indices(indices, self._n, self.out_dir), pad_value)

    # ---- writing --------------------------------------------------------------------------

    def append(self, array):
        """Append one sample (crash-safe; O(size of the sample), whatever the store's length)."""
        self.extend([array])

    def extend(self, arrays):
        """Append samples. Every sample is checked before anything is written, so refused input
        leaves the store as it was."""
        d = self.out_dir
        arrays = arrays if type(arrays) is list else list(arrays)
        if set(map(type, arrays)) != {np.ndarray}:  # checked per sample only when needed
            arrays = [_as_sample(s, d) for s in arrays]
        if not arrays:
            return
        dtypes = set(map(_DTYPE, arrays))
        if any(dt.hasobject for dt in dtypes):
            arrays = [_as_sample(s, d) for s in arrays]  # raises, naming the offending sample
        first_dtype = arrays[0].dtype  # (an empty store takes its first sample's dtype)
        shapes = list(map(_SHAPE, arrays))
        nested = any(len(shape) > 1 for shape in shapes)
        # (a store made here starts with the placeholder dtype, which _prepare replaces once every
        # sample is checked: a refused first append leaves no dtype that refuses the next one;
        # a dtype that no store can hold is refused before anything is written)
        if first_dtype != self._dtype:  # (the store's own dtype passed this check)
            _dtype_to_text(first_dtype, d)
        with self._writing(np.float64, nested) as writer:
            arrays = self._prepare(writer, arrays, dtypes, first_dtype, nested)
            sizes = None if writer.nested is not None else list(map(_SIZE, arrays))  # (nested: from shapes)
            self._appended(writer.append(arrays, sizes, shapes))

    def _prepare(self, writer, arrays, dtypes, first_dtype, nested):
        """Adapt the store's metadata to arrays and return them cast to its dtype; everything
        is checked before anything is written."""
        d, join = self.out_dir, os.path.join
        dtype = writer.dtype
        if writer.n == 0 and _read_text(join(d, "dtype.ninja"), "dtype") == dtype.name:
            dtype = first_dtype  # (not chosen with dtype=, see _chosen_dtype_text: the first samples choose)
        if dtypes != {dtype}:
            arrays = [_as_sample(a, d, dtype) for a in arrays]
        if dtype != writer.dtype:
            _replace_file(join(d, "dtype.ninja"), _dtype_to_text(dtype, d).encode(), self.durable)
            writer.close()
            writer.sync()
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
    def from_lists(cls, out_dir, lists, dtype=None, mode="r+", wrapper_fn=None, starts_key="starts",
                   ends_key="ends", shapes_key="shapes", flattened_shapes_key="flattened_shapes", *,
                   copy_before_wrapper_fn=True, durable=False):
        """Write a list of arrays (any shapes) as a ragged store and open it. The first sample
        chooses the dtype (unless ``dtype`` is given); the others must cast to it exactly."""
        _check_keys(dict(starts_key=starts_key, ends_key=ends_key, shapes_key=shapes_key,
                         flattened_shapes_key=flattened_shapes_key), "RaggedMmap.from_lists")
        dtype = _given_dtype(dtype, out_dir)
        arrays = [_as_sample(x, out_dir, dtype) for x in lists]  # (dtype: cast as appends are)
        return cls._from_samples(out_dir, arrays, len(arrays) or 1, dtype, mode, wrapper_fn,
                                 copy_before_wrapper_fn, durable)

    @classmethod
    def from_generator(cls, out_dir, sample_generator, batch_size, verbose=False, *, dtype=None,
                       mode="r+", wrapper_fn=None, copy_before_wrapper_fn=True, durable=False, **keys):
        """Write a generator's samples as a ragged store, written every ``batch_size`` samples
        (memory holds at most one batch); it replaces what out_dir held once complete."""
        _check_keys(keys, "RaggedMmap.from_generator")
        batch_size = _check_batch_size(batch_size)
        samples = _progress(sample_generator, desc="ragged", verbose=verbose)
        return cls._from_samples(out_dir, samples, batch_size, dtype, mode, wrapper_fn,
                                 copy_before_wrapper_fn, durable)

    @classmethod
    def from_indexable(cls, out_dir, indexable, batch_size, n_jobs=None, verbose=False, *,
                       dtype=None, mode="r+", wrapper_fn=None, copy_before_wrapper_fn=True,
                       durable=False, **keys):
        """Write ``indexable[0], indexable[1], ...`` (or ``indexable(i)``) as a ragged store:
        up to ``len(indexable)``, or, without a length, until IndexError or KeyError.
        ``n_jobs`` threads fetch each batch in order; memory holds one batch."""
        _check_keys(keys, "RaggedMmap.from_indexable")
        batch_size = _check_batch_size(batch_size)
        total = _length(indexable)
        samples = (s for batch in _indexable_batches(indexable, batch_size, n_jobs, out_dir) for s in batch)
        samples = _progress(samples, total=total, desc="ragged", verbose=verbose)
        return cls._from_samples(out_dir, samples, batch_size, dtype, mode, wrapper_fn,
                                 copy_before_wrapper_fn, durable)

    @classmethod
    def _from_samples(cls, out_dir, samples, batch_size, dtype, mode, wrapper_fn, copy_before_wrapper_fn,
                      durable):
        dtype = _given_dtype(dtype, out_dir)
        if dtype is not None:
            samples = (_as_sample(s, out_dir, dtype) for s in samples)
        with _creating(out_dir, durable) as build:
            with cls(build, durable=durable) as builder:
                _write_batches(samples, batch_size, builder.extend)
            if not os.path.lexists(os.path.join(build, "type.ninja")):  # (no samples)
                _create_sequence(build, np.dtype(dtype or np.float64), nested=False, durable=durable)
                if dtype is not None:  # asked for: spelled apart from a placeholder (see _prepare)
                    _replace_file(os.path.join(build, "dtype.ninja"), _chosen_dtype_text(dtype).encode(), durable)
        return cls(out_dir, wrapper_fn=wrapper_fn, mode=mode,
                   copy_before_wrapper_fn=copy_before_wrapper_fn, durable=durable)

    def __repr__(self):
        if not os.path.lexists(os.path.join(self.out_dir, "type.ninja")):
            return f"RaggedMmap({self.out_dir!r}, empty: no store there yet, append creates one)"
        return f"RaggedMmap({self.out_dir!r}, {len(self)} samples, dtype={self._dtype})"


###################################################################################################
# ragged: batch reads
###################################################################################################

# How ragged[indices] runs (every step takes the object's lock; wrapper_fn None):
#   RaggedMmap.__getitem__        not an int: _Sequence._read_many (locks), then
#   RaggedMmap._read_selection    a flat store's list of ints: per-key lookups, _from_offsets;
#                                 anything else: _as_indices, then
#   _Sequence._read_batch         maps, checks the pages of offsets, asks for cold pages, then
#   RaggedMmap._read_checked      _views: nested, _Layout.window_views below (else _slices);
#                                 flat, slices.
# With wrapper_fn, samples are read one by one through __getitem__ (_from_offsets).
# get_padded: _padded below, then _pad_runs, _pad_blocks or _pad_each.
#
# ragged[indices] and get_padded cost less per sample than slicing in-memory arrays. Each trick
# below is one step numpy does in C where a loop would make one view or copy per sample; each
# keeps a plain fallback, and a test pins both (test_batch_reads_and_get_padded_match_the_samples
# over seven layouts; the tests named below):
#
# - Regular shapes (_Layout.regular_rows): every writer puts sample i's shape at entries
#   [i*ndim, (i+1)*ndim) of the shapes' data, so the shapes are one (n, ndim) array and a batch's
#   are one gather. Checked once per sample, with its offsets, and kept across remaps of the
#   same files; an irregular store gathers each shape's start and end instead.
# - Strided windows (_Windows, _Layout.window_views): for each trailing shape t of the samples,
#   one view whose item [o, q] is the t-shaped block at element q*row + o; a sample is then one
#   indexing step instead of a slice and a reshape (0.82-0.84x their time: what puts
#   ragged[indices] of images under the in-memory floor). Fallback: slice and reshape, for
#   samples too near the end of the data, zero-size rows, axes too long to pack into a key
#   (test_batch_reads_fall_back_when_windows_cannot_serve).
# - Runs gathered as void items (_Layout.run_view, _pad_runs): a view whose item e is the `width`
#   elements from element e, as one void item, so gathering a batch's runs is one memcpy each;
#   the tails are then masked with the pad. get_padded of sequences costs ~6x less than copying
#   sample by sample. Fallback: samples in the last `width` elements are copied one by one
#   (test_get_padded_samples_in_the_last_run).
# - Byte masks (_pad_plan, _pad_blocks): images (h, w, c) gather every row at full width in one
#   go, then one AND with a mask table clears what lies outside each sample (an OR sets a nonzero
#   pad): 3.4x less than copying each sample. Fallback: one by one when the masks would pass
#   1 MB, or for rows that would run past the data (test_get_padded_images_through_byte_masks).
# - Both gathers read each sample's padded span, not only its bytes: free when the data is
#   cached, ~17% more disk reads for images when it is not. So a cold store pads one sample at a
#   time, in disk order, asking for the samples' own bytes (_pad_each; cold images get_padded of
#   64: 133 -> 87 us a sample; test_cold_get_padded_reads_the_samples_own_bytes_only).


class _Layout:
    """What batch reads know about a RaggedMmap object's shapes and data: worked out on first
    use, dropped by a remap, except the verdict on the shapes (regular or not, and each axis's
    least and greatest length), which covers the samples checked so far and is kept across
    remaps of the same shape files (the store only grows: each sample is checked once)."""

    def __init__(self):
        self.fd = self.ident = None
        self.forget()
        self.unmap()

    def forget(self):
        if self.fd is not None:
            os.close(self.fd)
        self.fd = self.ident = None
        self.ndim, self.checked, self.lo, self.hi = None, 0, None, None

    def __del__(self):
        self.forget()

    def follow(self, path):
        """Keep the verdict while the store's shape starts file (path) is the same file. It is
        held open, so that its inode number cannot be reused: ext4 gives a re-created store's
        file the number of the one it replaced, and a verdict on another store is wrong data."""
        fd = _open_fd(path, "the shapes' starts")
        stat = os.fstat(fd)
        if (stat.st_dev, stat.st_ino) == self.ident:
            return os.close(fd)
        self.forget()
        self.fd, self.ident = fd, (stat.st_dev, stat.st_ino)

    def unmap(self):
        self.rows = False  # the shapes as an (n, ndim) array when regular, None when not; False: not yet looked
        self.windows = None  # a _Windows over the data
        self.runs = {}  # width: a view of every run of width elements (see run_view)

    def regular_rows(self, store):
        """Row i is the shape of mapped sample i, as one (n, ndim) int64 array over the map,
        when every sample has ndim dimensions and its shape at entries [i*ndim, (i+1)*ndim);
        else None. The same pass checks each sample's offsets (following the previous one's,
        spanning its shape): a regular store's pages of offsets are then all checked (see
        _Sequence._check_page), and damage makes the store irregular, where the page checks
        name the damaged sample."""
        if self.rows is not False:
            return self.rows
        n = store._mapped
        while self.ndim != -1 and self.checked < n:  # in chunks: memory stays small for huge stores
            lo, hi = self.checked, min(self.checked + (1 << 20), n)
            a, b = store._gather("_shape_starts", slice(lo, hi)), store._gather("_shape_ends", slice(lo, hi))
            if self.ndim is None:
                self.ndim = int(b[0] - a[0])
            ndim = self.ndim
            expected = np.arange(lo, hi, dtype=np.int64) * ndim
            if not (np.array_equal(a, expected) and np.array_equal(b, expected + ndim)):
                self.ndim = -1
                break
            shapes = store._gather("_shape_data", slice(lo * ndim, hi * ndim)).reshape(hi - lo, ndim)
            starts, ends = store._gather("_starts", slice(lo, hi)), store._gather("_ends", slice(lo, hi))
            if not (int(starts[0]) == (store._ends[lo - 1] if lo else 0) and (shapes >= 0).all()
                    and np.array_equal(starts[1:], ends[:-1]) and np.array_equal(ends - starts, shapes.prod(axis=1))
                    and ndim <= 64 and (np.maximum(shapes, 1).astype(np.float64).prod(axis=1)
                                        < 2.0 ** 63 / store._data.itemsize).all()):  # (_makeable)
                self.ndim = -1
                break
            self.lo, self.hi = _axis_bounds(shapes, None if self.lo is None else (self.lo, self.hi))
            self.checked = hi
        self.rows = None
        if n and self.ndim != -1:
            self.rows = store._gather("_shape_data", slice(0, n * self.ndim)).reshape(n, self.ndim)
            if self.ndim > 0:  # (every page's flag will say checked)
                store._narrow_tail(tuple(self.lo[1:].tolist()) if (self.lo[1:] == self.hi[1:]).all() else None)
            store._all_checked(plain=self.ndim > 0)  # (no scalar sample when ndim > 0)
        return self.rows

    def table(self, store, keys):
        """(The shapes of samples keys, an int64 array (len(keys), ndim), or None when their
        numbers of dimensions differ; unless the shapes are regular, where each starts and
        ends in the shapes' data)."""
        rows = self.regular_rows(store)
        if rows is not None:
            return rows.take(keys, 0), None, None  # take: 3x faster than rows[keys]
        kidx = np.asarray(keys, np.int64)
        a, b = store._gather("_shape_starts", kidx), store._gather("_shape_ends", kidx)
        ndim = int(b[0] - a[0]) if len(a) else 0
        if not (b - a == ndim).all():
            return None, a, b
        return store._gather("_shape_data", slice(None))[a[:, None] + np.arange(ndim)], a, b

    def shapes(self, store, keys):
        """The shapes of samples keys (a list or an int64 array) as lists."""
        if not len(keys):
            return []
        if not store._nested:
            starts, ends, flat = store._entries(keys, "_starts", "_ends", "_flat_shapes")
            return [[] if _scalar(e - s, f) else [e - s] for s, e, f in zip(starts, ends, flat)]
        table, a, b = self.table(store, keys)
        if table is not None:
            return table.tolist()
        shape_data = store._gather("_shape_data", slice(None))
        return [shape_data[x:y].tolist() for x, y in zip(a.tolist(), b.tolist())]

    def window_views(self, store, idx):
        """Samples idx of a regular store whose samples have 2+ dimensions, each one indexing
        step through a _Windows view; None for the (rare) batch that one cannot serve."""
        rows = self.regular_rows(store)
        if rows is None or rows.shape[1] < 2:
            return None
        data, windows = store._data, self.windows
        if windows is None:
            windows = self.windows = _Windows(data, list(rows.T), self.lo, self.hi)
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
        starts = store._gather("_starts", idx)
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

    def run_view(self, store, width):
        """A read-only view of the mapped data whose item e is the `width` elements (width > 0,
        at most the data's length) that start at element e, as one void item: gathering such
        runs copies each with one memcpy."""
        view = self.runs.get(width)
        if view is None:
            data = store._data
            view = self.runs[width] = np.lib.stride_tricks.as_strided(
                data[:width].view(("V", width * data.itemsize)), (len(data) - width + 1,), (data.itemsize,),
                writeable=False)
        return view


def _axis_bounds(shapes, previous=None):
    """(least, greatest) length of each axis of shapes (an (n, ndim) array), merged with a
    previous pair."""
    lo, hi = shapes.min(axis=0, initial=np.iinfo(np.int64).max), shapes.max(axis=0, initial=-1)
    return (lo, hi) if previous is None else (np.minimum(lo, previous[0]), np.maximum(hi, previous[1]))


def _padded(store, idx, pad_value):
    """RaggedMmap.get_padded (locked): looks the shapes up, then chooses by which axes vary."""
    store._map_all()
    store._check_pages(idx)  # (no allocation from a damaged offset)
    starts, layout = store._gather("_starts", idx), store._layout
    if store._nested:
        shapes, a, b = layout.table(store, idx)
        ndims = {shapes.shape[1]} if shapes is not None else set((b - a).tolist())
    else:  # lengths, and which samples are scalars, in a few vectorized steps
        lengths = store._gather("_ends", idx) - starts
        scalar = _scalar(lengths, store._gather("_flat_shapes", idx))
        ndims = {0} if scalar.all() and len(idx) else {0, 1} if scalar.any() else {1}
        shapes = lengths.reshape(-1, 1) if ndims == {1} else np.zeros((len(idx), 0), np.int64)
    if len(ndims) > 1:
        raise ValueError(f"{store.out_dir}: get_padded needs samples of one number of "
                         f"dimensions, got {sorted(ndims)}-dimensional ones")
    ndim, k = ndims.pop() if ndims else 1, len(idx)
    shapes = np.asarray(shapes, np.int64).reshape(k, ndim)
    dtype = np.dtype(store._dtype or np.float64)  # the pad is cast as appends are; 0 is any dtype's zero
    try:
        several = np.size(pad_value) != 1
    except ValueError:  # (a ragged list: several too)
        several = True
    if several:
        raise ValueError(f"{store.out_dir}: pad_value must be one value (a scalar), got "
                         f"{_short(pad_value)}; every padded element gets the same value")
    try:
        pad = np.zeros((), dtype) if type(pad_value) is int and pad_value == 0 else \
            _cast(np.asarray(pad_value), dtype, store.out_dir).reshape(())
    except TypeError as e:
        raise TypeError(f"{store.out_dir}: pad_value={pad_value!r} would change in this store's dtype "
                        f"{dtype}; pass a value it holds exactly") from e
    if not k or ndim == 0:  # nothing, or one element per sample
        store._ask(idx)
        return (store._data[starts] if k else np.full((0,) + (0,) * ndim, pad)), shapes
    # which axes vary: known for the whole store when its shapes are regular, else per batch
    if ndim == 1:
        same, hi = [False], [None]
    else:
        lo, hi = (layout.lo, layout.hi) if layout.rows is not None else (shapes.min(axis=0), shapes.max(axis=0))
        same, hi = (lo == hi).tolist(), hi.tolist()
    if all(same[1:]):  # only the first axis varies (1-D samples, sequences of vectors)
        max_shape = (int(shapes[:, 0].max()), *hi[1:])
    elif all(same[2:]):  # the first two axes vary: (h, w, ...) images
        max_shape = (int(shapes[:, 0].max()), int(shapes[:, 1].max()), *hi[2:])
    else:  # three or more
        max_shape = tuple(shapes.max(axis=0).tolist())
    largest, size = math.prod(max_shape), store._data.itemsize
    padded = k * largest * size  # (bytes; their data's size is summed only when this is large)
    if padded > _PAD_LIMIT and padded > 4 * size * int(store._gather("_ends", idx).sum() - starts.sum()):
        raise ValueError(f"{store.out_dir}: padding these {k} samples to shape {max_shape} would "
                         f"allocate {padded} bytes, over 1 GiB and 4 times their data: pad fewer "
                         f"samples at a time, or group samples of similar shapes")
    if store._io.cold:  # only the samples' own bytes, in disk order (see "ragged: batch reads")
        store._ask(idx)
        return _pad_each(store, np.full((k,) + max_shape, pad), idx, shapes), shapes
    store._ask(idx, largest)  # (gathers read a padded span)
    if all(same[1:]):
        row = math.prod(max_shape[1:])
        batch = _pad_runs(store, starts, shapes[:, 0] * row, max_shape[0] * row, pad)
        return batch.reshape((k,) + max_shape), shapes
    if all(same[2:]):
        return _pad_blocks(store, idx, starts, shapes, max_shape, pad), shapes
    return _pad_each(store, np.full((k,) + max_shape, pad), idx, shapes), shapes


def _pad_each(store, batch, idx, shapes, which=None):
    """Copy samples idx (or idx[which]) into batch[j, :a0, :a1, ...], one by one, in ascending
    position (sequential on disk); the destinations are built by zip and map, in C."""
    which = np.argsort(idx, kind="stable") if which is None else which
    destinations = zip(which.tolist(), *[map(slice, axis) for axis in shapes[which].T.tolist()])
    for destination, sample in zip(destinations, store._views(idx[which])):
        batch[destination] = sample
    return batch


def _pad_runs(store, starts, lengths, width, pad):
    """A new (len(starts), width) array whose row j is data[starts[j]:][:lengths[j]] padded
    with pad: one gather through run_view, then one masked fill. Rows that start in the last
    `width` elements are copied one by one."""
    data = store._data
    last = len(data) - width  # full runs start at 0..last
    if last < 0 or not width or not data.itemsize:
        out, late = np.full((len(starts), width), pad), range(len(starts))
    else:
        out = store._layout.run_view(store, width)[np.minimum(starts, last)[:, None]].view(data.dtype)  # a copy
        small = np.int16 if width < 1 << 15 else np.int64  # masks build 3x faster in int16
        np.copyto(out, pad, where=np.arange(width, dtype=small) >= lengths.astype(small)[:, None])
        late = np.flatnonzero(starts > last).tolist()
    for j in late:
        s, length = int(starts[j]), int(lengths[j])
        out[j, :length] = data[s:s + length]
    return out


def _pad_blocks(store, idx, starts, shapes, max_shape, pad):
    """get_padded for samples whose first two axes vary, (h, w, *t) with one t: row r of
    sample j is the w*c elements (c = prod(t)) at starts[j] + r*w*c. One gather through a run
    view of width W*c copies all rows at once, each with whatever follows it in the data, then
    one AND with byte masks from _pad_plan clears what lies outside each sample (and an OR sets
    a nonzero pad there). Samples too near the end of the data for a full row, or all of them
    when the masks would be large, are copied one by one."""
    data, k, (rows, cols) = store._data, len(idx), max_shape[:2]
    c = math.prod(max_shape[2:])
    width, size = cols * c, data.itemsize
    last = len(data) - width  # full runs start at elements 0..last
    if last < 0 or not width or not rows or not size or (cols + 1) * 2 * rows * width * size > _PAD_MASKS_MAX:
        return _pad_each(store, np.full((k,) + max_shape, pad), idx, shapes)
    view = store._layout.run_view(store, width)
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
        _pad_each(store, batch, idx, shapes, late)
    return batch


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


# get_padded refuses to allocate more than this when it is also 4 times the samples' data: a
# huge padded shape (a few outliers, or shapes that damage made huge) is an error, not a swap storm
_PAD_LIMIT = 1 << 30

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
    # A string is stored as one whole frame: what follows it is damage, which decompress would
    # otherwise read on into (compression.zstd) or skip (zstandard).
    if zstd is not None:
        def codec(level, dictionary):
            zd = zstd.ZstdDict(dictionary) if dictionary else None
            options = {zstd.CompressionParameter.compression_level: level,
                       zstd.CompressionParameter.checksum_flag: 1}

            def decompress(data):
                if zstd.get_frame_size(data) != len(data):
                    raise ValueError(f"{len(data) - zstd.get_frame_size(data)} bytes follow the zstd frame")
                return zstd.decompress(data, zstd_dict=zd)
            return lambda data: zstd.compress(data, options=options, zstd_dict=zd), decompress
        return codec, lambda samples, size: zstd.train_dict(samples, size).dict_content
    try:
        import zstandard
    except ImportError:
        return None
    try:  # (zstandard 0.20+ can refuse them; older versions skip them)
        zstandard.ZstdDecompressor().decompress(zstandard.ZstdCompressor().compress(b""), allow_extra_data=False)
        whole = {"allow_extra_data": False}
    except TypeError:  # pragma: no cover - zstandard < 0.20
        whole = {}

    def codec(level, dictionary):
        zd = zstandard.ZstdCompressionDict(dictionary) if dictionary else None
        return (lambda data: zstandard.ZstdCompressor(level=level, dict_data=zd, write_checksum=True).compress(data),
                lambda data: zstandard.ZstdDecompressor(dict_data=zd).decompress(data, **whole))
    return codec, lambda samples, size: zstandard.train_dictionary(size, samples).as_bytes()


def _zstd_codec(store_dir):
    """(compress, decompress) of the zstd strings store in store_dir; None for a plain one."""
    join = os.path.join
    level_path = join(store_dir, "zstd_level.ninja")
    if not os.path.lexists(level_path):
        return None
    codec = _require_zstd(store_dir)[0]
    text = _read_text(level_path, "zstd level", 64)
    try:
        level = int(text)
    except ValueError as e:
        raise ValueError(f"{level_path}: the zstd level must be an integer, found {text!r}: the "
                         f"store is damaged") from e
    dict_path = join(store_dir, "zstd_dict.ninja")
    dictionary = _read_bytes(dict_path, "zstd dictionary", 1 << 26) if os.path.lexists(dict_path) else None
    def checked(function, what):
        def call(data):
            try:
                return function(data)
            except Exception as e:  # each library raises its own error (or MemoryError)
                raise ValueError(f"{store_dir}: cannot {what} a string with the store's zstd settings "
                                 f"({type(e).__name__}: {e}): the store is damaged") from e
        return call
    compress, decompress = codec(level, dictionary)
    return checked(compress, "compress"), checked(decompress, "decompress")


def _train_dictionary(samples, size, path):
    try:
        return _require_zstd(path)[1](samples, size)
    except ModuleNotFoundError:
        raise
    except Exception as e:  # each library raises its own ZstdError
        raise ValueError(f"{path}: cannot train a zstd dictionary of {size} bytes on "
                         f"{len(samples)} strings ({e}); pass more (or more varied) strings, a "
                         f"smaller zstd_train_dictionary_size, or none") from e


def _require_zstd(path):
    module = _zstd_module()
    if module is None:
        raise ModuleNotFoundError(
            f"{path} is zstd-compressed: reading or writing it needs Python 3.14+ "
            f"(compression.zstd) or the zstandard package (pip install zstandard)")
    return module


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd frame's first bytes: never UTF-8 ("(" then a continuation byte)


def _starts_with_zstd_frame(store_dir):
    """Whether the first string of a strings store is a zstd frame, which plain UTF-8 never is."""
    start = _entry(os.path.join(store_dir, "starts"), 0)
    fd = _open_fd(os.path.join(store_dir, "data.ninja"), "strings data")
    try:
        return _pread(fd, 4, start) == _ZSTD_MAGIC and _entry(os.path.join(store_dir, "ends"), 0) - start >= 4
    finally:
        os.close(fd)


def _lost_zstd_level(store_dir):
    return ValueError(f"{store_dir}: its strings are zstd-compressed but zstd_level.ninja is missing "
                      f"(and zstd_dict.ninja too, if it had a dictionary): restore the file from a "
                      f"copy of the store (it holds the level as text, e.g. 3); until then reads "
                      f"and appends are refused")


def _utf8(strings, path, first=0):
    """The UTF-8 bytes of each string (numbered from first); non-str items and lone surrogates
    are refused here, before anything is written."""
    try:
        return list(map(str.encode, strings))
    except TypeError as e:
        bad = next(s for s in strings if not isinstance(s, str))
        raise TypeError(f"{path}: StringsMmap holds str only, got {type(bad).__name__} "
                        f"{_short(bad)}; decode bytes or convert with str() first") from e
    except UnicodeEncodeError as e:
        i, bad = next((i, s) for i, s in enumerate(strings) if not _encodable(s))
        raise UnicodeEncodeError(e.encoding, bad, e.start, e.end, (
            f"{path}: string {first + i} holds a lone surrogate, which UTF-8 cannot store; replace it "
            f"first, e.g. s.encode('utf-8', 'replace').decode()")) from e


def _decodes(raw):
    try:
        raw.decode()
        return True
    except UnicodeDecodeError:
        return False


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
    _noun, _unit = "string", "byte"

    def __init__(self, out_dir, mode="r+b", starts_key="starts", ends_key="ends", *, durable=False):
        _check_keys(dict(starts_key=starts_key, ends_key=ends_key), "StringsMmap")
        if mode not in ("r", "rb", "r+", "r+b", "c"):
            raise ValueError(f"{out_dir}: mode must be 'r', 'r+' or 'c' (or 'rb', 'r+b'), got {mode!r}")
        self.out_dir = _absolute(out_dir)
        self.mode = mode
        self.durable = durable
        self._init_state()
        self._reload(None)

    def _init_state(self):
        self._zstd = None  # (compress, decompress) for a zstd store
        _Sequence._init_state(self)

    def _private_bytes(self):
        return np.frombuffer(self._buf, np.uint8)  # (mapped copy-on-write in mode "c")

    def _drop_arrays(self):
        self._buf = None

    def _load(self, snapshot):
        d, join = self.out_dir, os.path.join
        opened = self._map_offsets(snapshot)  # (the codec stays set meanwhile: a read in another
        if opened is None:                    # thread may be about to decode a string with it)
            self._buf, self._source, self._zstd = b"", b"", None
            return
        n, end = opened
        access = mmap.ACCESS_COPY if self.mode == "c" else mmap.ACCESS_READ
        mm = self._map(join(d, "data.ninja"), end, access, what="strings data")
        self._buf = mm if mm is not None else b""
        self._io.remap(self._buf, mm, join(d, "data.ninja"), 1, self._starts)
        self._zstd = _zstd_codec(d)  # (says at open, not at the first read, if no zstd module)
        self._n = self._mapped = n

    def __getitem__(self, item):
        try:  # the hot path, kept to one Python call (see RaggedMmap.__getitem__)
            if not self._checked[item >> 9]:  # offsets are checked a page at a time (_check_page)
                raise IndexError
            raw = self._source[self._starts[item]:self._ends[item]]  # (see RaggedMmap.__getitem__)
        except IndexError:  # out of range, appended since this object mapped its files, or unchecked
            return self._read_one(self._position(item))
        except (TypeError, NotImplementedError):  # a slice, a list, a mask
            return self._read_many(item)
        try:
            if self._zstd is None:
                return raw.decode()  # UTF-8 (the default: faster than naming it)
            return self._zstd[1](raw).decode()
        except UnicodeDecodeError as e:
            raise self._undecodable(item, e) from e

    def _undecodable(self, item, error):
        if self._zstd is None and _starts_with_zstd_frame(self.out_dir):
            return _lost_zstd_level(self.out_dir)
        return ValueError(f"{self.out_dir}: string {item} is not UTF-8 ({error.reason} at byte "
                          f"{error.start}): the store is damaged")

    def _page_problem(self, lo, hi):
        return _offsets_problem(self._starts, self._ends, lo, hi, len(self._buf)), True

    def _damaged(self, item):
        i = self._position(int(item))
        return ValueError(f"{self.out_dir}: string {i} spans bytes {self._starts[i]} to "
                          f"{self._ends[i]}, which do not follow the previous string or fit the "
                          f"data: the store is damaged (python -m mmap_ninja verify {self.out_dir} "
                          f"lists what is wrong)")

    def _from_offsets(self, keys, columns):
        """Strings keys (mapped), given their (starts, ends)."""
        if self._zstd is not None:
            return [self[k] for k in keys]
        buf, (starts, ends) = self._buf, columns
        try:
            if len(starts) > 1 and 512 * len(starts) <= ends[-1] - starts[0] <= 1 << 22 \
                    and starts[1:] == ends[:-1]:
                # long strings, each where the one before ends (iteration, a slice): one copy
                # out of the map, then cut. A copy per string leaves the memory prefetcher
                # behind (2 KB strings iterated: 3.07 -> 3.57 GB/s cached; cold, 70-76% -> 75-85%
                # of a pread scan); short ones gain nothing. (O(1) checks first; the chain check
                # makes the copy exactly the bytes asked for.)
                lo = starts[0]
                run = buf[lo:ends[-1]]
                return [run[s - lo:e - lo].decode() for s, e in zip(starts, ends)]
            return [buf[s:e].decode() for s, e in zip(starts, ends)]
        except UnicodeDecodeError as e:
            bad = next(k for k, s, e in zip(keys, *columns) if not _decodes(buf[s:e]))
            raise self._undecodable(bad, e) from e

    def append(self, string):
        """Append one string (crash-safe; O(len(string)))."""
        self.extend([string])

    def set_single(self, idx, new_value):  # (the published names for strings)
        self[int(idx)] = new_value

    def set_multiple(self, key, value):
        self[key] = value

    def extend(self, list_of_strings, verbose=False):
        """Append strings; a non-str item refuses the whole call before anything is written."""
        if isinstance(list_of_strings, (str, bytes, bytearray)):
            raise TypeError(f"{self.out_dir}: extend takes a sequence of strings, got a single "
                            f"{type(list_of_strings).__name__}; use append, or wrap it in a list")
        strings = list_of_strings if type(list_of_strings) is list and not verbose else \
            list(_progress(list_of_strings, desc="strings", verbose=verbose))
        chunks, sizes = _utf8_chunks(strings, self.out_dir)  # (checks every string first)
        if not len(sizes):
            return
        with self._writing() as writer:
            if writer.compress is not None:  # a zstd store (as its files say): a frame per string
                chunks = list(map(writer.compress, _utf8(strings, self.out_dir)))
                sizes = list(map(len, chunks))
            self._appended(writer.append(chunks, sizes, None))

    def _encode_replacement(self, i, value):
        raw = _utf8([value], self.out_dir, i)[0]
        if self._zstd is not None:
            raise ValueError(f"{self.out_dir}: strings of a zstd-compressed store cannot be "
                             f"replaced in place")
        self._ensure_mapped(i + 1)
        start, end = self._starts[i], self._ends[i]
        if len(raw) != end - start:
            raise ValueError(f"{self.out_dir}: string {i} is {end - start} UTF-8 bytes; a "
                             f"replacement must be as long, got {len(raw)} bytes")
        return start, raw

    @classmethod
    def from_strings(cls, out_dir, strings, mode="r+b", starts_key="starts", ends_key="ends",
                     verbose=False, zstd_level=None, zstd_train_dictionary_size=None, *,
                     batch_size=None, durable=False):
        """Write strings as a strings store; it replaces what out_dir held once complete.
        ``zstd_level`` compresses each string (0.9.0 layout); ``zstd_train_dictionary_size``
        first trains a dictionary of that many bytes on the strings (then held in memory)."""
        return cls._from_strings(out_dir, strings, mode, verbose, zstd_level, zstd_train_dictionary_size,
                                 batch_size, durable, dict(starts_key=starts_key, ends_key=ends_key),
                                 "from_strings")

    @classmethod
    def from_generator(cls, out_dir, sample_generator, batch_size, verbose=False, *, mode="r+b",
                       zstd_level=None, zstd_train_dictionary_size=None, durable=False, **keys):
        """Write a generator of strings, ``batch_size`` strings at a time."""
        return cls._from_strings(out_dir, sample_generator, mode, verbose, zstd_level,
                                 zstd_train_dictionary_size, _check_batch_size(batch_size), durable,
                                 keys, "from_generator")

    @classmethod
    def _from_strings(cls, out_dir, strings, mode, verbose, level, dictionary_size, batch_size,
                      durable, keys, where):
        _check_keys(keys, f"StringsMmap.{where}", {"starts_key": "starts", "ends_key": "ends"})
        if isinstance(strings, (str, bytes, bytearray)):
            raise TypeError(f"{out_dir}: StringsMmap.{where} takes a sequence (or iterable) of "
                            f"strings, got a single {type(strings).__name__}; wrap it in a list")
        if dictionary_size is not None and level is None:
            level = 3
        with _creating(out_dir, durable) as build:
            dictionary = None
            if level is not None and dictionary_size:
                strings = list(strings)
                dictionary = _train_dictionary(_utf8(strings, out_dir), int(dictionary_size), out_dir)
            if level is not None:  # a level zstd refuses is the caller's error, said now
                codec = _require_zstd(out_dir)[0]
                try:
                    codec(int(level), dictionary)[0](b"mmap_ninja")
                except Exception as e:  # (each library raises its own error)
                    raise ValueError(f"{out_dir}: zstd cannot compress at zstd_level={level!r} ({e}); "
                                     f"use a level from 1 to 22 (3 is zstd's default)") from e
            _create_sequence(build, None, False, raw=True,
                             zstd=None if level is None else (int(level), dictionary), durable=durable)
            with cls(build, durable=durable) as builder:
                _write_batches(_progress(strings, desc="strings", verbose=verbose),
                               65536 if batch_size is None else _check_batch_size(batch_size), builder.extend)
        return cls(out_dir, mode=mode, durable=durable)

    def __repr__(self):
        if not os.path.lexists(os.path.join(self.out_dir, "type.ninja")):
            return f"StringsMmap({self.out_dir!r}, empty: no store there yet, append creates one)"
        return f"StringsMmap({self.out_dir!r}, {len(self)} strings)"


###################################################################################################
# generic: open_existing, ShardedMmap, conversion on any executor
###################################################################################################
def open_existing(out_dir, wrapper_fn=None, mode=None):
    """Open the store in ``out_dir``, whichever kind its type.ninja says it is. ``mode``: "r"
    (or "rb") read-only, "r+" (or "r+b") writable, "c" copy-on-write; by default numpy and
    ragged stores open read-only and strings stores "r+b", as in the published package."""
    out_dir = os.fspath(out_dir)
    _check_directory(out_dir)
    kind = _from_one_directory(out_dir, lambda: _read_kind(out_dir), lambda: None)  # (a swap at work: waited)
    if mode is not None and mode not in ("r", "rb", "r+", "r+b", "c"):
        raise ValueError(f"{out_dir}: mode must be 'r', 'r+' or 'c' (or 'rb', 'r+b'), got {mode!r}")
    array_mode = "r" if mode is None else mode.replace("b", "")
    if kind == "numpy":
        arr = np_open_existing(out_dir, array_mode)
        return Wrapped(arr, wrapper_fn) if wrapper_fn is not None else arr
    if kind == "ragged":
        return RaggedMmap(out_dir, wrapper_fn=wrapper_fn, mode=array_mode)
    strings = StringsMmap(out_dir, "r+b" if mode is None else mode)
    return Wrapped(strings, wrapper_fn, copy_before_wrapper_fn=False) if wrapper_fn is not None else strings


class ShardedMmap:
    """Several stores (one per worker or node, say) read as one sequence, without copying.

    ``ShardedMmap(["shard-0", "shard-1"])`` or ``ShardedMmap("parent_dir")`` (its store
    subdirectories in sorted order). Supports len, int/slice/list indexing and iteration, and
    pickles as its shards' paths and lengths (a snapshot, as a single store does).
    """

    def __init__(self, shards, wrapper_fn=None, _opened=None):
        if isinstance(shards, (str, bytes, os.PathLike)):
            shards = _shard_dirs(os.fsdecode(shards))
        self.paths = [os.fspath(p) for p in shards]
        self.wrapper_fn = wrapper_fn
        self.shards = _opened or [open_existing(p, wrapper_fn) for p in self.paths]
        for path, shard in zip(self.paths, self.shards):
            data = shard.data if isinstance(shard, Wrapped) else shard
            if isinstance(data, np.ndarray) and data.ndim == 0:
                raise ValueError(f"{path} is a 0-d numpy store: one value, not a sequence of "
                                 f"samples, so it cannot be a shard")
        self.__setstate__({"lengths": [len(s) for s in self.shards]})

    def __reduce__(self):  # (with the shards: each pickles as its path and its length, a snapshot)
        lengths = [b - a for a, b in zip(self._bounds, self._bounds[1:])]
        return (ShardedMmap, ([_absolute(p) for p in self.paths], self.wrapper_fn, self.shards), {"lengths": lengths})

    def __setstate__(self, state):
        """Index by the shard lengths given: when unpickled, the sender's, so that a numpy shard
        re-created shorter since then does not move later shards' samples to other indices.
        (As state, not an argument: an older version unpickles it too, ignoring them.)"""
        self._bounds = np.cumsum([0] + state["lengths"]).tolist()
        self._first = np.asarray(self._bounds[:-1], np.int64)  # each shard's first index

    def _shorter(self, k, local):
        """The IndexError for local row(s) that shard k no longer holds (re-created shorter
        since this object was pickled), else None."""
        have = len(self.shards[k])
        if np.max(local) >= have:
            return IndexError(f"{self.paths[k]} holds {have} samples now, where this ShardedMmap saw "
                              f"{self._bounds[k + 1] - self._bounds[k]} (re-created since it was "
                              f"pickled): its sample {int(np.max(local))} is gone; open the shards again")
        return None

    @classmethod
    def from_indexable(cls, out_dir, indexable, num_shards, *, executor=None, kind=None, batch_size=4096,
                       verbose=False, wrapper_fn=None, durable=False):
        """Write ``indexable[0], ..., indexable[len - 1]`` as ``num_shards`` stores under ``out_dir``,
        each written by one task of ``executor`` (any ``concurrent.futures.Executor``: a Dask
        cluster's ``client.get_executor()``, ``mpi4py.futures.MPIPoolExecutor``, a process pool;
        by default a local process pool), and return them as one ``ShardedMmap``.

        Shard ``k`` holds one contiguous range of indices, in order, so the result reads exactly
        like the source. Each task gets the indexable pickled (a store pickles as its path).
        ``kind``: "ragged", "strings" or "numpy" (by default strings if the first item is a str,
        else ragged). A shard appears only when complete (built under a hidden name, then
        renamed): a failed task or a killed worker leaves nothing ``ShardedMmap`` reads, and
        calling again with the same arguments writes only the missing shards. ``out_dir``
        records its layout (``shards.json``): another layout there is refused, never mixed.
        ``durable``: each shard (and the layout) is fsync-ed before it appears, so a shard that
        exists survives its node's power loss.
        """
        out_dir = os.fspath(out_dir)
        n = _length(indexable)
        if n is None:
            raise TypeError(f"{out_dir}: ShardedMmap.from_indexable splits len(indexable) items into "
                            f"shards, and {type(indexable).__name__} has no len(); use "
                            f"RaggedMmap.from_indexable for a source read until IndexError")
        num_shards, batch_size = _check_batch_size(num_shards, "num_shards"), _check_batch_size(batch_size)
        manifest = os.path.join(out_dir, "shards.json")
        if kind is None and os.path.lexists(manifest):  # a rerun: the kind it recorded
            kind = _read_layout(out_dir)["kind"]
        if kind is None:
            kind = "strings" if n and isinstance(indexable[0], str) else "ragged"
        if kind not in _SHARD_WRITERS:
            raise ValueError(f"{out_dir}: kind must be 'ragged', 'strings' or 'numpy', got {kind!r}")
        if kind == "numpy" and not n:
            raise ValueError(f"{out_dir}: the indexable is empty, and a numpy store takes its dtype "
                             f"and row shape from its first item; use kind='ragged', or np_empty")
        bounds = [n * k // num_shards for k in range(num_shards + 1)]
        layout = {"num_shards": num_shards, "length": n, "kind": kind, "bounds": bounds}
        names = _shard_names(out_dir, layout, durable)
        missing = [k for k, name in enumerate(names)
                   if not _complete(os.path.join(out_dir, name), bounds[k + 1] - bounds[k])]
        for k in missing:  # (a shard is built where out_dir's entry leads: never through a link)
            if os.path.islink(os.path.join(out_dir, names[k])):
                raise PermissionError(f"{os.path.join(out_dir, names[k])} is a symbolic link: a conversion "
                                      f"writes its shards inside {out_dir} only; remove the link")
        if missing:
            try:
                pickle.dumps(indexable)
            except Exception as e:
                raise TypeError(f"{out_dir}: the indexable goes to every task, so it must pickle "
                                f"({type(e).__name__}: {e}); a store pickles as its path, a "
                                f"lambda does not (use a module-level function)") from e
        own = executor is None and len(missing) > 0
        if own:
            executor = ProcessPoolExecutor(min(len(missing), os.cpu_count() or 1))
        try:
            tasks = [executor.submit(_write_shard, os.path.join(out_dir, names[k]), indexable, bounds[k],
                                     bounds[k + 1], kind, batch_size, durable) for k in missing]
            failed = None
            for task in _progress(as_completed(tasks), total=len(tasks), desc="shards", verbose=verbose):
                if task.exception() is not None and failed is None:
                    failed = task.exception()  # (the other shards are kept: a rerun adds the rest)
            if failed is not None:
                raise failed
        finally:
            if own:
                executor.shutdown(cancel_futures=True)
        if durable:  # (shards an earlier run wrote too, and out_dir's own entry)
            _fsync_tree(out_dir)
            _fsync_tree(os.path.dirname(os.path.abspath(out_dir)), recurse=False)
        return cls(out_dir, wrapper_fn)

    def __len__(self):
        return self._bounds[-1]

    def __getitem__(self, item):
        if _is_int(item) or type(item) is bool or _int_0d(item):  # (as a single store takes them)
            i = int(item)
            n = self._bounds[-1]
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} samples in {len(self.paths)} shards")
            if i < 0:
                i += n
            k = bisect.bisect_right(self._bounds, i) - 1
            try:
                return self.shards[k][i - self._bounds[k]]
            except IndexError as e:
                raise self._shorter(k, i - self._bounds[k]) or e
        idx = _as_indices(item, len(self), "ShardedMmap")
        if not len(idx):
            return []
        shard_of = np.searchsorted(self._first, idx, "right") - 1
        counts = np.bincount(shard_of, minlength=len(self.shards)).tolist()
        if sum(map(bool, counts)) * 16 > len(idx):  # a few indices per shard: one at a time
            return [self[i] for i in idx.tolist()]
        got, where = [], []  # each shard's batch read, and where its samples go
        for k, count in enumerate(counts):
            if count:
                mine = np.flatnonzero(shard_of == k) if count < len(idx) else None
                local, shard = (idx if mine is None else idx[mine]) - self._bounds[k], self.shards[k]
                gone = None if isinstance(shard, _Sequence) else self._shorter(k, local)
                if gone is not None:  # (a sequence keeps its own snapshot length)
                    raise gone
                got += shard[local] if isinstance(shard, _Sequence) else [shard[i] for i in local.tolist()]
                where.append(mine)
        if len(where) == 1:
            return got
        order = np.empty(len(idx), np.int64)  # order[j]: where in got the sample asked j-th is
        order[np.concatenate(where)] = np.arange(len(idx))
        return list(operator.itemgetter(*order.tolist())(got))  # back to the order asked

    def __iter__(self):
        for k, shard in enumerate(self.shards):
            length, count = self._bounds[k + 1] - self._bounds[k], 0
            for count, sample in enumerate(itertools.islice(shard, length), 1):
                yield sample
            if count < length:  # (a numpy shard re-created shorter since this object was pickled)
                raise self._shorter(k, length - 1) or IndexError(
                    f"{self.paths[k]} gave {count} samples, where this ShardedMmap saw {length}")

    def prefetch(self, indices):
        """Start reading samples ``indices`` from disk and return at once (see
        RaggedMmap.prefetch); each shard is asked for its own."""
        idx = _as_indices([indices] if _is_int(indices) else indices, len(self), "ShardedMmap")
        shard_of = np.searchsorted(self._first, idx, "right") - 1
        for k in np.unique(shard_of).tolist():
            _prefetch(self.shards[k], idx[shard_of == k] - self._bounds[k])

    @property
    def cold(self):
        """Whether any shard's reads treat its data as not in the page cache (see
        RaggedMmap.cold). Setting it sets every ragged and strings shard's; a numpy shard is a
        plain np.memmap, read without probing."""
        return any(shard.cold for shard in self._sequences())

    @cold.setter
    def cold(self, value):
        for shard in self._sequences():
            shard.cold = value

    def _sequences(self):
        """The ragged and strings shards (unwrapped)."""
        shards = (s.data if isinstance(s, Wrapped) else s for s in self.shards)
        return [s for s in shards if isinstance(s, _Sequence)]

    def __repr__(self):
        return f"ShardedMmap({len(self.paths)} shards, {len(self)} samples)"


def _prefetch(store, idx):
    """store.prefetch(idx) for any store: a numpy store's memmap asks for its rows' pages."""
    data = store.data if isinstance(store, Wrapped) else store
    if hasattr(data, "prefetch"):
        return data.prefetch(idx)
    if not len(idx):
        return
    if isinstance(data, np.memmap) and isinstance(data.base, mmap.mmap) and data.ndim and data.flags.c_contiguous:
        row = data.strides[0]
        offsets = np.asarray(idx, np.int64) * row + data.offset
        for lo, hi in zip(*(r.tolist() for r in _joined(offsets, offsets + row))):
            _willneed(data.base, lo, hi)


_SHARD_WRITERS = {"ragged": RaggedMmap.from_generator, "strings": StringsMmap.from_generator,
                  "numpy": np_from_generator}


def _write_shard(path, source, start, stop, kind, batch_size, durable=False):
    """One task of ShardedMmap.from_indexable: source[start:stop] as the store at path (built
    aside and renamed when complete, so safe to run twice)."""
    if kind == "numpy" and start == stop:  # (more shards than items) the first gives the rows
        first = _as_sample(source[0], path)
        np_empty(path, first.dtype, (0,) + first.shape, durable=durable)
        return
    _SHARD_WRITERS[kind](path, (source[i] for i in range(start, stop)), batch_size, durable=durable)


def _shard_names(out_dir, layout, durable=False):
    """The shard directory names of a conversion to out_dir, after recording its layout there,
    or checking that the layout recorded there is the same."""
    manifest = os.path.join(out_dir, "shards.json")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.lexists(manifest):
        found = _read_layout(out_dir)
        if found != layout:
            raise ValueError(f"{out_dir} holds the shards of another conversion ({found['num_shards']} "
                             f"shards of {found['length']} {found['kind']} samples; this one makes "
                             f"{layout['num_shards']} of {layout['length']} {layout['kind']}): use "
                             f"another directory, or remove that one first")
    else:
        others = [name for name in os.listdir(out_dir) if not name.startswith(".")]
        for name in [name for name in others if name.startswith("shards.json.tmp-")]:
            pid = _pid_of(name, "shards.json.tmp-")
            if pid is not None and not _alive(pid):  # (a conversion killed as it recorded its layout)
                others.remove(name)
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(out_dir, name))
        if others:
            raise ValueError(f"{out_dir} is not empty ({_short(sorted(others))}): a conversion "
                             f"writes its shards into a directory of its own")
        _replace_file(manifest, json.dumps(layout).encode(), durable)
    return _layout_names(layout)


def _read_layout(out_dir):
    """The layout a conversion recorded in out_dir, checked: a damaged or hostile shards.json
    must not make a reader list no shards, or build names without end."""
    path = os.path.join(out_dir, "shards.json")
    raw = _read_bytes(path, "shard layout")
    try:
        layout = json.loads(raw)
    except (ValueError, RecursionError):  # (not JSON; an int of over 4300 digits; deep nesting)
        layout = None
    bounds = layout.get("bounds") if isinstance(layout, dict) else None
    if not (isinstance(bounds, list) and len(bounds) >= 2 and all(type(b) is int for b in bounds)
            and bounds[0] == 0 and all(a <= b for a, b in zip(bounds, bounds[1:]))
            and layout.get("num_shards") == len(bounds) - 1 and type(layout["num_shards"]) is int
            and layout.get("length") == bounds[-1] and type(layout["length"]) is int
            and layout.get("kind") in _SHARD_WRITERS):
        raise ValueError(f"{path} is damaged: it is not the layout ShardedMmap.from_indexable records "
                         f"(num_shards, length, kind, bounds from 0 to length), but {_short(raw)}; "
                         f"restore it, or convert again into a new directory")
    return layout


def _layout_names(layout):
    width = len(str(layout["num_shards"]))
    return [f"shard-{k:0{width}d}-of-{layout['num_shards']}" for k in range(layout["num_shards"])]


def _complete(path, length):
    try:
        store = open_existing(path)
    except (OSError, ValueError):
        return False
    return len(store) == length


def _shard_dirs(parent):
    """The stores a ShardedMmap over parent reads, in order: its store subdirectories sorted by
    name (hidden ones, such as shards still being written, are not read), or parent itself when
    it is a store (a store's own parts are never read as shards). The output of a conversion
    (ShardedMmap.from_indexable) must hold every shard its layout names."""
    _check_directory(parent)
    if os.path.lexists(os.path.join(parent, "type.ninja")):
        return [parent]
    manifest = os.path.join(parent, "shards.json")
    if os.path.lexists(manifest):
        names = _layout_names(_read_layout(parent))
        missing = [name for name in names if not os.path.lexists(os.path.join(parent, name, "type.ninja"))]
        if missing:
            raise FileNotFoundError(f"{parent} holds {len(names) - len(missing)} of the {len(names)} "
                                    f"shards of its conversion (missing {_short(missing)}): it is not "
                                    f"complete; run ShardedMmap.from_indexable again to finish it")
        return [os.path.join(parent, name) for name in names]
    shards = []
    for path in sorted(os.path.join(parent, name) for name in os.listdir(parent) if not name.startswith(".")):
        if os.path.lexists(os.path.join(path, "type.ninja")):
            shards.append(path)
        elif os.path.isdir(path):
            _is_store(path, None, strays=False)  # (a store's data without type.ninja: refused, not left out)
    if not shards:
        raise FileNotFoundError(f"{parent} holds no mmap_ninja store subdirectories")
    return shards


###################################################################################################
# Training loops: epochs over data bigger than RAM
###################################################################################################
class QuasiRandomSampler:
    """Batches of indices for epochs over a store bigger than RAM, read at near-sequential speed.

    A random order reads a cold store one page at a time (under 1% of a sequential scan's
    speed). This one (FFCV's QUASI_RANDOM idea) splits the store into blocks of about
    ``block_bytes`` of data and shuffles the blocks; it then takes them ``GROUP`` at a time, and
    each group a ``1/SPLIT`` of every block at a time (a window), and shuffles each window so
    that any stretch of it draws evenly from all the blocks. So every batch draws from many
    distant parts of the store, while the pages needed at any time stay bounded: the window
    being read and the next one, which it asks for meanwhile (``store.prefetch``), a few MB
    each, so that little waits for the disk even at the start.

    An iterable of batches (lists of int indices) with ``len()`` and ``set_epoch(epoch)``: pass
    it to a PyTorch ``DataLoader`` as ``batch_sampler`` (the main process prefetches; the page
    cache serves every worker), or iterate it directly. Each epoch is a permutation of this
    rank's share; the ranks' shares are disjoint and together cover the store, padded with at
    most ``world_size - 1`` repeats (or, with ``drop_last``, cut, and the last short batch
    dropped), as ``DistributedSampler`` does. The order depends on ``seed`` and the epoch only.
    Works with every store kind, ``ShardedMmap`` included (a block never spans two shards).
    """

    GROUP = 8  # blocks read together (a short last group joins the one before: 8 to 15)
    SPLIT = 4  # windows per group: each a quarter of every block of the group

    def __init__(self, store, batch_size, *, seed=0, rank=0, world_size=1, drop_last=False, block_bytes=8 << 20):
        self.batch_size = _check_batch_size(batch_size, floats=False)  # (ints, as rank must be)
        world_size = _check_batch_size(world_size, "world_size", None, False)
        block_bytes = min(_check_batch_size(block_bytes, "block_bytes", None, False), 1 << 62)  # (more: one block)
        if not (_is_int(rank) and 0 <= rank < world_size):
            raise ValueError(f"rank must be an int in [0, {world_size}) for world_size={world_size}, got {rank!r}")
        self.store, self.seed, self.rank, self.world_size = store, _check_seed(seed, "seed"), int(rank), world_size
        self.drop_last, self.epoch = bool(drop_last), 0
        self.blocks = _block_starts(store, block_bytes)  # each block's first index, then len(store)
        n = int(self.blocks[-1])
        self.per_rank = n // world_size if drop_last else -(-n // world_size)

    def set_epoch(self, epoch):
        """Use epoch's order (call it before each epoch, as with DistributedSampler)."""
        self.epoch = _check_seed(epoch, "epoch")

    def __len__(self):
        return self.per_rank // self.batch_size if self.drop_last else -(-self.per_rank // self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng([x % (1 << 64) if x < 0 else x for x in (self.seed, self.epoch)])  # (unsigned)
        windows = self._windows(rng)
        carry, window = np.zeros(0, np.int64), next(windows, None)
        if window is not None:
            _prefetch(self.store, window)
        while window is not None:
            following = next(windows, None)
            if following is not None:  # asked for while this window is read
                _prefetch(self.store, following)
            carry = np.concatenate([carry, self._shuffled(window, rng)])
            while len(carry) >= self.batch_size or (following is None and len(carry) and not self.drop_last):
                yield carry[:self.batch_size].tolist()
                carry = carry[self.batch_size:]
            window = following

    def _windows(self, rng):
        """This rank's indices, a window at a time (each in block order)."""
        sizes = np.diff(self.blocks)
        perm = rng.permutation(len(sizes))
        first, size = self.blocks[:-1][perm], sizes[perm]
        index = np.arange(int(size.sum()), dtype=np.int64) + np.repeat(first - (np.cumsum(size) - size), size)
        # this rank's part of the epoch padded with its first indices (at most world_size - 1,
        # taken round: only this part is made, whatever world_size is), or cut
        lo = self.rank * self.per_rank
        if lo + self.per_rank <= len(index):
            index = index[lo:lo + self.per_rank]
        else:  # (padded, so the store is not empty)
            index = index[np.arange(lo % len(index), lo % len(index) + self.per_rank) % len(index)]
        block = np.searchsorted(self.blocks, index, "right")
        runs = np.r_[0, np.flatnonzero(block[1:] != block[:-1]) + 1, len(index)] if len(index) else [0]
        groups = list(runs[:-1:self.GROUP]) + [len(index)]
        if len(runs) - 1 > self.GROUP and (len(runs) - 1) % self.GROUP:
            del groups[-2]  # a short last group joins the one before
        length = np.diff(runs)  # each sample's place in its run, in SPLIT parts
        run = np.repeat(np.arange(len(length)), length)
        quarter = (np.arange(len(index)) - np.asarray(runs)[run]) * self.SPLIT // length[run]
        for lo, hi in zip(groups, groups[1:]):
            for q in range(self.SPLIT):
                yield index[lo:hi][quarter[lo:hi] == q]

    @staticmethod
    def _shuffled(window, rng):
        """A window (in block order) shuffled so that any stretch of it draws evenly from its
        blocks: a sample ranked r (at random) in its block's m goes to (r + U) / m of the span."""
        if not len(window):
            return window
        run = np.r_[0, np.cumsum(np.diff(window) != 1)]
        starts = np.r_[0, np.flatnonzero(np.diff(run)) + 1]
        rank = np.empty(len(window), np.int64)
        rank[np.argsort(run + rng.random(len(window)))] = np.arange(len(window))
        rank -= starts[run]
        length = np.diff(np.r_[starts, len(window)])[run]
        return window[np.argsort((rank + rng.random(len(window))) / length)]

    def __repr__(self):
        return (f"QuasiRandomSampler({len(self)} batches of {self.batch_size}, rank {self.rank} of "
                f"{self.world_size}, {len(self.blocks) - 1} blocks, epoch {self.epoch})")


def _check_seed(value, name):
    """An int seed or epoch (negative ones too, as torch takes them)."""
    if not _is_int(value):
        raise TypeError(f"QuasiRandomSampler's {name} must be an int, got {value!r}")
    return int(value)


def _block_starts(store, block_bytes):
    """The index where each block of store starts (samples whose data lies in one stretch of
    block_bytes of one file), then len(store)."""
    if isinstance(store, ShardedMmap):
        parts = [_block_starts(shard, block_bytes)[:-1] + first for shard, first in zip(store.shards, store._bounds)]
        return np.unique(np.concatenate(parts + [np.array([len(store)], np.int64)]))
    data = store.data if isinstance(store, Wrapped) else store
    if isinstance(data, np.ndarray) and not data.ndim:
        where = os.path.dirname(getattr(data, "filename", None) or "")
        raise TypeError(f"{where + ' is a 0-d numpy store' if where else 'a 0-d array'}: one value, not a "
                        f"sequence of samples, so QuasiRandomSampler has nothing to order")
    n = len(data)
    if isinstance(data, _Sequence):
        offsets = data.starts * data._io.itemsize
    elif isinstance(data, np.ndarray) and data.ndim:
        offsets = np.arange(n, dtype=np.int64) * data.strides[0]
    else:  # a sequence of unknown layout: blocks of as many samples as 4 KB ones would make
        offsets = np.arange(n, dtype=np.int64) * 4096
    block = offsets // block_bytes
    return np.r_[0, np.flatnonzero(block[1:] != block[:-1]) + 1, n].astype(np.int64) if n else np.zeros(1, np.int64)


###################################################################################################
# Command line: python -m mmap_ninja info|verify|from-npy|from-lines
###################################################################################################
def _store_report(path):
    """(kind, lines of a human-readable summary) for the info command."""
    _check_directory(path)
    if not os.path.lexists(os.path.join(path, "type.ninja")):
        where = "holds no mmap_ninja store (no type.ninja)" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"{path} {where}: opened as a ragged or strings store it is "
                                f"empty, and append fills it")
    kind = _read_kind(path)
    size = sum(os.lstat(os.path.join(r, f)).st_size for r, _, fs in os.walk(path) for f in fs)
    lines = [f"path:     {os.path.abspath(path)}", f"kind:     {kind}"]
    if kind == "numpy":
        dtype, shape, order = _read_meta(path)
        lines += [f"samples:  {shape[0] if shape else 1}", f"dtype:    {dtype}",
                  f"shape:    {shape}", f"order:    {order}"]
    elif kind == "ragged":
        with RaggedMmap(path) as store:
            lines += [f"samples:  {len(store)}", f"dtype:    {store.dtype}"]
            bounds = {}  # per ndim: the least and greatest length of each axis
            for _, shapes in _shape_chunks(store):
                by_ndim = {}
                for shape in shapes:
                    by_ndim.setdefault(len(shape), []).append(shape)
                for nd, group in by_ndim.items():
                    bounds[nd] = _axis_bounds(np.asarray(group, np.int64).reshape(len(group), nd), bounds.get(nd))
        lines.append(f"ndim:     {', '.join(map(str, sorted(bounds))) or '-'}")
        for nd in sorted(bounds):
            for axis, (lo, hi) in enumerate(zip(*bounds[nd])):
                lines.append(f"  {nd}-D axis {axis}: min {lo}, max {hi}")
    else:
        join = os.path.join
        lines.append(f"samples:  {_count(path)}")
        level = join(path, "zstd_level.ninja")
        compression = f"zstd level {_read_text(level, 'zstd level', 64)}" if os.path.lexists(level) else "none"
        if os.path.lexists(join(path, "zstd_dict.ninja")):
            compression += " with dictionary"
        lines.append(f"compression: {compression}")
    lines.append(f"bytes on disk: {size}")
    return kind, lines


def _shape_chunks(store, chunk=1 << 16):
    """(first index, shapes) of every sample of a ragged store, a chunk at a time."""
    store._map_all()
    for start in range(0, len(store), chunk):
        yield start, store._layout.shapes(store, np.arange(start, min(start + chunk, len(store))))


def _verify(path):
    """Every invariant of the format; returns a list of problems (empty when sound). Never
    raises on damage: whatever a check meets is reported."""
    problems = []
    try:
        _check_store(os.fspath(path), problems)
    except (OSError, ValueError, TypeError, OverflowError, MemoryError, struct.error) as e:
        problems.append(str(e))
    except Exception as e:  # damage nobody foresaw: still a report, not a traceback
        problems.append(f"{path}: cannot be checked ({type(e).__name__}: {e})")
    return problems


def _index_column(store_dir, n, tail=()):
    """The first n entries of the int64 index store in store_dir, after checking its metadata
    and that its file holds them (so a damaged count allocates nothing)."""
    _check_index(store_dir, n, tail)
    return np.asarray(_read_int64(os.path.join(store_dir, "data.ninja"), n), np.int64)


def _check_store(path, problems, kind=None):
    join = os.path.join
    _check_directory(path)
    kind = kind or _read_kind(path)
    if kind == "numpy":
        dtype, shape, _ = _read_meta(path)
        need = math.prod(shape) * dtype.itemsize
        fd = _open_fd(join(path, "data.ninja"), "data")
        have = os.fstat(fd).st_size
        os.close(fd)
        if have < need or (not shape and have != need):
            problems.append(f"{path}/data.ninja holds {have} bytes, shape.ninja {shape} of {dtype} needs {need}")
        return
    n = _count(path)
    starts, ends = _index_column(join(path, "starts"), n), _index_column(join(path, "ends"), n)
    sizes = ends - starts
    if n and starts[0] != 0:
        problems.append(f"{path}: sample 0 starts at {starts[0]}, not at the data's start (0)")
    if (sizes < 0).any():
        problems.append(f"{path}: sample {int(np.argmax(sizes < 0))} ends before it starts")
    if n > 1 and (starts[1:] != ends[:-1]).any():
        problems.append(f"{path}: sample {int(np.argmax(starts[1:] != ends[:-1])) + 1} does not start "
                        f"where the previous one ends")
    end = int(ends.max()) if n else 0
    if kind == "string":
        _check_size(join(path, "data.ninja"), end, "strings data")
        compressed = os.path.lexists(join(path, "zstd_level.ninja"))
        if problems or (compressed and _zstd_module() is None):  # (without zstd: offsets only)
            return
        with StringsMmap(path) as store:
            for i in range(n):
                try:
                    store[i]
                except (UnicodeDecodeError, ValueError, MemoryError) as e:  # zstd errors are ValueErrors too
                    how = "decompressed or decoded" if compressed else "decoded"
                    problems.append(f"{path}: string {i} cannot be {how}: {e}")
                    break
        return
    dtype, data_shape, _ = _read_meta(path)
    if len(data_shape) != 1 or data_shape[0] < end:
        problems.append(f"{path}: offsets reach element {end} but the data holds {data_shape[0] if data_shape else 0} "
                        f"(shape.ninja is {data_shape})")
    _check_size(join(path, "data.ninja"), end * dtype.itemsize, "data")
    flattened = _index_column(join(path, "flattened_shapes"), n)
    if (flattened != sizes).any():
        problems.append(f"{path}: sample {int(np.argmax(flattened != sizes))}: flattened_shapes "
                        f"disagrees with ends - starts")
    shapes_dir = _shapes_dir(path)
    nested = os.path.isdir(join(shapes_dir, "starts"))
    flag = _read_bytes(join(path, "shapes_are_flat.ninja"), "flatness flag", 64)
    if flag != _I32.pack(0 if nested else 1):
        problems.append(f"{path}: shapes_are_flat.ninja says {flag!r} but shapes/ is "
                        f"{'ragged' if nested else 'flat'}"
                        + (": a writer was killed while converting shapes/ (this module reads the "
                           "store; the published package reads it by the flag); the next append "
                           "finishes the conversion" if nested else ""))
    if not nested:
        lengths = _index_column(shapes_dir, n, (1,))
        held = np.where(_scalar(flattened, lengths), 1, lengths)
        bad = (lengths < 0) | (held != flattened)
        if bad.any():
            problems.append(f"{path}: sample {int(np.argmax(bad))}: shapes/ records length "
                            f"{int(lengths[bad.argmax()])} for {int(flattened[bad.argmax()])} elements")
        return
    inner = []
    _check_store(shapes_dir, inner, "ragged")
    problems += inner
    if inner:
        return
    with RaggedMmap(shapes_dir) as shapes:
        if len(shapes) < n:
            problems.append(f"{shapes_dir} holds {len(shapes)} shapes for {n} samples")
            return
        for start in range(0, n, 1 << 16):
            for i, shape in enumerate(shapes[start:min(start + (1 << 16), n)], start):
                if shape.ndim != 1 or (shape < 0).any() or math.prod(shape.tolist()) != flattened[i]:
                    problems.append(f"{path}: sample {i}: shape {shape.tolist()} does not hold "
                                    f"{int(flattened[i])} elements")
                    return
                if not _makeable(shape.tolist(), dtype.itemsize):
                    problems.append(f"{path}: sample {i}: shape {_short(shape.tolist())} is one numpy "
                                    f"cannot make (over 64 axes, or nonzero ones of 2**63 bytes or more)")
                    return


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
            batch = _check_batch_size(args.batch_size)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # (numpy's, before the Overflow)
                    source = np.load(args.npy_file, mmap_mode="r")  # never loads the whole file
            except (ValueError, EOFError, OverflowError) as e:  # (Overflow: a header's huge shape)
                raise ValueError(f"{args.npy_file} is not a .npy file numpy can map: {e}") from e
            if not isinstance(source, np.ndarray):  # (an .npz archive: a mapping of arrays)
                source.close()
                raise ValueError(f"{args.npy_file} is not a .npy file but an archive of several "
                                 f"({type(source).__name__}); convert each array on its own")
            if source.ndim == 0:
                np_from_ndarray(args.out_dir, source)
            else:
                with _creating(args.out_dir) as build:
                    _write_meta(build, source.dtype, (0,) + source.shape[1:])
                    with _NumpyWriter(build) as writer:
                        for b in _progress(range(0, len(source), batch), desc="from-npy", verbose=True):
                            writer.extend(np.ascontiguousarray(source[b:b + batch]))
            print(f"wrote {args.out_dir}")
        else:
            with open(args.text_file, encoding="utf-8", newline="\n") as f:  # (a lone \r ends no line)
                try:
                    lines = (line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith("\n") else line
                             for line in f)
                    StringsMmap.from_generator(args.out_dir, lines,
                                               args.batch_size, verbose=True)
                except UnicodeDecodeError as e:
                    raise ValueError(f"{args.text_file} is not UTF-8 text ({e.reason}); nothing "
                                     f"was written: convert it first (e.g. iconv -t utf-8)") from e
            print(f"wrote {args.out_dir}")
    except (OSError, ValueError, TypeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


###################################################################################################
# Import shims: the published package's submodules and helpers, served from this one file
###################################################################################################
# The published package's own helpers, kept for its tests and for code that calls them. They
# read and write whole files, as there; this module's stores do not use them.

def _int_to_bytes(inp, fmt="<i"):
    return struct.pack(fmt, inp)


def _bytes_to_int(inp, fmt="<i"):
    return struct.unpack(fmt, inp)[0]


def _str_to_bytes(inp, encoding="utf-8"):
    return inp.encode(encoding)


def _bytes_to_str(inp, encoding="utf-8"):
    return bytes(inp).decode(encoding)


def _shape_to_bytes(shape, fmt="<Q"):
    return b"".join(struct.pack(fmt, int(a)) for a in shape)


def _bytes_to_shape(inp, step=8, fmt="<Q"):
    return tuple(struct.unpack(fmt, inp[i:i + step])[0] for i in range(0, len(inp) - 1, step))


def _to_file(encode):
    def to_file(inp, file, *args, **kwargs):
        with open(file, "wb") as f:
            f.write(encode(inp, *args, **kwargs))
    return to_file


def _from_file(decode):
    def from_file(file, *args, **kwargs):
        with open(file, "rb") as f:
            return decode(f.read(), *args, **kwargs)
    return from_file


def from_generator_base(out_dir, sample_generator, batch_size, batch_ctor, extend_fn=None, **kwargs):
    """The published package's generic converter: ``batch_ctor(out_dir, first_batch, **kwargs)``
    makes a store, then ``extend_fn(store, batch)`` (or ``store.extend(batch)``) adds each later
    batch; returns the store (None for an empty generator)."""
    samples = _progress(sample_generator, desc="samples", verbose=kwargs.pop("verbose", False))
    return _from_batches_base(out_dir, _batched(samples, _check_batch_size(batch_size)), batch_ctor, extend_fn, kwargs)


def from_indexable_base(out_dir, indexable, batch_size, batch_ctor, extend_fn=None, n_jobs=None,
                        verbose=False, **kwargs):
    """from_generator_base over indexable[0], indexable[1], ... (see RaggedMmap.from_indexable)."""
    batches = _indexable_batches(indexable, _check_batch_size(batch_size), n_jobs, out_dir)
    return _from_batches_base(out_dir, _progress(batches, desc="batches", verbose=verbose), batch_ctor,
                              extend_fn, kwargs)


def _from_batches_base(out_dir, batches, batch_ctor, extend_fn, kwargs):
    os.makedirs(out_dir, exist_ok=True)
    store = None
    for batch in batches:
        if store is None:
            store = batch_ctor(out_dir, batch, **kwargs)
        elif extend_fn is not None:
            extend_fn(store, batch)
        else:
            store.extend(batch)
    return store


class ParallelBatchCollector:
    """mmap_ninja.parallel's batch reader, for code that imports it: ``batches()`` yields
    lists of ``indexable[i]`` in order (threads when n_jobs > 1), up to len(indexable), or
    until IndexError or KeyError when it has no length."""

    def __init__(self, indexable, batch_size, n_jobs=None, verbose=False, **kwargs):
        self.indexable, self.batch_size, self.n_jobs, self.verbose = indexable, batch_size, n_jobs, verbose
        self._batches, self._ahead = None, None  # (for collect_batch and exhausted)

    def batches(self):
        batches = _indexable_batches(self.indexable, _check_batch_size(self.batch_size), self.n_jobs,
                                     "ParallelBatchCollector")
        return _progress(batches, desc="batches", verbose=self.verbose)

    # The published loop, `while not c.exhausted(): batch = c.collect_batch()`, over batches()
    def exhausted(self, results=()):
        """Whether every batch has been collected (reads the next batch ahead to tell)."""
        if self._batches is None:
            self._batches = self.batches()
        if self._ahead is None:
            self._ahead = next(self._batches, False)
        return self._ahead is False

    def collect_batch(self):
        """The next batch: a list of indexable[i], [] once exhausted."""
        batch = [] if self.exhausted() else self._ahead
        self._ahead = None if batch else False
        return batch


class _IndexableFunction:
    """make_indexable(func, length): func(i) as indexable[i], with a len() when length is given."""

    def __init__(self, func, length=None):
        self.wrapped, self.length = func, length

    def __getitem__(self, item):
        return self.wrapped(item)

    def __len__(self):
        if self.length is None:
            raise TypeError("this indexable has no length: it is read until IndexError")
        return self.length


def _register_shims():
    """Make ``import mmap_ninja.numpy`` and friends work. Keyed on __name__, so a vendored copy
    (``myproj._vendor.mmap_ninja``) registers its own names; safe to run twice (reload)."""
    this = sys.modules.get(__name__)
    shims = {
        "base": {"Wrapped": Wrapped, "from_generator_base": from_generator_base,
                 "from_indexable_base": from_indexable_base, "_int_to_bytes": _int_to_bytes,
                 "_bytes_to_int": _bytes_to_int, "_str_to_bytes": _str_to_bytes,
                 "_bytes_to_str": _bytes_to_str, "_shape_to_bytes": _shape_to_bytes,
                 "_bytes_to_shape": _bytes_to_shape, "ParallelBatchCollector": ParallelBatchCollector},
        "numpy": {"from_ndarray": np_from_ndarray, "from_generator": np_from_generator,
                  "open_existing": np_open_existing, "extend": np_extend,
                  "extend_dir": np_extend_dir, "append": np_append, "empty": np_empty,
                  "_empty": np_empty},
        "ragged": {"RaggedMmap": RaggedMmap},
        "string": {"StringsMmap": StringsMmap},
        "generic": {"open_existing": open_existing, "ShardedMmap": ShardedMmap, "RaggedMmap": RaggedMmap,
                    "StringsMmap": StringsMmap, "Wrapped": Wrapped},
        "parallel": {"ParallelBatchCollector": ParallelBatchCollector,
                     "make_indexable": _IndexableFunction},
    }
    for kind, encode, decode in (("int", _int_to_bytes, _bytes_to_int), ("str", _str_to_bytes, _bytes_to_str),
                                 ("shape", _shape_to_bytes, _bytes_to_shape)):
        shims["base"][f"_{kind}_to_file"], shims["base"][f"_file_to_{kind}"] = _to_file(encode), _from_file(decode)
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
