"""jax's persistent compilation cache for sftjax-train (`trainer.compile_cache`).

XLA compiles every program a run uses: the train step once per batch shape, the eval step, sampling; the same
programs each time a run is repeated (measured for the main job: experiments/main_recipe/README.md). jax can
keep the compiled executables on disk, keyed by the program, the compile options, the jax / jaxlib versions and
the device: a later run (a sweep's next job, the same job again) loads them.

The entries are XLA's own serialized executables (no pickle); only the first process of a multi-process run
writes them. The cache is bounded (least recently used entries go first) and can be deleted at any time.
"""

from __future__ import annotations

from pathlib import Path

import jax

MAX_BYTES = 2**30  # the cache's bound on disk
MIN_COMPILE_SECONDS = 0.2  # programs that compile faster are not worth a file (loading one costs about as much)


def use_compile_cache(directory: str) -> None:
    """Compile through jax's persistent cache in `directory` (~ expanded; created when first written); "" leaves
    the cache off. Call it before the first compilation of the process: jax reads these settings once."""
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
