"""One small Registry: names in, objects out; and the check that a config section's options are
keyword arguments its entry accepts.

    MODELS = Registry("model")
    @MODELS.register("lenet", tasks=("classification",))
    def lenet(num_classes, in_channels, image_size): ...
    MODELS.get("lenet")             # the builder; an unknown name lists the choices
    MODELS.meta("lenet")["tasks"]   # what was registered with it

A family of names can share one builder through a prefix: `MODELS.register_prefix("torchvision:",
build_tv)` makes `MODELS.get("torchvision:resnet18")` return `functools.partial(build_tv, "resnet18")`.
"""
import functools
import inspect

from lib.errors import UserError, choices_text, did_you_mean


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._entries = {}    # name -> (obj, meta)
        self._prefixes = {}   # prefix -> (builder, meta, names_fn)

    def register(self, name=None, **meta):
        """Decorator; the name defaults to the function's name. A duplicate name raises."""
        def deco(obj):
            self.add(name or obj.__name__, obj, **meta)
            return obj
        return deco

    def add(self, name, obj, **meta):
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = (obj, meta)
        return obj

    def register_prefix(self, prefix, builder, names_fn=None, **meta):
        """`prefix<x>` resolves to partial(builder, x); names_fn() lists valid x (for checks and help)."""
        if prefix in self._prefixes:
            raise ValueError(f"{self.kind} prefix '{prefix}' is registered twice")
        self._prefixes[prefix] = (builder, meta, names_fn)

    def _lookup(self, name, where):
        name = str(name)
        if name in self._entries:
            return self._entries[name]
        for prefix, (builder, meta, names_fn) in self._prefixes.items():
            if name.startswith(prefix):
                sub = name[len(prefix):]
                if names_fn is not None:
                    valid = names_fn()
                    if sub not in valid:
                        raise UserError(
                            f"{where}: unknown {self.kind} '{name}'{did_you_mean(sub, valid)}; "
                            f"valid names after '{prefix}' are: {choices_text(valid)}.")
                return functools.partial(builder, sub), meta
        hint = did_you_mean(name, self.names())
        raise UserError(f"{where}: unknown {self.kind} '{name}'{hint}; "
                        f"choose one of: {choices_text(self.names())}.")

    def get(self, name, where=None):
        """The registered object; an unknown name raises UserError listing the choices."""
        return self._lookup(name, where or f"{self.kind}")[0]

    def meta(self, name, where=None):
        return self._lookup(name, where or f"{self.kind}")[1]

    def names(self):
        """Registered names, plus one '<prefix>*' line per prefix family."""
        return sorted(self._entries) + sorted(p + "*" for p in self._prefixes)

    def __contains__(self, name):
        try:
            self._lookup(name, "")
            return True
        except UserError:
            return False

    def __iter__(self):
        return iter(sorted(self._entries))


def accepted_kwargs(fn, skip=()):
    """Names of the keyword arguments `fn` accepts (None when it takes **kwargs)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip]


def check_kwargs(fn, kwargs, where, skip=(), also=(), origins=None):
    """Raise UserError naming the first key of `kwargs` that `fn` does not accept.

    also: the section's own schema keys (valid, but not passed to fn), for the did-you-mean hint;
    origins: config key -> where it was set, so the message names the file.
    """
    accepted = accepted_kwargs(fn, skip)
    if accepted is None:
        return
    for key in kwargs:
        if key not in accepted:
            source = (origins or {}).get(f"{where}.{key}")
            at = f" (set in {source})" if source else ""
            hint = did_you_mean(key, list(accepted) + list(also))
            hint = hint.replace("'", f"'{where}.", 1) if hint else ""
            raise UserError(f"{where}.{key}{at} is not an option here{hint}; "
                            f"accepted: {choices_text(list(also) + accepted) or 'none'}.")
