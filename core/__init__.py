"""plugtune: parameter-efficient fine-tuning as a small plugin core.

Plugin authors need only :data:`hookimpl`::

    from plugtune import hookimpl

    @hookimpl
    def register_evaluators(register):
        register("my_metric", MyMetric)
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

from plugtune.kernel.errors import AdapterError, DataError, ModelError, PluginError, PlugtuneError, RecipeError, TrainingError
from plugtune.kernel.hookspecs import hookimpl

__version__ = "0.1.0"

# Known, harmless messages from dependencies that would otherwise greet every run:
# bitsandbytes' CPU backend looking for optional kernels when peft imports it (on a CPU with
# avx512_bf16 it asks the `kernels` package, a transformers dependency, for a Hub kernel, which
# offline says it skips a trust check; bitsandbytes then keeps its own kernel), and a
# transformers deprecation triggered inside peft.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: not record.getMessage().startswith("Skipping publisher trust check"))
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# Modules that lived at the top of the package before the core was laid out by layer
# (kernel, data, artifacts, training, serving). Their old import paths (``from plugtune.tasks
# import Task``) keep working: ``plugtune.<module>`` is the moved module itself, not a copy.
LAYERS = ("kernel", "data", "artifacts", "training", "serving")


def _moved_modules() -> dict[str, str]:
    here = Path(__file__).parent
    return {f"plugtune.{path.stem}": f"plugtune.{layer}.{path.stem}"
            for layer in LAYERS for path in sorted((here / layer).glob("*.py"))
            if path.stem != "__init__" and not (here / f"{path.stem}.py").exists()}


MOVED_MODULES = _moved_modules()


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old import path with the module at its new place (see MOVED_MODULES)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def __init__(self) -> None:
        self._specs: dict[str, Any] = {}  # alias -> the moved module's own spec, while importing

    def create_module(self, spec: Any) -> Any:
        module = importlib.import_module(MOVED_MODULES[spec.name])
        self._specs[spec.name] = module.__spec__  # the import system overwrites it with the alias's spec
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = self._specs.pop(module.__spec__.name)  # put the moved module's own spec back


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())

if TYPE_CHECKING:
    from plugtune.serving.host import AdapterHost
    from plugtune.training.recipe import Recipe
    from plugtune.training.train import RunResult

__all__ = [
    "AdapterError", "AdapterHost", "DataError", "ModelError", "PluginError", "PlugtuneError",
    "RecipeError", "TrainingError", "__version__", "hookimpl", "load_recipe", "run",
]


def load_recipe(path: Any = None, overrides: list[str] | None = None, **kwargs: Any) -> Recipe:
    """Read and validate a recipe (see :func:`plugtune.training.recipe.load_recipe`)."""
    from plugtune.training.recipe import load_recipe as _load

    return _load(path, overrides, **kwargs)


def run(recipe: Any, overrides: list[str] | None = None, **kwargs: Any) -> RunResult:
    """Train a recipe (a path or a loaded :class:`~plugtune.training.recipe.Recipe`) and save its
    adapter (see :func:`plugtune.training.train.run`)."""
    from plugtune.training.recipe import Recipe as _Recipe
    from plugtune.training.train import run as _run

    if not isinstance(recipe, _Recipe):
        recipe = load_recipe(recipe, overrides)
    return _run(recipe, **kwargs)


def __getattr__(name: str) -> Any:
    # AdapterHost pulls in torch and transformers; import it only when asked for.
    if name == "AdapterHost":
        from plugtune.serving.host import AdapterHost

        return AdapterHost
    raise AttributeError(name)
