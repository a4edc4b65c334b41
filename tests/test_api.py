"""The public surface: ``streamq.__all__`` is exactly what is exported, all documented."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.resources
import inspect
import itertools
import logging
import re
import tomllib
import types
from pathlib import Path

import streamq

PACKAGE = Path(streamq.__file__).parent
REPO = PACKAGE.parent

# The names issue #2 makes a contract; extra public names are welcome.
CONTRACT = {
    "AsyncConsumer",
    "AsyncPublisher",
    "ConsumerOptions",
    "PublisherOptions",
    "Message",
    "Result",
    "success",
    "fail",
    "discard",
    "Backoff",
    "StreamqError",
    "HandlerError",
    "HandlerPanic",
    "NetworkError",
    "RedisError",
}


def test_all_is_exactly_the_public_surface() -> None:
    # Public subpackages (streamq.testing, streamq.otel) appear as attributes once
    # imported; they are reached by their own import, not through __all__.
    public = {
        name
        for name, value in vars(streamq).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    exported = set(streamq.__all__)
    assert len(streamq.__all__) == len(exported), "duplicates in __all__"
    # Every public attribute is exported and every export is a public attribute
    # (``__version__`` is the one dunder in __all__).
    assert public == exported - {"__version__"}
    assert "__version__" in exported


def test_contract_names_exist() -> None:
    assert CONTRACT - set(streamq.__all__) == set()


def test_every_name_importable_with_from_import() -> None:
    namespace: dict[str, object] = {}
    exec(f"from streamq import {', '.join(streamq.__all__)}", namespace)
    for name in streamq.__all__:
        assert namespace[name] is getattr(streamq, name)


def test_no_private_module_leaks() -> None:
    for name in streamq.__all__:
        obj = getattr(streamq, name)
        assert not isinstance(obj, types.ModuleType), f"{name} is a module"
        module = getattr(obj, "__module__", None)
        if isinstance(obj, type | types.FunctionType):
            # Defined inside streamq, in a private module re-exported here.
            assert module is not None, name
            assert module.startswith("streamq._"), (name, module)
    # Every module of the package is private.
    for path in PACKAGE.glob("*.py"):
        assert path.name == "__init__.py" or path.name.startswith("_"), path.name


def _alias_docstrings() -> dict[str, str]:
    """Attribute docstrings (a string right after an assignment) of every private module."""
    docs: dict[str, str] = {}
    for path in PACKAGE.glob("_*.py"):
        body = ast.parse(path.read_text()).body
        for stmt, nxt in itertools.pairwise(body):
            target = None
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                target = stmt.target.id
            elif isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                target = stmt.targets[0].id
            if (
                target
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[target] = nxt.value.value
    return docs


def test_every_public_name_is_documented() -> None:
    alias_docs = _alias_docstrings()
    undocumented = []
    for name in streamq.__all__:
        if name == "__version__":
            continue
        obj = getattr(streamq, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = inspect.getdoc(obj)
            own = obj.__doc__
        else:
            # Type aliases carry an attribute docstring in their module's source.
            doc = own = alias_docs.get(name)
        if not doc or not own or not own.strip():
            undocumented.append(name)
    assert undocumented == []


def test_public_methods_are_documented() -> None:
    missing = []
    for name in streamq.__all__:
        obj = getattr(streamq, name)
        if not inspect.isclass(obj):
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_"):
                continue
            fn = member.fget if isinstance(member, property) else member
            if inspect.isfunction(fn) and not (fn.__doc__ or "").strip():
                missing.append(f"{name}.{attr}")
    assert missing == []


def test_errors_share_one_root() -> None:
    for name in streamq.__all__:
        obj = getattr(streamq, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert issubclass(obj, streamq.StreamqError), name
            # Never shadow the builtins (redis-py already does).
            assert name not in {"ConnectionError", "TimeoutError"}
    assert issubclass(streamq.HandlerPanic, streamq.HandlerError)


def test_py_typed_is_shipped() -> None:
    assert importlib.resources.files("streamq").joinpath("py.typed").is_file()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    # The wheel ships the whole package directory, py.typed included.
    assert config["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["streamq"]
    assert "Typing :: Typed" in config["project"]["classifiers"]


def test_version() -> None:
    assert isinstance(streamq.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([.\-+].*)?|\d+\.\d+\.\d+\w*", streamq.__version__)
    # The installed metadata and the package agree.
    assert importlib.metadata.version("streamq") == streamq.__version__


def test_library_logger_never_prints() -> None:
    handlers = logging.getLogger("streamq").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
