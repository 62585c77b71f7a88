"""A user's own model or data named on the command line: ``module.path:factory`` or ``file.py:factory``.

``torchvision:NAME`` and ``timm:NAME`` build those libraries' models when they are installed (never
required). Runs record the spec, so ``eval``, ``export``, ``report`` and ``--resume`` rebuild the model
without being told again.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import MixbitsError

LIBRARIES = ("torchvision", "timm")


def is_spec(name) -> bool:
    """True for ``module:factory`` or ``file.py:factory`` (a registered name has no colon)."""
    return isinstance(name, str) and ":" in name


def spec_problems(spec: str, what: str, where: str) -> list[str]:
    """``["model.name: ..."]`` when ``spec`` cannot be loaded, else [] (for whole-config validation)."""
    try:
        load_factory(spec, what)
    except MixbitsError as e:
        return [f"{where}: {e}"]
    return []


def load_factory(spec: str, what: str) -> Callable:
    """The callable ``spec`` names; ``what`` ("model", "data") words the errors."""
    source, _, attr = spec.rpartition(":")
    if not source or not attr:
        raise MixbitsError(f"{what} {spec!r} is not understood; expected module.path:factory or file.py:factory")
    if source in LIBRARIES:
        return _library_factory(source, attr, spec)
    module = _load_file(source, spec, what) if source.endswith(".py") else _import(source, spec, what)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise MixbitsError(f"{what} {spec!r}: {source} has no callable {attr!r}; name a function or class it defines")
    return factory


def call_with_accepted(factory: Callable, offered: dict, given: dict, spec: str = "", what: str = "factory"):
    """``factory(**given, **the offered arguments its signature accepts)``; check ``given`` first with
    :func:`mixbits.models.option_problems`. An exception the user's factory raises becomes one MixbitsError
    naming ``spec`` (a factory's bug is the user's to fix, and a traceback into mixbits hides where it is)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C extension: pass what was given only
        params, extra = None, {}
    if params is not None:
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        extra = {k: v for k, v in offered.items() if k not in given and (takes_any or k in params)}
    try:
        return factory(**extra, **given)
    except MixbitsError:
        raise
    except Exception as e:
        raise MixbitsError(f"{what} {spec!r} raised {type(e).__name__}: {_first_line(e)}; fix the factory (call it "
                           "alone in Python to see the whole traceback)") from e


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "(no message)")[:300]


def _import(source: str, spec: str, what: str):
    try:
        return importlib.import_module(source)
    except ImportError as e:
        raise MixbitsError(f"{what} {spec!r}: cannot import {source!r} ({e}); check the module path and that its "
                           "package is installed or on PYTHONPATH") from None


def _load_file(source: str, spec: str, what: str):
    path = Path(source).expanduser().resolve()
    if not path.is_file():
        raise MixbitsError(f"{what} {spec!r}: file {source!r} does not exist")
    name = f"mixbits_user_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise MixbitsError(f"{what} {spec!r}: running {source} failed: {type(e).__name__}: {e}") from None
    return module


def _library_factory(library: str, name: str, spec: str) -> Callable:
    try:
        module = importlib.import_module(library)
    except ImportError:
        raise MixbitsError(f"model {spec!r} needs {library}, which is not installed; install it, or name a model "
                           "of your own as module.path:factory") from None
    if library == "timm":
        return lambda num_classes=1000, in_chans=3, **kw: module.create_model(name, num_classes=num_classes,
                                                                              in_chans=in_chans, **kw)
    importlib.import_module("torchvision.models")

    def torchvision_model(num_classes: int = 1000, in_chans: int = 3, **kw):
        if in_chans != 3:
            raise MixbitsError(f"model {spec!r}: torchvision models take 3-channel images, the data has {in_chans}; "
                               "use a timm model (in_chans) or a factory of your own")
        return module.models.get_model(name, num_classes=num_classes, **kw)

    return torchvision_model
