import os


def pytest_collection_modifyitems(config, items):
    """``MSMLP_TEST_SHARD=i/n`` keeps every n-th selected test from the i-th, so that n processes
    share a suite (tests/test_triton_mix.py runs the interpreter checks this way, one a core)."""
    shard = os.environ.get('MSMLP_TEST_SHARD')
    if not shard:
        return
    index, count = (int(part) for part in shard.split('/'))
    kept = items[index::count]
    config.hook.pytest_deselected(items=[item for position, item in enumerate(items)
                                         if position % count != index])
    items[:] = kept
