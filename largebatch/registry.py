"""Names in a config -> Python objects: built-in names, `module.path:attr` import paths, installed plug-ins.

The one resolution behind every open name of largebatch (`model.name`, `data.name`, `task`):

    module.path:attr.attr   any importable object (`import_path`)
    myname                  an object an installed package registers in an entry-point group (`entry_point`;
                            pyproject.toml: [project.entry-points."largebatch.models"] myname = "mypkg.mod:attr")

`check_name` and `check_import_path` check a name's syntax in config validation: they import no torch and no
user code (plug-ins are looked up among the installed entry points without being loaded). `import_path` and
`entry_point` import the object; each way that can fail is a one-line `ConfigError` naming the config field
(`what`), the name, and the module, attribute or plug-in that is not there. `accepted` picks the keyword
arguments a user's callable takes, so a callable may take only the ones it needs, or `**kwargs`.

This module imports no torch: config validation runs before torch is imported.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
from typing import Any, Callable, Sequence

from largebatch.config import ConfigError


def kind(obj: object) -> str:
    """'a value of type int', 'a value of type mypkg.Thing': what a wrong object is, for error messages."""
    t = type(obj)
    return f"a value of type {t.__qualname__ if t.__module__ == 'builtins' else f'{t.__module__}.{t.__qualname__}'}"


def _dotted(s: str) -> bool:
    return all(part.isidentifier() for part in s.split("."))


def _either(forms: Sequence[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return forms[0] if len(forms) == 1 else f"{', '.join(forms[:-1])} or {forms[-1]}"


def plugins(group: str) -> dict[str, list[importlib.metadata.EntryPoint]]:
    """Installed entry points of entry-point group `group` by name (not loaded)."""
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=group):
        found.setdefault(ep.name, []).append(ep)
    return found


def check_import_path(name: str, field: str) -> None:
    """Raise ConfigError unless `name` reads `module.path:attr` (dotted Python identifiers on both sides of one
    ':', no spaces). Syntax only: imports nothing."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{field} = {name!r} is invalid: {why}")

    if not isinstance(name, str) or name != "".join(name.split()):
        raise bad("must be module.path:callable without spaces")
    if name.count(":") != 1:
        raise bad("must hold exactly one ':'; write module.path:callable (the callable may be dotted: "
                  "module:Class.method)")
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise bad("needs text on both sides of ':': module.path:callable")
    if not (_dotted(module) and _dotted(attr)):
        raise bad("is not module.path:callable (dotted Python identifiers on both sides of ':')")


def check_name(name: str, field: str, *, builtin: Sequence[str], group: str, noun: str,
               libraries: Sequence[str] = ()) -> None:
    """Raise ConfigError unless `name` is a built-in name, `module.path:callable`, `<library>:<noun>` for one of
    `libraries`, or the name of a plug-in installed in entry-point group `group`. Syntax only (see the module
    docstring); the message names `field`, the value, the accepted forms and a close built-in or plug-in name."""
    colon = ["module.path:callable", *(f"{lib}:<{noun}>" for lib in libraries)]

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{field} = {name!r} is invalid: {why}")

    if not isinstance(name, str) or not name:
        raise bad(f"must be a built-in {noun} ({', '.join(builtin)}) or one of: "
                  f"{'; '.join(colon)}; the name of a plug-in registered in entry-point group {group}")
    if name != "".join(name.split()):
        raise bad("must not contain spaces")
    if name.count(":") > 1:
        raise bad("has more than one ':'; write module.path:callable (the callable may be dotted: module:Class.method)")
    module, sep, attr = name.partition(":")
    if sep:
        if not module or not attr:
            raise bad(f"needs text on both sides of ':': {_either(colon)}")
        if module not in libraries:
            check_import_path(name, field)
        return
    found = plugins(group)
    if name in builtin or name in found:
        return
    close = difflib.get_close_matches(name, [*builtin, *found], n=1)
    raise bad(f"is neither a built-in {noun} ({', '.join(builtin)}) nor an installed plug-in"
              + (f" ({', '.join(sorted(found))})" if found else "")
              + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; another {noun} is {_either([*colon, 'a plug-in name'])} (entry-point group {group})")


def import_path(name: str, what: str, *, path: str | None = None, purpose: str = "") -> Callable[..., Any]:
    """The callable at `path` (default `name`), a `module.path:attr.attr`, imported.

    `what` is the config field the name came from (`model.name`, `data.name`, `task`) and `purpose` ends the
    not-a-callable message (" that builds the model"). Every failure is a one-line ConfigError: a module that is
    not found or whose import raises ImportError, a missing attribute (with a close name and the module's public
    callables), an object that is not callable. Other exceptions raised while importing user code keep their
    traceback.
    """
    path = name if path is None else path
    check_import_path(path, what)
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        missing = getattr(e, "name", None)
        if isinstance(e, ModuleNotFoundError) and missing and (module_name + ".").startswith(missing + "."):
            raise ConfigError(f"{what} = {name!r}: module {module_name!r} not found ({e}); check its spelling and "
                              "that it is installed or on PYTHONPATH (the `largebatch` script does not add the current "
                              "directory to sys.path; `python -m largebatch` does)") from None
        raise ConfigError(f"{what} = {name!r}: importing module {module_name!r} failed: "
                          f"{type(e).__name__}: {e}") from None
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        owner, where = obj, ".".join([module_name, *attr.split(".")[:i]])
        if not hasattr(owner, part):
            raise ConfigError(f"{what} = {name!r}: {where!r} has no attribute {part!r}"
                              f"{_callables_hint(owner, part)}") from None
        obj = getattr(owner, part)
    if not callable(obj):
        raise ConfigError(f"{what} = {name!r}: {path} is {kind(obj)}, not a callable{purpose}")
    return obj


def _callables_hint(owner: object, missing: str) -> str:
    """'; did you mean X? (its public callables: a, b, c)' -- public callables of `owner`, its own ones first."""
    home = getattr(owner, "__name__", None)
    public = [k for k in dir(owner) if not k.startswith("_") and callable(getattr(owner, k, None))]
    own = [k for k in public if getattr(getattr(owner, k), "__module__", None) == home] or public
    close = difflib.get_close_matches(missing, public, n=1)
    shown = ", ".join(own[:8]) + (", ..." if len(own) > 8 else "")
    return (f"; did you mean {close[0]!r}?" if close else "") + (f" (its public callables: {shown})" if shown
                                                                 else " (it has no public callables)")


def entry_point(name: str, group: str, what: str, *, purpose: str = "") -> Callable[..., Any]:
    """The callable the installed plug-in `name` of entry-point group `group` registers, loaded; one-line
    ConfigError if none or several packages register it, it fails to load, or it is not callable."""
    found = plugins(group).get(name, [])
    values = sorted({ep.value for ep in found})
    if not values:
        raise ConfigError(f"{what} = {name!r}: no installed package registers a plug-in of that name in entry-point "
                          f"group {group}; install it, or give the import path module.path:callable")
    if len(values) > 1:
        raise ConfigError(f"{what} = {name!r}: several installed packages register it in entry-point group "
                          f"{group} ({', '.join(values)}); give the import path instead")
    ep = found[0]
    try:
        obj = ep.load()
    except (ImportError, AttributeError) as e:
        dist = f" of package {ep.dist.name}" if getattr(ep, "dist", None) else ""
        raise ConfigError(f"{what} = {name!r}: plug-in {name} = {ep.value}{dist} (entry-point group {group}) "
                          f"failed to load: {type(e).__name__}: {e}") from None
    if not callable(obj):
        raise ConfigError(f"{what} = {name!r}: plug-in {name} = {ep.value} is {kind(obj)}, not a callable{purpose}")
    return obj


def accepted(name: str, what: str, fn: Callable[..., Any], offered: dict[str, Any],
             role: str = "the factory") -> dict[str, Any]:
    """The keywords of `offered` that `fn`'s signature takes (all of them if it takes `**kwargs`, or has no
    signature to read); one-line ConfigError if it requires an argument outside `offered`."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin or C callable): offer everything
        return dict(offered)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               and (p.name not in offered or p.kind is p.POSITIONAL_ONLY)]
    if missing:
        raise ConfigError(f"{what} = {name!r}: {role} requires {', '.join(missing)}, which the trainer does "
                          f"not pass (it passes the keywords {', '.join(offered)}): give "
                          f"{'it a default' if len(missing) == 1 else 'them defaults'} or take **kwargs")
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(offered)
    return {k: v for k, v in offered.items() if k in named}
