import logging
import os
import sys

import pytest
import torch.jit._builtins


def _keep_ops_entered_in_torchscripts_builtin_table():
    """TorchScript knows a builtin op by ``id()``. When an op gains an overload (torch.compile's
    imports redefine ``quantized_decomposed::quantize_per_tensor``), torch replaces the op
    object it entered and frees the old one, whose id stays in the table (``_refresh_packet`` in
    torch/_ops.py). The next object at that address, a Conv2d's padding list for one, is then a
    builtin to ``torch.jit.script``: "builtin cannot be used as a value", at random, in a test
    that scripts a model after a compiled one in the same worker. Kept alive, no id is reused."""
    register, kept = torch.jit._builtins._register_builtin, []

    def register_and_keep(fn, op):
        kept.append(fn)
        register(fn, op)

    torch.jit._builtins._register_builtin = register_and_keep


_keep_ops_entered_in_torchscripts_builtin_table()


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
