"""(IA)^3 for plugtune: train through peft's ``IA3Config``, host many adapters on one base."""

from plugtune_ia3.plugin import IA3Handler, IA3Method, IA3Options

__all__ = ["IA3Handler", "IA3Method", "IA3Options"]
