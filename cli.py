"""``msmlp``: one command line for every task, on LightningCLI.

    msmlp {fit,validate,test,predict} --task {cls,det,seg} [--config F] [--a.b=c ...]
    msmlp benchmark ...

``--task X`` makes ``configs/X/default.yaml`` the first config; ``--config`` files and
``--a.b=c`` flags override it, in order. ``--print_config`` shows the result.
"""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

# The configs are installed beside this module (the ``configs`` package), as in the repository.
CONFIGS_DIR = Path(__file__).resolve().parent / 'configs'
TASKS = ('cls', 'det', 'seg')
DEFAULT_TASK = 'cls'
SUBCOMMANDS = ('fit', 'validate', 'test', 'predict')

USAGE = f"""usage: msmlp {{{','.join(SUBCOMMANDS)}}} [--task {{{','.join(TASKS)}}}] [--config FILE] [--a.b=c ...]
       msmlp benchmark [...]

  --task TASK   cls (classification), det (detection) or seg (segmentation); default {DEFAULT_TASK}.
                Its configs/TASK/default.yaml is the first config; --config files and
                --a.b=c flags override it. `msmlp fit --task cls` trains on the embedded
                default dataset. `msmlp SUBCOMMAND --task TASK --help` lists every option.
"""


def task_config(task: str) -> Path:
    return CONFIGS_DIR / task / 'default.yaml'


def pop_task(argv: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """Take ``--task X`` / ``--task=X`` out of ``argv``."""
    rest, task, args = [], None, iter(argv)
    for arg in args:
        if arg == '--task':
            task = next(args, None)
            if task is None:
                raise SystemExit(f'msmlp: error: --task needs a value: {", ".join(TASKS)}')
        elif arg.startswith('--task='):
            task = arg.split('=', 1)[1]
        else:
            rest.append(arg)
    return task, rest


def _last_line(err: BaseException) -> str:
    # Errors raised in DataLoader workers arrive wrapped in the worker's traceback text.
    text = str(err).strip()
    return text.splitlines()[-1].split(': ', 1)[-1] if 'Original Traceback' in text else text


def _rejected_init_args(err: ValueError) -> Optional[str]:
    """The task's own complaint when jsonargparse wraps an error raised by a class's
    ``__init__`` (e.g. arguments that contradict each other) in a union-type error."""
    text = str(err)
    if 'Does not validate against any of the Union subtypes' not in text:
        return None
    reasons = [m.group(1) for m in re.finditer(r'^\s+- (.+)$', text, re.MULTILINE)
               if not m.group(1).startswith('Expected a ')]
    return reasons[0] if reasons else None


def run_lightning(task: str, argv: List[str]) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch import LightningDataModule

    from tasks.base import BaseTask

    class MSMLPCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument('--task', choices=TASKS, default=task,
                                help='Task whose configs/TASK/default.yaml is the first config')
            parser.add_lightning_class_args(ModelCheckpoint, 'checkpoint')
            parser.set_defaults({'checkpoint.filename': 'best-epoch{epoch:03d}', 'checkpoint.save_last': True,
                                 'checkpoint.auto_insert_metric_name': False})

        def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
            super().parse_arguments(parser, args)
            self.explicit_model_keys = explicit_model_keys(args)
            check_checkpoint(self.config[self.config.subcommand].get('ckpt_path'))

        def _parse_ckpt_path(self) -> None:
            # Lightning lays the checkpoint's hyper-parameters over the whole parsed config;
            # --model.* flags given on the command line must still win over them.
            subcommand = self.config.get('subcommand')
            given = {k: self.config[subcommand].get(k) for k in self.explicit_model_keys} if subcommand else {}
            super()._parse_ckpt_path()
            for key, value in given.items():
                if value is not None:
                    self.config[subcommand][key] = value

        def before_instantiate_classes(self) -> None:
            self.pinned_versions = share_log_version(self.config[self.subcommand].trainer)

        def after_instantiate_classes(self) -> None:
            for logger_args in self.pinned_versions:  # the saved config.yaml stays reusable
                logger_args['version'] = None

        def before_fit(self) -> None:
            print(f'msmlp: task {task}; logs and checkpoints go to {self.trainer.log_dir}')

        def after_fit(self) -> None:
            report_outputs(self.trainer)

    prog_argv, sys.argv = sys.argv, ['msmlp']  # argv goes in as args: no clash with sys.argv
    try:
        with warnings.catch_warnings():
            if argv[:1] != ['fit']:  # a checkpoint's own run folder does not matter here
                warnings.filterwarnings('ignore', message='The dirpath has changed')
            MSMLPCLI(BaseTask, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     seed_everything_default=0, args=argv,
                     parser_kwargs={cmd: {'default_config_files': [str(task_config(task))],
                                          'prog': f'msmlp {cmd}'} for cmd in SUBCOMMANDS},
                     save_config_kwargs={'overwrite': True})
    finally:
        sys.argv = prog_argv


def explicit_model_keys(argv: Sequence[str]) -> List[str]:
    """Config keys of the ``--model.X`` flags in ``argv`` (``model.init_args.X``)."""
    keys = []
    for arg in argv:
        if isinstance(arg, str) and arg.startswith('--model.'):
            key = arg[2:].split('=', 1)[0]
            keys.append(key if key.startswith('model.init_args.') else 'model.init_args.' + key[len('model.'):])
    return keys


def check_checkpoint(path: Optional[str]) -> None:
    """Fail early, naming the file, on a ``--ckpt_path`` that is missing or not a checkpoint
    (Lightning's own keywords such as ``last`` pass through)."""
    if path is None or path in ('last', 'best', 'hpc', 'registry') or '://' in str(path):
        return
    from msmlp import read_checkpoint
    read_checkpoint(path)  # CheckpointError naming the file; nothing pickled is executed


def share_log_version(trainer_config) -> list:
    """Give the loggers that have no version the next free ``version_N`` of their folder,
    the same for loggers sharing a folder, so CSV and TensorBoard logs and the checkpoints
    share one run folder. Returns the logger ``init_args`` it changed."""
    loggers = trainer_config.get('logger')
    if not isinstance(loggers, list):
        return []
    unversioned = [logger.get('init_args') for logger in loggers if hasattr(logger, 'get')]
    unversioned = [args for args in unversioned if args is not None and args.get('save_dir') is not None
                   and args.get('version') is None]
    folders = {}
    for args in unversioned:
        folder = Path(args['save_dir']) / (args.get('name') or '')
        if folder not in folders:
            taken = [int(m.group(1)) for p in folder.glob('version_*')
                     if (m := re.fullmatch(r'version_(\d+)', p.name))]
            folders[folder] = f'version_{max(taken, default=-1) + 1}'
        args['version'] = folders[folder]
    return unversioned


def report_outputs(trainer) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    lines = ['', 'msmlp: run finished. Outputs:']
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        score = checkpoint.best_model_score
        figure = f' ({checkpoint.monitor} = {score:.4f})' if score is not None else ''
        lines.append(f'  best checkpoint: {checkpoint.best_model_path}{figure}')
    if checkpoint is not None and checkpoint.last_model_path:
        lines.append(f'  last checkpoint: {checkpoint.last_model_path}')
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            lines.append(f'  CSV metrics:     {Path(logger.log_dir) / "metrics.csv"}')
        elif isinstance(logger, TensorBoardLogger):
            lines.append(f'  TensorBoard:     tensorboard --logdir {logger.log_dir}')
    print('\n'.join(lines))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``msmlp`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['benchmark']:
        from msmlp.benchmark import main as benchmark_main  # written with the speed issue
        return benchmark_main(argv[1:]) or 0
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE)
        if not argv:
            return 2
    task, argv = pop_task(argv)
    task = task or DEFAULT_TASK
    if task not in TASKS:
        print(f'msmlp: error: unknown task {task!r}; choose one of {", ".join(TASKS)}', file=sys.stderr)
        return 2
    if not task_config(task).is_file():
        print(f'msmlp: task {task!r} is not available yet ({task_config(task)} does not exist; '
              f'it comes with the {task} issue)', file=sys.stderr)
        return 2
    from msmlp import CheckpointError
    from tasks.base import InputError
    try:
        run_lightning(task, argv)
    except (InputError, CheckpointError) as err:
        print(f'msmlp: error: {_last_line(err)}', file=sys.stderr)
        return 1
    except ValueError as err:
        reason = _rejected_init_args(err)
        if reason is None:
            raise
        print(f'msmlp: error: {reason}', file=sys.stderr)
        return 1
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
