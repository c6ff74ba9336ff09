import logging
import os
import sys

import pytest


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


@pytest.fixture(autouse=True)
def _log_handlers_on_open_streams():
    """A logger first used under ``capsys`` (mmengine's MMLogger binds its handler to the
    ``sys.stdout`` of the moment) keeps writing to that test's capture after it is closed, and
    every later message is a "--- Logging error ---" traceback in another test's stderr."""
    yield
    loggers = [logging.root, *(logger for logger in logging.root.manager.loggerDict.values()
                               if isinstance(logger, logging.Logger))]
    mmengine_logging = sys.modules.get('mmengine.logging')
    if mmengine_logging is not None:
        loggers += list(mmengine_logging.MMLogger._instance_dict.values())
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, 'closed', False):
                handler.stream = sys.stderr  # (setStream would flush the closed one first)
