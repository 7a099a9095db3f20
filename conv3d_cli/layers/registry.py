"""Look up initializers, regularizers, constraints and activations by Keras identifier.

One mechanism serves the four families. An identifier may be:

- ``None`` (nothing),
- an object of the family (returned as is),
- a name, ``"he_normal"`` or ``"HeNormal"``,
- ``"NAME:{json}"``, the name and its arguments (``'l1_l2:{"l1": 0.1, "l2": 0.2}'``),
- a JSON object string or a dict, as Keras 3 or tf.keras 2 serialize it:
  ``{"class_name": ..., "config": {...}}`` (``module`` and ``registered_name``
  are accepted and ignored).
"""

from __future__ import annotations

import json
import re

from ..errors import ArgumentError, brief


def snake_case(name: str) -> str:
    """``"GlorotUniform"`` -> ``"glorot_uniform"``, ``"L1L2"`` -> ``"l1l2"``."""
    s = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name)
    return s.lower()


class Registry:
    """Name -> factory for one family of Keras objects."""

    def __init__(self, family: str, module: str, base: type):
        self.family = family  # e.g. "initializer"
        self.module = module  # e.g. "keras.initializers"
        self.base = base
        self._factories: dict[str, tuple[type, dict]] = {}

    def register(self, cls, *names, **defaults):
        """Register ``cls`` under its class name, its snake_case name and ``names``.

        ``defaults`` are arguments used when the object is named without
        arguments under one of ``names`` (e.g. ``"l1_l2"`` means Keras 2's
        ``l1_l2(l1=0.01, l2=0.01)``).
        """
        self._factories[cls.__name__.lower()] = (cls, {})
        self._factories[snake_case(cls.__name__)] = (cls, {})
        for n in names:
            self._factories[n.lower()] = (cls, defaults)
        return cls

    def names(self) -> list[str]:
        return sorted({k for k in self._factories if k == snake_case(k)})

    def _build(self, name: str, config: dict, argument: str):
        if not isinstance(name, str):
            raise ArgumentError(f"Invalid `{argument}`: the {self.family}'s class_name must be "
                                f"a string. Received: {name!r}")
        if not isinstance(config, dict):
            raise ArgumentError(f"Invalid `{argument}`: the {self.family}'s config must be a "
                                f"JSON object of arguments. Received: {config!r}")
        key = name.lower()
        if key not in self._factories:
            key = snake_case(name)
        if key not in self._factories:
            raise ArgumentError(
                f"Unknown {self.family} for `{argument}`: {name!r}. Expected one of: "
                f"{', '.join(self.names())}.")
        cls, defaults = self._factories[key]
        kwargs = {**defaults, **(config or {})}
        try:
            return cls(**kwargs)
        except ArgumentError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:  # arguments of the wrong type
            raise ArgumentError(
                f"Invalid arguments for {self.family} {name!r} in `{argument}`: "
                f"{kwargs}. {exc}") from None

    def get(self, identifier, argument: str):
        if identifier is None:
            return None
        if isinstance(identifier, self.base):
            return identifier
        if isinstance(identifier, dict):
            if "class_name" not in identifier:
                raise ArgumentError(
                    f"Invalid `{argument}`: a serialized {self.family} needs a "
                    f"'class_name'. Received: {brief(identifier)}")
            return self._build(identifier["class_name"],
                               identifier.get("config") or {}, argument)
        if isinstance(identifier, str):
            text = identifier.strip()
            if text.startswith("{"):
                return self.get(_load_json(text, argument), argument)
            name, sep, args = text.partition(":")
            config = {}
            if sep:
                config = _load_json(args, argument)
                if not isinstance(config, dict):
                    raise ArgumentError(
                        f"Invalid `{argument}`: the arguments after '{name}:' must "
                        f"be a JSON object. Received: {args}")
            return self._build(name.strip(), config, argument)
        raise ArgumentError(
            f"Could not interpret {self.family} identifier for `{argument}`: "
            f"{brief(identifier, _inner=True)}")

    def serialize(self, obj):
        """Keras 3's serialized form of ``obj``."""
        if obj is None:
            return None
        return {"module": self.module, "class_name": type(obj).__name__,
                "config": obj.get_config(), "registered_name": None}


def _load_json(text: str, argument: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise ArgumentError(f"Invalid JSON in `{argument}`: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ArgumentError(f"Invalid JSON in `{argument}`: {exc.msg} in {text!r}") from None
