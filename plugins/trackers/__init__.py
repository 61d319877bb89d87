"""Built-in experiment trackers (``tracking:`` in a recipe), each behind its own extra; each
module imports its library only when a run starts, so it registers where the library is
absent and validation can name the extra to install."""
