"""Checking a program.pt2 archive before torch.export.load reads it, so that loading runs no code.

torch.export.load is not safe on untrusted files: it unpickles the embedded sample inputs with
weights_only=False when the safe load fails, unpickles "pickled" weights and constants with
weights_only=False (and opaque constants with plain pickle.loads), hands shape expressions to
sympy.sympify (which evals its string), and exec()s the guard strings when the program becomes a
module. A fastner export holds none of those unsafe forms, so the archive is read once into
memory, checked here (check_program_archive), and only those very bytes go to torch.export.load:

- only the members `torch.export.save` writes for one program named "model" (raw tensor
  payloads, JSON configs, the graph JSON, the sample inputs, version markers);
- no weight or constant is stored as a pickle; the sample inputs load with weights_only=True
  (so torch's weights_only=False retry is never reached);
- every shape expression is a sympy srepr built from known constructors and literals, every
  guard is a comparison of input sizes and integers, every call target an aten, fastner or
  operator function.

Anything else is refused with UnsafeProgramError naming what was found.
"""
from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from typing import Iterator

from fastner.storage import UnsafeTorchFile, weights_only_load


class UnsafeProgramError(ValueError):
    """A program.pt2 that holds something a fastner export never writes (tampered or foreign)."""


_MODEL = "model"
_FIXED_MEMBERS = {
    "archive_format", "archive_version", ".data/version", "byteorder", ".data/serialization_id",
    f"models/{_MODEL}.json", f"data/sample_inputs/{_MODEL}.pt",
    f"data/weights/{_MODEL}_weights_config.json", f"data/constants/{_MODEL}_constants_config.json",
}
_PAYLOAD = re.compile(r"data/(weights/weight|constants/tensor)_\d+")
_SYMBOL_NAME = re.compile(r"[a-z]+\d+")
# sympy constructors a shape expression may call (srepr output), and torch's sympy functions
_SYMPY_CALLS = {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "LessThan", "GreaterThan", "StrictLessThan", "StrictGreaterThan", "Equality", "Unequality",
    "Eq", "Ne", "And", "Or", "Not",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
}
_SYMPY_NAMES = {"true", "false", "oo", "zoo", "nan", "S"}
_TARGET_PREFIXES = ("torch.ops.aten.", "torch.ops.fastner.", "_operator.")


def check_program_archive(data: bytes, name: str = "program.pt2") -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = {info.filename: info for info in archive.infolist()}
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise UnsafeProgramError(f"{name}: not a torch.export archive ({err})") from None
    roots = {member.split("/", 1)[0] for member in members}
    if len(roots) != 1 or not all("/" in member for member in members):
        raise UnsafeProgramError(f"{name}: not a torch.export archive (expected one top-level folder)")
    root = roots.pop() + "/"

    def read(member: str) -> bytes:
        try:
            return archive.read(root + member)
        except KeyError:
            raise UnsafeProgramError(f"{name}: {member} is missing") from None
        except (zipfile.BadZipFile, ValueError, OSError) as err:
            raise UnsafeProgramError(f"{name}: {member} cannot be read ({err})") from None

    for member in members:
        inner = member[len(root):]
        if inner and not member.endswith("/") and inner not in _FIXED_MEMBERS and not _PAYLOAD.fullmatch(inner):
            raise UnsafeProgramError(f"{name}: unexpected member {inner!r}: not written by `fastner export`")

    for kind in ("weights", "constants"):
        config = _json(read(f"data/{kind}/{_MODEL}_{kind}_config.json"), f"{name}: {kind} config")
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise UnsafeProgramError(f"{name}: the {kind} config is not an object of entries")
        for fqn, entry in entries.items():
            if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
                raise UnsafeProgramError(f"{name}: {kind} entry {fqn!r} is stored as a pickle; "
                                         "a fastner export stores raw tensors only")
            path_name = entry.get("path_name")
            prefix = "weight_" if kind == "weights" else "tensor_"
            if not (isinstance(path_name, str) and re.fullmatch(prefix + r"\d+", path_name)):
                raise UnsafeProgramError(f"{name}: {kind} entry {fqn!r} names payload {path_name!r}")

    sample_inputs = read(f"data/sample_inputs/{_MODEL}.pt")
    try:
        weights_only_load(sample_inputs)
    except UnsafeTorchFile as err:
        raise UnsafeProgramError(f"{name}: the embedded sample inputs are not plain tensors "
                                 f"(refused by the weights_only loader: {err})") from None

    program = _json(read(f"models/{_MODEL}.json"), f"{name}: models/{_MODEL}.json")
    if not isinstance(program, dict):
        raise UnsafeProgramError(f"{name}: models/{_MODEL}.json is not an object")
    for key in (program.get("range_constraints") or {}):
        if not _SYMBOL_NAME.fullmatch(str(key)):
            raise UnsafeProgramError(f"{name}: range constraint on {key!r} is not a shape symbol")
    for guard in program.get("guards_code") or []:
        if not isinstance(guard, str) or not _is_size_guard(guard):
            raise UnsafeProgramError(f"{name}: guard {guard!r} is not a comparison of input sizes")
    for key, value in _string_fields(program):
        if key == "expr_str" and not _is_sympy_srepr(value):
            raise UnsafeProgramError(f"{name}: shape expression {value!r} is not a plain sympy expression")
        if key == "target" and not value.startswith(_TARGET_PREFIXES):
            raise UnsafeProgramError(f"{name}: the graph calls {value!r}; a fastner export calls only "
                                     "aten, fastner and operator functions")


def _json(data: bytes, what: str):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnsafeProgramError(f"{what} is not valid JSON ({err})") from None


def _string_fields(node) -> Iterator["tuple[str, str]"]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if isinstance(value, str):
                    yield key, value
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _parse(text: str):
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError):
        return None


def _is_literal(node) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _is_literal(node.operand)
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool))


def _is_sympy_srepr(text: str) -> bool:
    """Calls of known sympy constructors on literals and on each other, e.g.
    Mul(Integer(6), Symbol('s2', positive=True, integer=True)); nothing sympify could run."""
    def ok(node) -> bool:
        if _is_literal(node):
            return True
        if isinstance(node, ast.Name):
            return node.id in _SYMPY_NAMES
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS:
            return all(ok(arg) for arg in node.args) and all(
                kw.arg is not None and _is_literal(kw.value) for kw in node.keywords)
        return False

    node = _parse(text)
    return node is not None and ok(node)


def _is_size_guard(text: str) -> bool:
    """Comparisons and integer arithmetic of L['input'].size()[i] and integers, e.g.
    L['lengths'].size()[0] == L['chars'].size()[0]; nothing else reaches the exec'd guard code."""
    def size(node) -> bool:  # L['name'].size()[i]
        return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
                and isinstance(node.slice.value, int) and isinstance(node.value, ast.Call)
                and not node.value.args and not node.value.keywords
                and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "size"
                and isinstance(node.value.func.value, ast.Subscript)
                and isinstance(node.value.func.value.value, ast.Name) and node.value.func.value.value.id == "L"
                and isinstance(node.value.func.value.slice, ast.Constant)
                and isinstance(node.value.func.value.slice.value, str))

    def term(node) -> bool:
        if isinstance(node, ast.Constant):
            return type(node.value) is int
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return term(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)):
            return term(node.left) and term(node.right)
        return size(node)

    def ok(node) -> bool:
        if isinstance(node, ast.BoolOp):
            return all(ok(value) for value in node.values)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ok(node.operand)
        return isinstance(node, ast.Compare) and term(node.left) and all(term(c) for c in node.comparators)

    node = _parse(text)
    return node is not None and ok(node)
