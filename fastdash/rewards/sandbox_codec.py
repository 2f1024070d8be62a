"""The code sandbox's value codec: JSON with tagged containers, exact builtin types only.

``encode`` turns a value into JSON-able data (``other(x, depth)`` handles anything else);
``decode`` rebuilds it as fresh objects of the decoder's own builtin types, so nothing of the
sender's objects (their ``__eq__``, their class) survives the trip. Shared by both sides of the
harness (``harness.py``) and exec'd with it inside the sandbox, so it uses only the stdlib.
"""

import math
import sys

MAX_DEPTH = 100  # nesting of a transferred value
MAX_ITEMS = 1_000_000  # elements of a materialised iterator



def encode(x, other, depth=0):
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return x if -(1 << 62) < x < (1 << 62) else ["i", hex(x)]
    if t is float:
        return x if math.isfinite(x) else ["f", repr(x)]
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply to transfer")
    d = depth + 1
    if t in _SEQ_TAGS:
        if x and _plain_scalars(x):  # fast path: the elements go as raw JSON
            return [_SEQ_TAGS[t].upper(), list(x)]
        return [_SEQ_TAGS[t], [encode(v, other, d) for v in x]]
    if t is dict:
        return ["d", [[encode(k, other, d), encode(v, other, d)] for k, v in x.items()]]
    if t is bytes or t is bytearray:
        return ["b" if t is bytes else "ba", x.hex()]
    if t is complex:
        return ["c", encode(x.real, other, d), encode(x.imag, other, d)]
    if t is range:
        return ["r", x.start, x.stop, x.step]
    if x is Ellipsis:
        return ["E"]
    return other(x, d)


_SEQ_TAGS = {list: "l", tuple: "t", set: "s", frozenset: "fs"}
_SEQ_TYPES = {v: k for k, v in _SEQ_TAGS.items()}
_RAW_TYPES = {v.upper(): k for k, v in _SEQ_TAGS.items()}
_SCALARS = {type(None), bool, int, float, str}


def _plain_scalars(x):
    """Every element a JSON scalar that round-trips exactly (checked at C speed, mostly)."""
    kinds = set(map(type, x))
    if not kinds <= _SCALARS:
        return False
    if int in kinds:
        ints = x if len(kinds) == 1 else [v for v in x if type(v) is int]
        if not (-(1 << 62) < min(ints) and max(ints) < (1 << 62)):
            return False
    if float in kinds:
        return all(map(math.isfinite, x if len(kinds) == 1 else [v for v in x if type(v) is float]))
    return True
_FLOATS = {"nan", "inf", "-inf"}
_FACTORIES = {"int": int, "float": float, "str": str, "list": list, "set": set, "dict": dict,
              "tuple": tuple, "None": None}


def decode(j, ref, depth=0):
    t = type(j)
    if j is None or t is bool or t is int or t is float or t is str:
        return j
    if t is not list or not j or type(j[0]) is not str or depth > MAX_DEPTH:
        raise ValueError("malformed value from the sandbox")
    tag, d = j[0], depth + 1
    if tag in _SEQ_TYPES:
        return _SEQ_TYPES[tag](decode(v, ref, d) for v in j[1])
    if tag in _RAW_TYPES and type(j[1]) is list:  # raw JSON: plain builtin values whatever it holds
        return _RAW_TYPES[tag](j[1])
    if tag == "d":
        return {decode(k, ref, d): decode(v, ref, d) for k, v in j[1]}
    if tag == "i" and type(j[1]) is str and len(j[1]) < 1_000_000:
        return int(j[1], 16)
    if tag == "f" and j[1] in _FLOATS:
        return float(j[1])
    if tag in ("b", "ba") and type(j[1]) is str:
        return (bytes if tag == "b" else bytearray).fromhex(j[1])
    if tag == "c":
        re_, im = decode(j[1], ref, d), decode(j[2], ref, d)
        if type(re_) is float and type(im) is float:
            return complex(re_, im)
    if tag == "r" and all(type(v) is int for v in j[1:4]) and len(j) == 4:
        return range(j[1], j[2], j[3])
    if tag == "E":
        return Ellipsis
    if tag == "it":
        return iter(decode(j[1], ref, d))
    if tag == "std":
        return _decode_std(j[1], decode(j[2], ref, d))
    return ref(j)


def _decode_std(name, v):
    import collections
    import decimal
    import fractions

    if name == "Counter":
        return collections.Counter(dict(v))
    if name == "OrderedDict":
        return collections.OrderedDict(v)
    if name == "defaultdict":
        return collections.defaultdict(_FACTORIES[v[0]], v[1])
    if name == "deque":
        return collections.deque(v[0], v[1])
    if name == "Decimal" and type(v) is str:
        return decimal.Decimal(v)
    if name == "Fraction":
        return fractions.Fraction(int(v[0]), int(v[1]))
    if name == "keys":
        return dict.fromkeys(v).keys()
    if name == "items":
        return dict(v).items()
    if name == "values":
        return list(v)
    if name == "ndarray":
        import numpy

        return numpy.array(v[1], dtype=numpy.dtype(str(v[0])))
    raise ValueError("unknown value kind from the sandbox: %r" % (name,))


def encode_more(x, other, d):
    """Values beyond the builtin containers that an honest solution returns (a Counter, a
    generator, a namedtuple, a numpy scalar), as data; ``None`` when ``x`` is none of them."""
    t = type(x)
    std = lambda name, payload: ["std", name, encode(payload, other, d)]  # noqa: E731
    # a module not imported yet has no instances: no import (and its start-up cost) needed
    coll, dec, frac = (sys.modules.get(m) for m in ("collections", "decimal", "fractions"))
    if coll and (t is coll.Counter or t is coll.OrderedDict):
        return std(t.__name__, dict(x))
    if coll and t is coll.defaultdict:
        f = getattr(x.default_factory, "__name__", "None")
        return std("defaultdict", [f if f in _FACTORIES else "None", dict(x)])
    if coll and t is coll.deque:
        return std("deque", [list(x), x.maxlen])
    if dec and t is dec.Decimal:
        return std("Decimal", str(x))
    if frac and t is frac.Fraction:
        return std("Fraction", [x.numerator, x.denominator])
    if t in _VIEWS:
        return std(_VIEWS[t], list(x))
    if getattr(t, "__module__", "") == "numpy":
        if t.__name__ == "ndarray":
            return std("ndarray", [str(x.dtype), x.tolist()])
        if hasattr(x, "item"):
            return encode(x.item(), other, d)
    if hasattr(t, "__next__") and hasattr(t, "__iter__"):  # generator, map, zip, ...
        items = []
        for v in x:
            if len(items) >= MAX_ITEMS:
                raise ValueError("iterator too long to transfer")
            items.append(v)
        return ["it", encode(items, other, d)]
    for base in (int, float, str, bytes, tuple, list, dict, set, frozenset, complex):
        if isinstance(x, base):  # a subclass (namedtuple, IntEnum): keep only the value
            return encode(_strip(base, x), other, d)
    return None


_VIEWS = {type({}.keys()): "keys", type({}.items()): "items", type({}.values()): "values"}


def _strip(base, x):
    if base in (int, float, str, complex, bytes):
        return getattr(base, "__%s__" % base.__name__)(x)  # int.__int__(x): an exact int
    return base(x)
