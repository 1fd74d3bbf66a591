"""The suite's one compilation cache (tests/conftest.py): the interpreters tests start load the
programs another process compiled, which keeps the subprocess-heavy tests (resume after a kill,
two-process runs) from compiling every program again."""

import os
import subprocess
import sys

import jax

# one program no other test compiles (its input from numpy: nothing else is compiled); prints how
# many of the process's compilations came from the cache
PROGRAM = """
import jax, jax.numpy as jnp, numpy as np
hits = []
jax.monitoring.register_event_listener(lambda event, **_: hits.append(event == "/jax/compilation_cache/cache_hits"))
jax.jit(lambda x: jnp.cumsum(x * 7.25) - 3.5)(np.arange(13.0, dtype=np.float32)).block_until_ready()
print(sum(hits))
"""


def test_the_interpreters_tests_start_share_one_compilation_cache():
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert os.path.isdir(cache) and jax.config.jax_compilation_cache_dir == cache
    run = lambda: subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True)
    first, second = (int(run().stdout.split()[-1]) for _ in range(2))
    assert (first, second) == (0, 1)  # compiled once, then loaded
