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

from .errors import AdapterError, DataError, ModelError, PluginError, PlugtuneError, RecipeError, TrainingError
from .hookspecs import hookimpl

__version__ = "0.1.0"

# Two known, harmless messages from dependencies that would otherwise greet every run:
# bitsandbytes' CPU backend looking for optional kernels when peft imports it, and a
# transformers deprecation triggered inside peft.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

if TYPE_CHECKING:
    from .host import AdapterHost
    from .recipe import Recipe
    from .train import RunResult

__all__ = [
    "AdapterError", "AdapterHost", "DataError", "ModelError", "PluginError", "PlugtuneError",
    "RecipeError", "TrainingError", "__version__", "hookimpl", "load_recipe", "run",
]


def load_recipe(path: Any = None, overrides: list[str] | None = None, **kwargs: Any) -> Recipe:
    """Read and validate a recipe (see :func:`plugtune.recipe.load_recipe`)."""
    from .recipe import load_recipe as _load

    return _load(path, overrides, **kwargs)


def run(recipe: Any, overrides: list[str] | None = None, **kwargs: Any) -> RunResult:
    """Train a recipe (a path or a loaded :class:`~plugtune.recipe.Recipe`) and save its
    adapter (see :func:`plugtune.train.run`)."""
    from .recipe import Recipe as _Recipe
    from .train import run as _run

    if not isinstance(recipe, _Recipe):
        recipe = load_recipe(recipe, overrides)
    return _run(recipe, **kwargs)


def __getattr__(name: str) -> Any:
    # AdapterHost pulls in torch and transformers; import it only when asked for.
    if name == "AdapterHost":
        from .host import AdapterHost

        return AdapterHost
    raise AttributeError(name)
