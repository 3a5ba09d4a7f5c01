"""One registry type for every kind of building block, and the config round trip.

mixres keeps one :class:`Registry` per kind: ``fusion``, ``projector``, ``pathway`` and
``encoder``. An entry is either a class (an ``nn.Module`` subclass of :class:`Configurable`)
or a *preset*: a named, JSON-serialisable config that points at a class of the same kind with
some arguments filled in (timm's pretrained cfgs, open_clip's model JSONs).

Every module built from a registered class exposes ``.config``, a plain dict::

    {"kind": "fusion", "name": "mr_adapter", "low_dim": 1024, "high_dim": 1536, ...}

whose keys (besides ``kind`` and ``name``) are the constructor's arguments, so
``build(m.config)`` gives back the same architecture.

Third-party packages add entries through the entry-point group ``mixres.plugins``: each entry
point names a module (imported for its ``@register_*`` decorators) or a callable taking no
arguments (called). Plugins load lazily, on the first look-up in any registry.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from .errors import ConfigError, MixresError, UnknownNameError

__all__ = [
    "Configurable",
    "Registry",
    "build",
    "build_if_config",
    "load_plugins",
    "PLUGIN_GROUP",
    "REGISTRIES",
    "FUSIONS",
    "PROJECTORS",
    "PATHWAYS",
    "ENCODERS",
    "register_fusion",
    "register_fusion_preset",
    "create_fusion",
    "list_fusions",
    "register_projector",
    "register_projector_preset",
    "create_projector",
    "list_projectors",
    "register_pathway",
    "register_pathway_preset",
    "create_pathway",
    "list_pathways",
    "register_encoder",
    "register_encoder_preset",
    "list_encoders",
]

PLUGIN_GROUP = "mixres.plugins"
# arguments that place a module, never part of its architecture
_NON_CONFIG_ARGS = frozenset({"device", "dtype"})

T = TypeVar("T")


def _to_config_value(value: Any, where: str) -> Any:
    """Turn an init argument into plain JSON data (modules become their config)."""
    if isinstance(value, Configurable):
        return value.config
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_to_config_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _to_config_value(v, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(
        f"argument {where!r} holds a {type(value).__name__}, which has no JSON form; "
        "pass plain data (numbers, strings, lists, dicts) or a mixres module instead"
    )


class Configurable:
    """Mixin that records a module's constructor arguments so it can return its config.

    Subclasses need nothing but a normal ``__init__``: the arguments of the most-derived
    constructor are captured (defaults applied, ``device``/``dtype`` left out) and
    :attr:`config` returns them with the registry ``kind`` and ``name``.
    """

    registry_kind: str | None = None
    registry_name: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        original = cls.__dict__["__init__"]
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kw: Any) -> None:
            original(self, *args, **kw)
            if type(self).__init__ is __init__:  # only the most-derived constructor records
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                captured = dict(list(bound.arguments.items())[1:])
                for name, param in signature.parameters.items():
                    if param.kind is inspect.Parameter.VAR_KEYWORD:
                        captured.update(captured.pop(name, {}))
                    elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                        captured.pop(name, None)
                object.__setattr__(
                    self,
                    "_config_args",
                    {k: v for k, v in captured.items() if k not in _NON_CONFIG_ARGS},
                )

        cls.__init__ = __init__  # type: ignore[method-assign]

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable dict: ``kind``, ``name`` and the constructor arguments."""
        if self.registry_name is None or self.registry_kind is None:
            raise ConfigError(
                f"{type(self).__name__} is not registered, so it has no config; "
                "decorate it with @register_fusion / @register_projector / ..."
            )
        args = getattr(self, "_config_args", {})
        body = {k: _to_config_value(v, k) for k, v in args.items()}
        return {"kind": self.registry_kind, "name": self.registry_name, **body}


class Registry:
    """Named entries of one kind: classes and presets (named configs).

    Args:
        kind: the kind this registry holds, e.g. ``"fusion"``; it is the ``kind`` of configs.

    Example:
        >>> reg = Registry("widget")
        >>> @reg.register("plain")
        ... class Plain(Configurable, torch.nn.Module):
        ...     def __init__(self, width: int = 4):
        ...         super().__init__()
        >>> reg.list()
        ['plain']
        >>> reg.create("plain", width=8).config
        {'kind': 'widget', 'name': 'plain', 'width': 8}
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type] = {}
        self._presets: dict[str, dict[str, Any]] = {}
        REGISTRIES[kind] = self

    # -- registration -------------------------------------------------------------------
    def register(self, name: str | None = None, *, override: bool = False) -> Callable[[T], T]:
        """Class decorator: register ``cls`` under ``name`` (default: the class name).

        Raises:
            MixresError: ``name`` is taken and ``override`` is False.
            TypeError: the decorated object is not a :class:`Configurable` class.
        """

        def decorator(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, Configurable)):
                raise TypeError(
                    f"register_{self.kind} decorates a class deriving from mixres.Configurable "
                    f"and torch.nn.Module, but got {cls!r}"
                )
            key = name or cls.__name__
            self._check_free(key, override)
            if "registry_name" in cls.__dict__ and cls.__dict__["registry_name"] != key:
                raise MixresError(
                    f"class {cls.__name__} is already registered as {cls.registry_name!r}; "
                    f"register a preset (register_{self.kind}_preset) to give it a second name"
                )
            cls.registry_kind = self.kind
            cls.registry_name = key
            self._presets.pop(key, None)
            self._classes[key] = cls
            return cls

        return decorator

    def register_preset(
        self, name: str, config: Mapping[str, Any], *, override: bool = False
    ) -> None:
        """Register a named config: ``config["name"]`` is a class (or preset) of this kind.

        Raises:
            ConfigError: the config is not JSON data or has no ``name``.
            MixresError: ``name`` is taken and ``override`` is False.
        """
        if not isinstance(config, Mapping) or "name" not in config:
            raise ConfigError(f"a preset config needs a 'name' key, but got {config!r}")
        data = dict(config)
        if data.setdefault("kind", self.kind) != self.kind:
            raise ConfigError(
                f"preset {name!r} for registry {self.kind!r} has kind {data['kind']!r}"
            )
        try:
            json.dumps(data)
        except TypeError as err:
            raise ConfigError(f"preset {name!r} is not JSON-serialisable: {err}") from None
        self._check_free(name, override)
        self._classes.pop(name, None)
        self._presets[name] = data

    def _check_free(self, name: str, override: bool) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} name has to be a non-empty str, but got {name!r}")
        if not override and (name in self._classes or name in self._presets):
            raise MixresError(
                f"{self.kind} {name!r} is already registered; pass override=True to replace it"
            )

    # -- look-up ------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every registered name (classes and presets), sorted; loads plugins on first use."""
        load_plugins()
        return sorted([*self._classes, *self._presets])

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching the fnmatch ``pattern`` (e.g. ``"mr*"``)."""
        return [n for n in self.names() if fnmatch.fnmatchcase(n, pattern)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def is_preset(self, name: str) -> bool:
        """Whether ``name`` is a preset (a named config) rather than a class."""
        self._missing(name)
        return name in self._presets

    def get_class(self, name: str) -> type:
        """The class registered as ``name``, following presets to their class."""
        return self._classes[self.resolve(name)["name"]]

    def resolve(self, name: str, **overrides: Any) -> dict[str, Any]:
        """The full config for ``name``: presets are followed, ``overrides`` merged last.

        ``None`` is a value like any other (``final_fusion=None``: no final fusion), unlike timm's
        factories, which drop it: a caller who passes it means it.

        Raises:
            UnknownNameError: ``name`` (or a name a preset points at) is not registered.
            ConfigError: presets that point at each other in a cycle (the cycle is named).
        """
        return self._resolve(name, overrides, ())

    def _resolve(self, name: str, overrides: Mapping[str, Any], chain: tuple[str, ...]) -> dict[str, Any]:
        self._missing(name)
        if name in chain:
            raise ConfigError(
                f"{self.kind} presets form a cycle: {' -> '.join([*chain, name])}; "
                "a preset's 'name' has to lead to a registered class"
            )
        kept = dict(overrides)
        if name in self._classes:
            return {"kind": self.kind, "name": name, **kept}
        preset = dict(self._presets[name])
        inner = self._resolve(preset.pop("name"), {k: v for k, v in preset.items() if k != "kind"}, (*chain, name))
        return {**inner, **kept}

    def get_preset(self, name: str) -> dict[str, Any]:
        """A copy of the preset config ``name`` (not followed)."""
        self._missing(name)
        if name not in self._presets:
            raise MixresError(f"{self.kind} {name!r} is a class, not a preset")
        return json.loads(json.dumps(self._presets[name]))

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build the entry ``name``; ``kwargs`` override the preset's arguments."""
        return build(self.resolve(name, **kwargs))

    def _missing(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"a {self.kind} name has to be a str, but got {name!r}")
        names = self.names()
        if name in names:
            return
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}{hint} (list them with mixres.list_{self.kind}s())"
        )


REGISTRIES: dict[str, Registry] = {}


def build(config: Mapping[str, Any]) -> Any:
    """Build a module from its config (the dict that ``module.config`` returns).

    Args:
        config: ``{"kind": ..., "name": ..., **constructor_args}``; ``name`` may be a preset,
            in which case the remaining keys override the preset's arguments.

    Returns:
        The module, with random initialisation; load the original's ``state_dict`` into it to
        get the same weights.

    Raises:
        TypeError: ``config`` is not a mapping.
        ConfigError: no ``kind``/``name``, an unknown kind, or keys the constructor does not take.
        UnknownNameError: no entry of that name.

    Example:
        >>> import mixres
        >>> m = mixres.create_fusion("mr_adapter", low_dim=8, high_dim=16)
        >>> mixres.build(m.config).config == m.config
        True
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"a config has to be a dict, but got {type(config).__name__}: {config!r}")
    missing = [k for k in ("kind", "name") if k not in config]
    if missing:
        raise ConfigError(f"config is missing {missing}; it needs 'kind' and 'name', got keys {sorted(config)}")
    kind = config["kind"]
    load_plugins()
    if kind not in REGISTRIES:
        raise ConfigError(f"config kind {kind!r} is unknown; expected one of {sorted(REGISTRIES)}")
    registry = REGISTRIES[kind]
    args = {k: v for k, v in config.items() if k not in ("kind", "name")}
    if kind == "pathway":
        args = _migrate_weight_args(args, config["name"])
    resolved = registry.resolve(config["name"], **args)
    cls = registry._classes[resolved.pop("name")]
    resolved.pop("kind")
    _check_args(cls, resolved)
    return cls(**resolved)


#: pathway arguments of mixres <= 0.1.0 that are now ``weights`` (configs saved then still load)
_LEGACY_WEIGHT_ARGS = ("model_name_or_path", "checkpoint_path")


def _migrate_weight_args(args: dict[str, Any], name: str) -> dict[str, Any]:
    old = [k for k in _LEGACY_WEIGHT_ARGS if k in args]
    if not old:
        return args
    if len(old) > 1 or "weights" in args:
        raise ConfigError(f"pathway {name!r} config has {old + (['weights'] if 'weights' in args else [])}; "
                          "they all name its weights: keep only 'weights'")
    import warnings

    warnings.warn(f"pathway {name!r}: the config key {old[0]!r} is now 'weights' (renamed on load)", FutureWarning, stacklevel=3)
    args = dict(args)
    args["weights"] = args.pop(old[0])
    return args


def _check_args(cls: type, args: Mapping[str, Any]) -> None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n in params if n != "self"]
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{cls.registry_kind} {cls.registry_name!r} takes no argument(s) {unknown}; "
            f"its arguments are {allowed}"
        )
    required = [
        n for n, p in params.items()
        if n != "self" and p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    absent = [n for n in required if n not in args]
    if absent:
        raise ConfigError(
            f"{cls.registry_kind} {cls.registry_name!r} needs argument(s) {absent}; got {sorted(args)}"
        )


def build_if_config(value: Any, kind: str, where: str) -> Any:
    """Return ``value`` if it is a module; build it if it is a config dict or a registered name.

    Used by composite modules (encoders) whose arguments may be modules or configs.
    """
    if isinstance(value, str):
        return REGISTRIES[kind].create(value)
    if isinstance(value, Mapping):
        cfg = dict(value)
        cfg.setdefault("kind", kind)
        if cfg["kind"] != kind:
            raise ConfigError(f"{where} has to be a {kind} config, but got kind {cfg['kind']!r}")
        return build(cfg)
    if isinstance(value, Configurable) and value.registry_kind == kind:
        return value
    raise TypeError(
        f"{where} has to be a registered {kind} module, a {kind} config dict or a {kind} name, "
        f"but got {type(value).__name__}"
    )


_plugins_state = {"loaded": False}


def load_plugins(force: bool = False) -> list[str]:
    """Load the entry points of the group ``mixres.plugins`` (once; ``force`` reloads).

    Returns:
        The names of the entry points that loaded. A plugin that fails to import is skipped
        with a warning that names it, so one broken package does not break mixres.
    """
    if _plugins_state["loaded"] and not force:
        return []
    _plugins_state["loaded"] = True
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
            loaded.append(ep.name)
        except Exception as err:  # a broken plugin must not break the library
            warnings.warn(f"mixres plugin {ep.name!r} ({ep.value}) failed to load: {err!r}", stacklevel=2)
    return loaded


FUSIONS = Registry("fusion")
PROJECTORS = Registry("projector")
PATHWAYS = Registry("pathway")
ENCODERS = Registry("encoder")


def _family(registry: Registry) -> tuple[Callable, Callable, Callable, Callable]:
    kind = registry.kind

    def register(name: str | None = None, *, override: bool = False) -> Callable[[T], T]:
        return registry.register(name, override=override)

    def register_preset(name: str, config: Mapping[str, Any], *, override: bool = False) -> None:
        registry.register_preset(name, config, override=override)

    def create(name: str, **kwargs: Any) -> Any:
        return registry.create(name, **kwargs)

    def list_(pattern: str = "*") -> list[str]:
        return registry.list(pattern)

    register.__doc__ = (
        f"Class decorator registering a {kind} under ``name``; a taken name raises "
        f"``MixresError`` unless ``override=True``. The class derives from "
        f"``mixres.Configurable`` and ``torch.nn.Module``; its instances get ``.config``."
    )
    register_preset.__doc__ = (
        f"Register a named {kind} config: ``config['name']`` is a registered {kind}; the other "
        f"keys are its arguments."
    )
    create.__doc__ = (
        f"Build the {kind} ``name`` (a class or a preset); ``kwargs`` override the preset's "
        f"arguments (``None`` included: it is a value).\n\n"
        f"Raises:\n    UnknownNameError (a KeyError): no {kind} of that name; the message lists "
        f"close matches.\n    ConfigError: an argument the {kind} does not take."
    )
    list_.__doc__ = f"Sorted names of the registered {kind}s matching the fnmatch ``pattern``."
    for fn, base in ((register, "register_"), (register_preset, "register_"), (create, "create_"), (list_, "list_")):
        suffix = "_preset" if fn is register_preset else ""
        plural = "s" if fn is list_ else ""
        fn.__name__ = fn.__qualname__ = f"{base}{kind}{suffix}{plural}"
    return register, register_preset, create, list_


register_fusion, register_fusion_preset, create_fusion, list_fusions = _family(FUSIONS)
register_projector, register_projector_preset, create_projector, list_projectors = _family(PROJECTORS)
register_pathway, register_pathway_preset, create_pathway, list_pathways = _family(PATHWAYS)
register_encoder, register_encoder_preset, _create_encoder_entry, list_encoders = _family(ENCODERS)
