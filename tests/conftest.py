import os

import pytest

# Keep XLA from oversubscribing the small CI machine; tests that need several
# devices fake them in their own subprocess.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "quick_compile: the module's programs compile with XLA's optimisations off (compile-bound tests)")


@pytest.fixture(scope="module", autouse=True)
def _quick_compile(request):
    """For a module marked ``quick_compile``: jit compiles without LLVM's optimisation passes.

    Its tests run a few steps of tiny models, so compiling is most of their time; unoptimised code
    computes the same floats (no fast math either way). Compiled programs are dropped on entry and exit,
    so within the module every program is built alike, and no other test runs one built here.
    """
    if request.node.get_closest_marker("quick_compile") is None:
        yield
        return
    import jax

    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
        jax.clear_caches()
