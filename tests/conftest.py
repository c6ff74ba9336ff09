import os


def pytest_collection_modifyitems(config, items):
    """``MSMLP_TEST_SHARD=i/n`` keeps every n-th selected test from the i-th, so that n processes
    share a suite (tests/test_triton_mix.py runs the interpreter checks this way, one a core)."""
    shard = os.environ.get('MSMLP_TEST_SHARD')
    if not shard:
        return
    index, count = (int(part) for part in shard.split('/'))
    kept, deselected = [], []
    for position, item in enumerate(items):
        (kept if position % count == index else deselected).append(item)
    config.hook.pytest_deselected(items=deselected)
    items[:] = kept
