"""`import builder` registers nemotron-nas with transformers' Auto classes, lazily.

The model code (builder.model) needs torch and transformers' modeling stack, seconds of
import that `builder plan` or a script reading manifests should not pay. So `import builder`
only installs a finder: when transformers is imported (by the user's `import transformers`,
or by any builder stage), builder.model is imported right after it and registers
`nemotron-nas` and `deci` with AutoConfig and AutoModelForCausalLM. If transformers is
already imported, the registration happens at once. Remote code is never involved.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

TRIGGER = "transformers"


def register_now() -> None:
    import builder.model  # noqa: F401  (its import registers the Auto classes)


class _ThenRegister(importlib.abc.Loader):
    """transformers' own loader, with the registration run once its module has executed."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def __getattr__(self, name: str):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        register_now()


class _TransformersFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != TRIGGER:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(TRIGGER)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


def install() -> None:
    if TRIGGER in sys.modules:
        register_now()
    elif not any(isinstance(f, _TransformersFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersFinder())
