"""Detector checkpoints as data: a versioned, typed object-graph format, never pickle.

A checkpoint is read from the data dir (or a shared bucket), so whoever can write there
must not be able to make the detector run code. :func:`encode_checkpoint` walks an
object graph and writes every value as a tagged msgpack node; :func:`decode_checkpoint`
rebuilds it without calling any code of the blob's choosing:

- plain values: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``;
- containers: ``list``, ``tuple``, ``dict`` (any keys), ``set``, ``frozenset``,
  ``collections.deque`` (with its ``maxlen``);
- arrays: ``array.array`` (type code + bytes) and numpy arrays and scalars (dtype +
  shape + bytes; numeric, bool and datetime dtypes only, never ``object``);
- objects of an allowed class, restored by creating the bare instance
  (``object.__new__``: no ``__init__``, ``__setstate__`` or ``__reduce__``) and setting
  its ``__dict__`` and ``__slots__`` attributes: the classes of ``nettel.detect`` and
  ``nettel.models`` modules and River's plain-Python statistics (``river.stats``);
  msgspec Structs of those modules are built through their generated constructor;
- River's Rust statistics (``river._river_rust.stats.Rs*``, inside ``river.stats.EWMean``,
  ``Quantile``...): their constructor with numbers and their own typed byte state.

Anything else is refused, on writing and on reading, with :class:`CheckpointError`
naming what and where. Shared references and cycles come back as they were (an object
met twice is written once, then referred to), so e.g. two lists holding the same
objects still do after a restore; numpy views come back as copies (as with pickle).
Classes are checked, attribute types are not: a forged blob can only assemble allowed
objects from allowed parts.

The blob is ``MAGIC`` + one version byte + a msgpack body. An unknown version, a blob
that is not one (a pickle, say), or one whose content breaks these rules is refused
with :class:`CheckpointError`; a caller starts cold instead.

Examples
--------
>>> from collections import deque
>>> from nettel.detect.baseline import Band
>>> shared = [Band(1.0, 2.0, 3.0, "day")]
>>> state = {"a": shared, ("b", 1): shared, "q": deque([1, 2], maxlen=5)}
>>> back = decode_checkpoint(encode_checkpoint(state))
>>> back == state, back["a"] is back[("b", 1)], back["q"].maxlen
(True, True, 5)
>>> import pickle
>>> try:
...     decode_checkpoint(pickle.dumps(1, protocol=4))
... except CheckpointError as e:
...     print(e)
not a nettel checkpoint (it starts with b'\\x80\\x04K\\x01'): refused
"""

from __future__ import annotations

import array
import importlib
import re
import sys
from collections import deque
from typing import Any, Final, TypeVar

import msgspec
import numpy as np

from nettel.errors import NettelError

#: What every checkpoint starts with.
MAGIC: Final = b"NTCK"
#: The format written; :func:`decode_checkpoint` reads exactly these versions. Version 2:
#: a fleet's models are rows of one :class:`~nettel.detect.store.BaselineStore` (numpy
#: arrays); version 3: the store has a ``cycle`` column (the span of each row's slot
#: levels). An older blob is refused, and its partition starts cold and reads its log again.
VERSION: Final = 3
READABLE_VERSIONS: Final = frozenset({3})

#: Modules whose classes a checkpoint may hold (exact names, or prefixes ending in ".").
ALLOWED_MODULES: Final = ("nettel.detect.", "nettel.models", "river.stats.")
#: River's Rust statistics: restored by their constructor and their own byte state.
RIVER_RUST_MODULE: Final = "river._river_rust.stats"
#: ``array.array`` type codes and numpy dtype kinds a checkpoint may hold.
ARRAY_TYPECODES: Final = frozenset("bBhHiIlLqQfd")
NUMPY_KINDS: Final = frozenset("biufcmM")

_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_QUALNAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1

T = TypeVar("T")


class CheckpointError(NettelError, ValueError):
    """A checkpoint that cannot be written or must not be read; the message says why."""


def _allowed_module(module: str) -> bool:
    return (
        any(module.startswith(a) if a.endswith(".") else module == a for a in ALLOWED_MODULES)
        or module == RIVER_RUST_MODULE
    )


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _plain_new(cls: type) -> bool:
    """Whether instances of ``cls`` are made by ``object.__new__`` (no code of their own)."""
    new: object = cls.__new__
    return new is object.__new__


def _slots(cls: type) -> list[str]:
    """Every ``__slots__`` attribute of ``cls`` and its bases."""
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and name not in names:
                names.append(name)
    return names


class _Encoder:
    def __init__(self) -> None:
        self.refs: dict[int, int] = {}
        self.keep: list[Any] = []  # what the refs point at stays alive while encoding

    def ref(self, obj: Any) -> tuple[int, bool]:
        """(the object's reference number, whether it was met before)."""
        key = id(obj)
        if key in self.refs:
            return self.refs[key], True
        n = self.refs[key] = len(self.refs)
        self.keep.append(obj)
        return n, False

    def node(self, obj: Any, where: str) -> Any:
        kind = type(obj)
        if obj is None or kind in (bool, float, str, bytes):
            return obj
        if kind is int:
            return obj if _INT64_MIN <= obj <= _UINT64_MAX else ["i", str(obj)]
        if kind is tuple:
            return ["t", [self.node(v, f"{where}[{i}]") for i, v in enumerate(obj)]]
        if kind is frozenset:
            return ["f", [self.node(v, f"{where}{{}}") for v in obj]]
        if isinstance(obj, np.generic):
            return self.numpy_scalar(obj, where)
        n, seen = self.ref(obj)
        if seen:
            return ["r", n]
        if kind is list:
            return ["l", n, [self.node(v, f"{where}[{i}]") for i, v in enumerate(obj)]]
        if kind is dict:
            flat: list[Any] = []
            for k, v in obj.items():
                flat += [self.node(k, f"{where}.keys()"), self.node(v, f"{where}[{k!r}]")]
            return ["d", n, flat]
        if kind is set:
            return ["s", n, [self.node(v, f"{where}{{}}") for v in obj]]
        if kind is deque:
            return ["q", n, obj.maxlen, [self.node(v, f"{where}[{i}]") for i, v in enumerate(obj)]]
        if kind is array.array:
            if obj.typecode not in ARRAY_TYPECODES:
                raise CheckpointError(f"{where}: array type code {obj.typecode!r} is not allowed")
            return ["a", n, obj.typecode, obj.tobytes()]
        if kind is np.ndarray:
            dtype = self.numpy_dtype(obj.dtype, where)
            return ["n", n, dtype, list(obj.shape), np.ascontiguousarray(obj).tobytes()]
        name = _class_name(kind)
        if not _allowed_module(kind.__module__):
            raise CheckpointError(
                f"{where}: a {name} cannot be checkpointed (allowed: plain values, containers, "
                f"arrays and classes of {', '.join(ALLOWED_MODULES)})"
            )
        if kind.__module__ == RIVER_RUST_MODULE:
            return self.river_rust(obj, n, name, where)
        if isinstance(obj, msgspec.Struct):
            fields = {f: self.node(getattr(obj, f), f"{where}.{f}") for f in obj.__struct_fields__}
            return ["m", n, name, fields]
        if not _plain_new(kind):
            raise CheckpointError(f"{where}: {name} has its own __new__: not restorable as data")
        state: dict[str, Any] = {}
        for attr in _slots(kind):
            if hasattr(obj, attr):
                state[attr] = self.node(getattr(obj, attr), f"{where}.{attr}")
        for attr, v in getattr(obj, "__dict__", {}).items():
            state[attr] = self.node(v, f"{where}.{attr}")
        return ["o", n, name, state]

    @staticmethod
    def numpy_dtype(dtype: np.dtype[Any], where: str) -> str:
        if dtype.kind not in NUMPY_KINDS or dtype.hasobject or dtype.fields is not None:
            raise CheckpointError(f"{where}: numpy dtype {dtype} is not allowed")
        return str(dtype.str)

    def numpy_scalar(self, obj: np.generic, where: str) -> Any:
        return ["g", self.numpy_dtype(obj.dtype, where), obj.tobytes()]

    def river_rust(self, obj: Any, n: int, name: str, where: str) -> Any:
        reduced = obj.__reduce_ex__(2)
        args = reduced[1][1:] if len(reduced) > 1 and reduced[1] else ()
        state = reduced[2] if len(reduced) > 2 else None
        if not all(type(a) in (int, float, bool) for a in args) or type(state) is not bytes:
            raise CheckpointError(f"{where}: {name} does not reduce to numbers and bytes")
        return ["x", n, name, list(args), state]


def encode_checkpoint(obj: Any) -> bytes:
    """The checkpoint of ``obj``'s whole object graph (see the module docstring).

    Raises :class:`CheckpointError` naming the first value that may not be written.

    Examples
    --------
    >>> blob = encode_checkpoint({"n": 1})
    >>> blob[:4], blob[4]
    (b'NTCK', 3)
    >>> try:
    ...     encode_checkpoint({"f": len})
    ... except CheckpointError as e:
    ...     print(str(e)[:59])
    state['f']: a builtins:builtin_function_or_method cannot be
    """
    body = msgspec.msgpack.encode([sys.byteorder, _Encoder().node(obj, "state")])
    return MAGIC + bytes([VERSION]) + body


class _Decoder:
    def __init__(self) -> None:
        self.memo: list[Any] = []
        self.building = object()  # placeholder of an object whose parts are being read

    def new(self, n: Any, obj: Any) -> Any:
        if type(n) is not int or n != len(self.memo):
            raise CheckpointError(f"reference number {n!r} out of order")
        self.memo.append(obj)
        return obj

    def node(self, x: Any) -> Any:
        kind = type(x)
        if x is None or kind in (bool, int, float, str, bytes):
            return x
        if kind is not list or not x or type(x[0]) is not str:
            raise CheckpointError(f"unexpected value of type {kind.__name__}")
        tag, *rest = x
        if tag == "r":
            (n,) = rest
            if type(n) is not int or not 0 <= n < len(self.memo):
                raise CheckpointError(f"reference {n!r} to nothing")
            if self.memo[n] is self.building:
                raise CheckpointError(f"reference {n} to an object not yet built")
            return self.memo[n]
        if tag == "i":
            (digits,) = rest
            return int(_text(digits))
        if tag == "t":
            return tuple(self.node(v) for v in _items(rest[0]))
        if tag == "f":
            return frozenset(self.node(v) for v in _items(rest[0]))
        if tag == "g":
            dtype, data = rest
            return np.frombuffer(_bytes(data), dtype=_dtype(dtype))[0]
        if tag == "l":
            n, items = rest
            out: list[Any] = self.new(n, [])
            out.extend(self.node(v) for v in _items(items))
            return out
        if tag == "d":
            n, flat = rest
            d: dict[Any, Any] = self.new(n, {})
            pairs = _items(flat)
            if len(pairs) % 2:
                raise CheckpointError("a dict with an odd number of keys and values")
            for i in range(0, len(pairs), 2):
                d[self.node(pairs[i])] = self.node(pairs[i + 1])
            return d
        if tag == "s":
            n, items = rest
            s: set[Any] = self.new(n, set())
            s.update(self.node(v) for v in _items(items))
            return s
        if tag == "q":
            n, maxlen, items = rest
            if maxlen is not None and (type(maxlen) is not int or maxlen < 0):
                raise CheckpointError(f"deque maxlen {maxlen!r}")
            q: deque[Any] = self.new(n, deque(maxlen=maxlen))
            q.extend(self.node(v) for v in _items(items))
            return q
        if tag == "a":
            n, typecode, data = rest
            if typecode not in ARRAY_TYPECODES:
                raise CheckpointError(f"array type code {typecode!r} is not allowed")
            arr = array.array(typecode)
            arr.frombytes(_bytes(data))
            return self.new(n, arr)
        if tag == "n":
            n, dtype, shape, data = rest
            dims = _items(shape)
            if not all(type(d) is int and d >= 0 for d in dims):
                raise CheckpointError(f"array shape {shape!r}")
            flat_arr = np.frombuffer(_bytes(data), dtype=_dtype(dtype))
            return self.new(n, flat_arr.reshape(dims).copy())
        if tag == "o":
            return self.instance(*rest)
        if tag == "m":
            n, name, fields = rest
            cls = _resolve(name)
            if not issubclass(cls, msgspec.Struct):
                raise CheckpointError(f"{name} is not a msgspec Struct")
            self.new(n, self.building)
            values = {_attr(k): self.node(v) for k, v in _fields(fields).items()}
            self.memo[n] = cls(**values)
            return self.memo[n]
        if tag == "x":
            n, name, args, state = rest
            cls = _resolve(name)
            if cls.__module__ != RIVER_RUST_MODULE:
                raise CheckpointError(f"{name} is not one of River's Rust statistics")
            if not all(type(a) in (int, float, bool) for a in _items(args)):
                raise CheckpointError(f"{name}: constructor arguments must be numbers")
            obj = cls(*args)
            obj.__setstate__(_bytes(state))
            return self.new(n, obj)
        raise CheckpointError(f"unknown tag {tag!r}")

    def instance(self, n: Any, name: Any, state: Any) -> Any:
        cls = _resolve(name)
        if issubclass(cls, msgspec.Struct) or not _plain_new(cls):
            raise CheckpointError(f"{name} cannot be restored attribute by attribute")
        obj = self.new(n, object.__new__(cls))
        slots = set(_slots(cls))
        has_dict = hasattr(obj, "__dict__")
        for attr, v in _fields(state).items():
            value = self.node(v)
            if _attr(attr) in slots:
                object.__setattr__(obj, attr, value)
            elif has_dict:
                obj.__dict__[attr] = value
            else:
                raise CheckpointError(f"{name} has no attribute {attr!r}")
        return obj


def _items(x: Any) -> list[Any]:
    if type(x) is not list:
        raise CheckpointError(f"expected a list, found {type(x).__name__}")
    return x


def _fields(x: Any) -> dict[str, Any]:
    if type(x) is not dict:
        raise CheckpointError(f"expected attributes, found {type(x).__name__}")
    return x


def _text(x: Any) -> str:
    if type(x) is not str:
        raise CheckpointError(f"expected text, found {type(x).__name__}")
    return x


def _bytes(x: Any) -> bytes:
    if type(x) is not bytes:
        raise CheckpointError(f"expected bytes, found {type(x).__name__}")
    return x


def _attr(name: Any) -> str:
    if type(name) is not str or not name.isidentifier() or name.startswith("__"):
        raise CheckpointError(f"attribute name {name!r} is not allowed")
    return name


def _dtype(text: Any) -> np.dtype[Any]:
    if type(text) is not str or not re.fullmatch(r"[<>|=]?[a-zA-Z]\d*(\[\w+\])?", text):
        raise CheckpointError(f"numpy dtype {text!r} is not allowed")
    dtype = np.dtype(text)
    if dtype.kind not in NUMPY_KINDS or dtype.hasobject:
        raise CheckpointError(f"numpy dtype {text!r} is not allowed")
    return dtype


def _resolve(name: Any) -> type:
    """The allowed class named ``module:qualname``; anything else is refused."""
    module, _, qualname = _text(name).partition(":")
    if not (_MODULE_NAME.match(module) and _QUALNAME.match(qualname)) or not _allowed_module(
        module
    ):
        raise CheckpointError(f"class {name!r} is not allowed in a checkpoint")
    if module not in sys.modules:  # import only our own modules or River's statistics
        importlib.import_module("river.stats" if module.startswith("river.") else module)
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not (
        isinstance(found, type) and found.__module__ == module and found.__qualname__ == qualname
    ):
        raise CheckpointError(f"class {name!r} is not allowed in a checkpoint")
    return found


def decode_checkpoint(blob: bytes, expect: type[T] | None = None) -> Any:
    """The object graph of a checkpoint written by :func:`encode_checkpoint`.

    ``expect``: the type the root must have. Raises :class:`CheckpointError` (and
    runs nothing of the blob's choosing) for anything else.

    Examples
    --------
    >>> decode_checkpoint(encode_checkpoint([1.5, "a"]))
    [1.5, 'a']
    >>> for blob in (b"NTCK\\x09...", encode_checkpoint([1])):
    ...     try:
    ...         decode_checkpoint(blob, expect=dict)
    ...     except CheckpointError as e:
    ...         print(e)
    checkpoint format version 9 is not one this nettel reads (3)
    the checkpoint holds a list, not a dict
    """
    if blob[:4] != MAGIC or len(blob) < 5:
        raise CheckpointError(f"not a nettel checkpoint (it starts with {blob[:4]!r}): refused")
    version = blob[4]
    if version not in READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in sorted(READABLE_VERSIONS))
        raise CheckpointError(
            f"checkpoint format version {version} is not one this nettel reads ({readable})"
        )
    try:
        body = msgspec.msgpack.decode(blob[5:])
        if type(body) is not list or len(body) != 2:
            raise CheckpointError("malformed checkpoint: expected [byte order, state]")
        if body[0] != sys.byteorder:
            raise CheckpointError(f"checkpoint written on a {body[0]!r}-endian host: refused")
        root = _Decoder().node(body[1])
    except CheckpointError:
        raise
    except (msgspec.DecodeError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            ImportError, RecursionError) as e:  # fmt: skip
        raise CheckpointError(f"malformed checkpoint: {type(e).__name__}: {e}") from e
    if expect is not None and not isinstance(root, expect):
        raise CheckpointError(
            f"the checkpoint holds a {type(root).__name__}, not a {expect.__name__}"
        )
    return root
