"""``msmlp``: one command line for every task, on LightningCLI.

    msmlp {fit,validate,test,predict} --task {cls,det,seg} [--config F] [--a.b=c ...]
    msmlp benchmark ...
    msmlp export ...

``--task X`` makes ``configs/X/default.yaml`` the first config; ``--config`` files and
``--a.b=c`` flags override it, in order. ``--print_config`` shows the result. Bad input is one
line, ``msmlp: error: ...`` (``MSMLP_DEBUG=1`` shows its traceback).
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import inspect
import os
import re
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tasks.base import CONFIG_DIR, find_config

TASKS = ('cls', 'det', 'seg')
DEFAULT_TASK = 'cls'
SUBCOMMANDS = ('fit', 'validate', 'test', 'predict')
OWN_COMMANDS = ('export', 'benchmark')

USAGE = f"""usage: msmlp {{{','.join(SUBCOMMANDS)}}} [--task {{{','.join(TASKS)}}}] [--config FILE] [--a.b=c ...]
       msmlp benchmark [...]    (speed; msmlp benchmark --help)
       msmlp export [...]       (ONNX, TorchScript, torch.export, safetensors; msmlp export --help)
       msmlp --version          (this package's version and its libraries')

  --task TASK   cls (classification), det (detection) or seg (segmentation); default {DEFAULT_TASK}.
                Its configs/TASK/default.yaml is the first config; --config files and
                --a.b=c flags override it. `msmlp fit --task cls` trains on the embedded
                default dataset. `msmlp SUBCOMMAND --task TASK --help` lists every option.
"""


def task_config(task: str) -> Path:
    return CONFIG_DIR / task / 'default.yaml'


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


def resolve_config_args(argv: Sequence[str], task: str) -> List[str]:
    """``argv`` with each ``--config FILE`` found by ``find_config`` (inline YAML, which
    jsonargparse also takes there, passes through)."""
    out, args = [], iter(argv)
    for arg in args:
        if arg == '--config' or arg.startswith('--config='):
            value = arg.split('=', 1)[1] if '=' in arg else next(args, None)
            if value is not None and not any(c in value for c in ':{\n'):
                value = str(find_config(value, task))
                check_task_config(value, task)
            out += ['--config'] + ([value] if value is not None else [])
        else:
            out.append(arg)
    return out


def check_task_config(path: str, task: str) -> None:
    """``InputError`` naming the file when ``path`` is not a YAML mapping (with the line and
    column of a syntax error: jsonargparse would name neither the file nor, for several files,
    which one), or when its model is another task's (it would run that task under --task's name)."""
    from tasks.base import InputError
    config = read_yaml(path)
    if not isinstance(config, dict):
        raise InputError(f'{path}: ' + ('empty' if config is None else f'a YAML {type(config).__name__}') +
                         ', not a mapping of options (model:, data:, trainer: ...)')
    model = config.get('model')
    class_path = model.get('class_path') if isinstance(model, dict) else None
    owner = next((t for t in TASKS if class_path and class_path == _task_class_path(t)), None)
    if owner is not None and owner != task:
        raise InputError(f'{path} is a config of --task {owner} (its model is {class_path}), not of --task {task}: '
                         f'run it with --task {owner}')


def read_yaml(path: str):
    import yaml

    from tasks.base import InputError
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, 'problem_mark', None)
        where = f', line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        problem = getattr(err, 'problem', None) or str(err).splitlines()[0]
        raise InputError(f'{path}{where}: not valid YAML: {problem}') from err


@functools.lru_cache(maxsize=None)
def _task_class_path(task: str) -> str:
    return read_yaml(str(task_config(task)))['model']['class_path']


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
    # each reason is a '- ' line, its continuation lines indented deeper
    reasons = [' '.join(line.strip() for line in m.group(0).strip().splitlines())[2:]
               for m in re.finditer(r'^(\s+)- .+$(\n\1\s+(?!- ).+$)*', text, re.MULTILINE)]
    reasons = [r for r in reasons if not r.startswith('Expected a ')]
    return reasons[0] if reasons else None


def _class_at(class_path: Optional[str]) -> Optional[type]:
    """The class ``class_path`` names (None if it cannot be imported)."""
    module, _, name = (class_path or '').rpartition('.')
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _class_options(class_path: str) -> List[str]:
    """The ``__init__`` arguments of the class ``class_path`` names (none if it cannot be read)."""
    try:
        return [p for p in inspect.signature(_class_at(class_path)).parameters if p not in ('self', 'args', 'kwargs')]
    except (TypeError, ValueError):
        return []


def _suggestion(name: str, options: Sequence[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f'; did you mean {prefix}{close[0]}?' if close else ''


def _type_words(types: str) -> str:
    """jsonargparse's ``Subtypes: [...]`` or ``Expected a ...`` text in the words of a flag."""
    words = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r'\1', types)
    words = re.sub(r'typing\.Literal\[(.*?)\]', r'\1', words)
    words = re.sub(r'typing\.(?:List|Sequence)\[(\w+)\]', r'a list of \1', words)
    return words.replace('NoneType', 'null')


def _condensed(text: str, prefix: str) -> Optional[str]:
    """The one-line reason of a ``Parser key "k": ...`` block (``None`` if it is not one)."""
    block = re.match(r'\s*Parser key "([^"]+)":\s*\n?(.*)', text, re.S)
    if block is None:
        return None
    flag, body = f'{prefix}.{block.group(1)}' if prefix else f'--{block.group(1)}', block.group(2)
    class_path = re.search(r"Problem with given class_path '([^']+)':\s*\n(.*)", body, re.S)
    if class_path:
        inner = class_path.group(2)
        option = re.match(r"\s*Option '([^']+)' is not accepted", inner)
        if option:
            return (f"{flag}.{option.group(1)}: {class_path.group(1)} takes no option '{option.group(1)}'"
                    + _suggestion(option.group(1), _class_options(class_path.group(1)), f'{flag}.'))
        return _condensed(inner, flag)
    direct = re.match(r'\s*Expected a (.+?)\. Got value: (.*)', body)
    if direct:
        return f'{flag}={direct.group(2).strip()}: expected {_type_words(direct.group(1))}'
    subtypes = re.search(r'^\s*Subtypes: \[(.*)\]$', body, re.M)
    given = re.findall(r'^\s*Given value: (.*)$', body, re.M)
    if subtypes and given:
        expected = _type_words(subtypes.group(1))
        head, _, last = expected.rpartition(', ')
        return f'{flag}={given[0]}: expected {head + " or " + last if head else last}'
    return None


def condensed_error(message: str, options: Sequence[str] = ()) -> str:
    """jsonargparse's error for an option or value as one line: for a ``--model.*`` or
    ``--data.*`` flag it reports every union member it tried, over ten lines, the reason in the
    middle. ``options`` are the parser's flags, for suggestions."""
    text = message.strip()
    unknown = re.fullmatch(r'unrecognized arguments: (--[\w.]+)(.*)', text, re.S)
    if unknown:
        return text + _suggestion(unknown.group(1), options, '')
    choice = re.match(r"argument subcommand: invalid choice: '([^']*)'", text)
    if choice:  # the commands msmlp runs itself are not the parser's
        return (text + ", or msmlp's export or benchmark"
                + _suggestion(choice.group(1), (*SUBCOMMANDS, *OWN_COMMANDS), ''))
    return _condensed(text, '') or text


class MSMLPArgumentParser(LightningArgumentParser):
    """A bad option or value is two lines, the error and where the options are listed, instead
    of the usage of every option (over 60 lines) with the error at its end."""

    task = DEFAULT_TASK
    command_line: Sequence[str] = ()

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error or os.environ.get('JSONARGPARSE_DEBUG'):  # raise, as jsonargparse does then
            super().error(message, ex)
        parser = getattr(ex, 'subcommand_parser', None) or self
        prog = parser.prog.replace(' [options]', '')
        options = [flag for action in parser._actions for flag in action.option_strings]
        sys.stderr.write(f'{prog}: error: {self.from_config(condensed_error(message, options))}\n'
                         f'{prog} --task {self.task} --help lists every option\n')
        self.exit(2)

    def from_config(self, reason: str) -> str:
        """``reason``, saying which configs hold the option it names when the command line does not."""
        flag = re.match(r'(--[\w.]+)[:=]', reason) or re.search(r"does not accept option '([\w.]+)'", reason)
        typed = {arg.split('=', 1)[0].replace('.init_args.', '.').lstrip('-') for arg in self.command_line}
        if flag is None or flag.group(1).lstrip('-') in typed:
            return reason
        args = list(self.command_line)  # resolve_config_args wrote every config as '--config', FILE
        configs = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == '--config']
        return f'{reason} (not on the command line: from {" or ".join(configs or [str(task_config(self.task))])})'


class RunFolderWrittenWhenTrainingStarts(SaveConfigCallback):
    """Writes a fit's ``config.yaml`` when training starts rather than at set-up, and removes the
    TensorBoard event file a fit opened at set-up if it stops before its first step, so that a
    resume failing early (its data, its loaders) leaves the run's folder as it was."""

    trained = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != 'fit':
            super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        super().setup(trainer, pl_module, 'fit')

    def on_train_batch_end(self, *args: Any) -> None:
        self.trained = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.state.fn != 'fit' or self.trained:
            return
        for logger in trainer.loggers:
            writer = getattr(logger, '_experiment', None)  # None: no file was opened
            file_writer = getattr(writer, 'file_writer', None)
            path = getattr(getattr(file_writer, 'event_writer', None), '_file_name', None)
            if path and os.path.isfile(path):
                writer.close()
                os.remove(path)


class MSMLPCLI(LightningCLI):
    """LightningCLI with ``--task``, the ``--checkpoint.*`` callback and the run-folder rules."""

    def __init__(self, *args: Any, task: str = DEFAULT_TASK, new_folders: Optional[List[Path]] = None,
                 **kwargs: Any) -> None:
        self.task = task
        self.command_line = list(kwargs.get('args') or [])
        self.new_folders = new_folders if new_folders is not None else []  # what this run creates
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.task, parser.command_line = self.task, self.command_line
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        from tasks.checkpointing import RunCheckpoint
        parser.add_argument('--task', choices=TASKS, default=self.task,
                            help='Task whose configs/TASK/default.yaml is the first config')
        parser.add_lightning_class_args(RunCheckpoint, 'checkpoint')
        parser.set_defaults({'checkpoint.filename': 'best-epoch{epoch:03d}', 'checkpoint.save_last': True,
                             'checkpoint.auto_insert_metric_name': False})

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self.explicit_model_keys = explicit_model_keys(args)
        config = self.config[self.config.subcommand]
        follow_default_root_dir(config.trainer, args)
        if config.get('ckpt_path') == 'last':
            config['ckpt_path'] = latest_last_checkpoint(config.trainer, self.config.subcommand)
        elif config.get('ckpt_path') == 'best':
            config['ckpt_path'] = latest_best_checkpoint(config.trainer)
        self.checkpoint_facts = check_checkpoint(config.get('ckpt_path'), self.task)
        check_task_class(config, self.checkpoint_facts, self.task)
        check_optimizer_flags(config, self.task)
        self.resumed = self.checkpoint_facts['logs'] if self.checkpoint_facts is not None else None
        use_trained_data(config, self.checkpoint_facts, args, predicting=self.config.subcommand == 'predict')

    def _parse_ckpt_path(self) -> None:
        # Lightning lays the checkpoint's hyper-parameters over the whole parsed config;
        # --model.* flags given on the command line must still win over them.
        subcommand = self.config.get('subcommand')
        given = {k: self.config[subcommand].get(k) for k in self.explicit_model_keys} if subcommand else {}
        super()._parse_ckpt_path()
        for key, value in given.items():
            if value is not None:
                self.config[subcommand][key] = value
        if subcommand:
            check_architecture_flags(self.config[subcommand], given, self.checkpoint_facts)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        refuse_spawn(config.trainer.get('strategy'))
        resuming = self.subcommand == 'fit' and self.resumed is not None
        self.run_folder = resumed_run_folder(config.get('ckpt_path'), config.trainer) if resuming else None
        self.pinned_versions = share_log_version(config.trainer, self.run_folder)
        self.run_dirs = run_folders(self.pinned_versions)
        # the run folders first: a folder above them that the run made may be kept for its predictions
        self.new_folders += [folder for folder in self.run_dirs if not folder.exists()]
        self.new_folders += [top for top in map(first_missing_folder, self.run_dirs) if top]

    def instantiate_classes(self) -> None:
        from tasks.base import weights_from_checkpoint
        restored = bool(self.config[self.subcommand].get('ckpt_path'))  # 'last' is resolved by now
        with weights_from_checkpoint() if restored else contextlib.nullcontext():
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any):
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        from tasks.base import InputError
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, RuntimeError) as err:  # options the machine cannot run
            options = self.config_init[self.subcommand].trainer
            given = ', '.join(f'{key}={getattr(options, key, None)}' for key in ('accelerator', 'strategy', 'devices'))
            raise InputError(f'trainer ({given}): {err}') from err
        check_process_count(trainer)
        show_small_metrics(trainer)
        return trainer

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # --trainer.enable_checkpointing false: Lightning refuses the --checkpoint.* callback
        # this CLI always adds; the user asked for no checkpoints, so it is left out.
        if config.get('enable_checkpointing') is False:
            from lightning.pytorch.callbacks import ModelCheckpoint
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def after_instantiate_classes(self) -> None:
        for logger_args in self.pinned_versions:  # the saved config.yaml stays reusable
            logger_args['version'] = None
        if self.run_folder is not None:
            continue_logs(self.trainer.loggers, self.run_folder, self.resumed)
        self.model.checkpoint_path = self.config[self.subcommand].get('ckpt_path')

    def before_fit(self) -> None:
        if first_process():
            where = 'continue in' if self.run_folder is not None else 'go to'
            saved = 'logs and checkpoints' if self.trainer.checkpoint_callback is not None else 'logs (no checkpoints)'
            outputs = (f'{saved} {where} {self.trainer.log_dir}' if not self.trainer.fast_dev_run
                       else 'fast_dev_run: nothing is logged or saved')
            print(f'msmlp: {describe_run(self.task, self.model, self.datamodule)}; {outputs}', flush=True)

    def before_validate(self) -> None:
        self.announce_evaluation()

    def before_test(self) -> None:
        self.announce_evaluation()

    def announce_evaluation(self) -> None:
        if first_process():
            outputs = ('fast_dev_run: nothing is logged' if self.trainer.fast_dev_run
                       else f'metrics go to {self.trainer.log_dir}')
            print(f'msmlp: {self.subcommand} {describe_run(self.task, self.model, self.datamodule)}; {outputs}',
                  flush=True)
            self.warn_if_untrained()

    def before_predict(self) -> None:
        if first_process():
            self.warn_if_untrained()

    def after_predict(self) -> None:
        # predictions go to stdout or their own file or folder; the run folder would hold only the config
        remove_unused(self.new_folders)

    def warn_if_untrained(self) -> None:
        """One line on stderr when validate, test or predict would run freshly initialised weights:
        no checkpoint, and no pretrained classifier (a detector's or segmenter's pretrained
        backbone leaves its heads untrained)."""
        if self.config[self.subcommand].get('ckpt_path'):
            return
        if self.task == 'cls' and getattr(self.model, 'hparams', {}).get('pretrained'):
            return
        print(f'msmlp: warning: no --ckpt_path: {self.subcommand} runs untrained weights '
              '(--ckpt_path FILE, or last for the newest run\'s last.ckpt)', file=sys.stderr, flush=True)

    def after_fit(self) -> None:
        if self.trainer.is_global_zero and not self.trainer.fast_dev_run:
            report_outputs(self.trainer)


def show_small_metrics(trainer) -> None:
    """Lightning's rich progress bar shows metrics with 3 decimals, so a learning rate of 5e-4
    read 'lr: 0.000': its default theme gets 3 significant digits instead (a theme of one's own
    is kept)."""
    import dataclasses

    from lightning.pytorch.callbacks import RichProgressBar
    bar = trainer.progress_bar_callback
    if isinstance(bar, RichProgressBar) and bar.theme.metrics_format == '.3f':
        bar.theme = dataclasses.replace(bar.theme, metrics_format='.3g')


def describe_run(task: str, model, datamodule) -> str:
    """``task cls: msmlp_tiny (embed_dim 40, depths 1,1,2,1; 1.6M parameters) on <data>``: what
    runs on which data, with the width and depths that override the variant's."""
    from msmlp.export import arch_words
    hparams = getattr(model, 'hparams', {})
    what = hparams.get('model') or hparams.get('config') or type(model).__name__
    overrides = arch_words(hparams.get('embed_dim'), hparams.get('depths'))
    averaged = getattr(model, 'ema', None)  # the classifier's weight average is a copy, not more parameters
    copies = sum(p.numel() for p in averaged.parameters()) if averaged is not None else 0
    size = (sum(p.numel() for p in model.parameters()) - copies) / 1e6
    root = getattr(datamodule, 'hparams', {}).get('root')
    details = '; '.join(filter(None, [', '.join(overrides), f'{size:.1f}M parameters']))
    return f'task {task}: {what} ({details}) on ' + (str(root) if root else 'the embedded default data')


def run_lightning(task: str, argv: List[str]) -> None:
    """Run LightningCLI; a run that fails before anything was trained leaves no run folder."""
    quiet_other_processes()
    new_folders: List[Path] = []
    try:
        _run_cli(task, argv, new_folders)
    except BaseException:
        remove_unused(new_folders)
        raise


def _run_cli(task: str, argv: List[str], new_folders: List[Path]) -> None:
    from lightning.pytorch import LightningDataModule

    from tasks.base import BaseTask

    with relaunchable_as(['--task', task, *argv]), warnings.catch_warnings():
        if argv[:1] != ['fit']:  # a checkpoint's own run folder and callbacks do not matter here
            warnings.filterwarnings('ignore', message='The dirpath has changed')
            warnings.filterwarnings('ignore', message='Be aware that when using `ckpt_path`')
        warnings.filterwarnings('ignore', message="LightningCLI's args parameter")  # sys.argv is the same command
        # Lightning 2.6 calls torch's deprecated LeafSpec check on every fit, mmengine imports
        # setuptools' deprecated pkg_resources: neither is the user's to act on
        warnings.filterwarnings('ignore', message=r'`isinstance\(treespec, LeafSpec\)` is deprecated')
        warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
        # the OpenMMLab tasks move batches themselves (mmengine's data samples), by design;
        # mmseg announces deprecations of its own internals on every run
        warnings.filterwarnings('ignore', message='You have overridden `transfer_batch_to_device`')
        warnings.filterwarnings('ignore', message='``build_loss`` would be deprecated')
        warnings.filterwarnings('ignore', message='`reduce_zero_label` will be deprecated')
        # mmseg's reminder of its loss default on every model built; the released configs keep the default
        warnings.filterwarnings('ignore', message='Default ``avg_non_ignore`` is False')
        MSMLPCLI(BaseTask, LightningDataModule, task=task, new_folders=new_folders, subclass_mode_model=True,
                 parser_class=MSMLPArgumentParser,
                 subclass_mode_data=True, seed_everything_default=0, args=argv,
                 parser_kwargs={'prog': 'msmlp', **{cmd: {'default_config_files': [str(task_config(task))],
                                                          'prog': f'msmlp {cmd}'} for cmd in SUBCOMMANDS}},
                 save_config_callback=RunFolderWrittenWhenTrainingStarts, save_config_kwargs={'overwrite': True})


def quiet_other_processes() -> None:
    """One report per run: Lightning's informational lines (seeding, process group set-up)
    only from the first process, without its advertisement; warnings and errors from every
    process."""
    import logging
    if not first_process():
        for name in ('lightning.pytorch', 'lightning.fabric'):
            logging.getLogger(name).setLevel(logging.WARNING)
    rank_zero = logging.getLogger('lightning.pytorch.utilities.rank_zero')
    if not any(isinstance(f, _NoAdvertisement) for f in rank_zero.filters):
        rank_zero.addFilter(_NoAdvertisement())


class _NoAdvertisement:
    """Drops Lightning's "Tip: ... install litlogger" line, and its notice that the det/seg
    tasks replace the model summary (a logging filter)."""

    def filter(self, record) -> bool:
        message = str(record.getMessage())
        return 'litlogger' not in message and not re.search(
            r'will override existing callbacks passed to Trainer: (Rich)?ModelSummary$', message)


@contextlib.contextmanager
def relaunchable_as(args: List[str]):
    """Make the command line re-runnable as ``python cli.py ARGS`` while the block runs.

    Lightning's ``ddp`` launcher starts the other processes of a run by re-running
    ``sys.argv`` (or ``python -m`` the main module) with the same Python and environment.
    However ``msmlp`` was started (console script, ``python -m cli``, or ``cli.main([...])``
    from Python), each child then runs this same command.
    """
    import __main__
    saved_argv, saved_spec = sys.argv, getattr(__main__, '__spec__', None)
    sys.argv = [str(Path(__file__).resolve()), *args]
    __main__.__spec__ = None
    try:
        yield
    finally:
        sys.argv = saved_argv
        __main__.__spec__ = saved_spec


def refuse_spawn(strategy: Any) -> None:
    """``ddp_spawn`` pickles the trainer with everything the CLI built; refuse it in one line."""
    from tasks.base import InputError
    name = strategy if isinstance(strategy, str) else ''
    if hasattr(strategy, 'get'):
        name = f"{strategy.get('class_path', '')} {(strategy.get('init_args') or {}).get('start_method', '')}"
    if 'spawn' in name.lower():
        raise InputError(f'--trainer.strategy {strategy if isinstance(strategy, str) else name.strip()} is not '
                         'supported: use --trainer.strategy ddp, which starts each process by re-running this '
                         'msmlp command (under torchrun or SLURM, every process runs it already)')


def launched_processes() -> Optional[Tuple[str, int, int]]:
    """``(launcher, processes, processes per node)`` when torchrun or srun started this run's
    processes (Lightning then starts none), else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
    if TorchElasticEnvironment.detect():
        return 'torchrun', int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_WORLD_SIZE'])
    step_tasks = int(os.environ.get('SLURM_STEP_NUM_TASKS', 1))  # set by srun, not in a batch script itself
    if SLURMEnvironment.detect() and step_tasks > 1:
        return 'srun', step_tasks, max(1, step_tasks // int(os.environ.get('SLURM_STEP_NUM_NODES', 1)))
    return None


def check_process_count(trainer) -> None:
    """Under torchrun or srun every process exists already: the trainer must run as many
    (devices x num_nodes). With fewer, each process would train the whole run alone and all
    would write to one run folder; with more, Lightning stops every process with a traceback."""
    from tasks.base import InputError
    launched = launched_processes()
    if launched is None:
        return
    launcher, processes, per_node = launched
    runs = trainer.num_devices * trainer.num_nodes
    if processes == runs:
        return
    nodes = f' --trainer.num_nodes {processes // per_node}' if processes > per_node else ''
    raise InputError(f'{launcher} started {processes} processes, but the trainer runs {runs} (devices '
                     f'{trainer.num_devices} x num_nodes {trainer.num_nodes}): pass --trainer.devices {per_node}'
                     f'{nodes} --trainer.strategy ddp')


def flag_given(argv: Sequence[str], key: str, any_suffix: bool = False) -> bool:
    """Whether ``--KEY`` (``--group.init_args.name`` too) is on the command line; with
    ``any_suffix``, also any ``--KEY.*`` below it."""
    group, _, name = key.rpartition('.')
    end = r'' if any_suffix else r'(=|$)'
    pattern = re.compile(rf'--{re.escape(group)}(\.init_args)?\.{re.escape(name)}{end}')
    return any(pattern.match(str(arg)) for arg in argv)


def explicit_model_keys(argv: Sequence[str]) -> List[str]:
    """Config keys of the ``--model.X`` flags in ``argv`` (``model.init_args.X``)."""
    keys = []
    for arg in argv:
        if isinstance(arg, str) and arg.startswith('--model.'):
            key = arg[2:].split('=', 1)[0]
            keys.append(key if key.startswith('model.init_args.') else 'model.init_args.' + key[len('model.'):])
    return keys


def check_checkpoint(path: Optional[str], task: str = DEFAULT_TASK) -> Optional[dict]:
    """Fail early, naming the file, on a ``--ckpt_path`` that is missing or not a checkpoint
    (Lightning's other keywords, ``hpc`` and ``registry``, pass through). Returns what the CLI uses of it:
    ``logs``, what it recorded of its run's logs (``tasks.checkpointing.LOG_STATE_KEY``; ``{}``
    if nothing), and ``data``, its data settings; None without a file to read."""
    if path is None or path in ('hpc', 'registry') or '://' in str(path):
        return None
    from msmlp import read_checkpoint
    from msmlp.checkpoint import listed
    from tasks.base import InputError
    from tasks.checkpointing import LOG_STATE_KEY
    checkpoint = read_checkpoint(path)  # CheckpointError naming the file; nothing pickled is executed
    checkpoint = checkpoint if isinstance(checkpoint, dict) else {}
    if 'state_dict' not in checkpoint or 'pytorch-lightning_version' not in checkpoint:
        use = ('to start from its weights, or evaluate them, pass it as' if task == 'cls'
               else 'a backbone\'s weights are read with')
        raise InputError(f'{path} is not a Lightning checkpoint of a run (it holds {listed(checkpoint, limit=5)}): '
                         f'{use} --model.pretrained {path}')
    logs, data = checkpoint.get(LOG_STATE_KEY), checkpoint.get('datamodule_hyper_parameters')
    model = checkpoint.get('hyper_parameters')
    return {'path': str(path), 'logs': dict(logs) if isinstance(logs, dict) else {},
            'data': dict(data) if isinstance(data, dict) else {},
            'model_class': model.get('_class_path') if isinstance(model, dict) else None,
            'hparams': model if isinstance(model, dict) else {}}


def _comparable(value: Any) -> Any:
    """A config value as plain lists and dicts (jsonargparse gives tuples and namespaces)."""
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if hasattr(value, 'items'):
        return {k: _comparable(v) for k, v in value.items()}
    return value


def check_architecture_flags(config, given: dict, facts: Optional[dict]) -> None:
    """A ``--model.X`` flag that builds another model than the checkpoint's (another
    ``num_classes``, width, timm model) stops in one line naming the checkpoint's value, not in
    a page of state-dict size mismatches."""
    from tasks.base import InputError
    trained = (facts or {}).get('hparams') or {}
    task_class = _class_at(config.get('model', {}).get('class_path'))
    for key in given:
        arg = key.rsplit('.', 1)[-1]
        if arg not in getattr(task_class, 'architecture_args', ()) or arg not in trained:
            continue
        now, then = _comparable(config[key]), _comparable(trained[arg])
        if now == then:
            continue
        hint = (f'; to train a {now}-class model from its weights: msmlp fit --model.pretrained {facts["path"]} '
                f'--model.num_classes {now}' if arg == 'num_classes' else '')
        raise InputError(f'--model.{arg} {now}: {facts["path"]} holds a model of {arg}={then}, and its weights '
                         f'fit only that; leave out --model.{arg}{hint}')


def check_optimizer_flags(config, task: str) -> None:
    """LightningCLI's ``--optimizer`` and ``--lr_scheduler`` replace a cls task's AdamW and
    cosine schedule; Lightning ignores ``--lr_scheduler`` given alone, and det/seg take both
    from their OpenMMLab config (Lightning's replacement crashed there). Both are one line."""
    from tasks.base import InputError
    optimizer, scheduler = config.get('optimizer'), config.get('lr_scheduler')
    if task != 'cls' and (optimizer or scheduler):
        flag = '--optimizer' if optimizer else '--lr_scheduler'
        raise InputError(f"{flag}: --task {task} takes its optimizer and schedule from its config's optim_wrapper "
                         "and param_scheduler; change them with --model.cfg_options, e.g. "
                         "--model.cfg_options '{optim_wrapper.optimizer.lr: 0.0001}'")
    if scheduler and not optimizer:
        raise InputError('--lr_scheduler without --optimizer: Lightning would ignore it and run the task\'s AdamW '
                         'with its warm-up and cosine schedule (--model.lr, --model.warmup_epochs, --model.min_lr); '
                         'give an --optimizer too')


TASK_MODULES = {'tasks.classification': 'cls', 'tasks.detection': 'det', 'tasks.segmentation': 'seg'}


def check_task_class(config, facts: Optional[dict], task: str) -> None:
    """A checkpoint of one task's model given to another task stops in one line (Lightning
    would build the checkpoint's model class over the other task's data, and fail deep in it)."""
    from tasks.base import InputError
    model = config.get('model')
    expected = model.get('class_path') if hasattr(model, 'get') else None
    trained = facts.get('model_class') if facts is not None else None
    if not trained or not expected or trained == expected:
        return
    trained_task = TASK_MODULES.get(trained.rsplit('.', 1)[0])
    hint = f': use --task {trained_task}' if trained_task and trained_task != task else ''
    raise InputError(f"{facts['path']} holds a {trained}, not the {expected} of --task {task}{hint}")


UNRESTORED_DATA_ARGS = ('predict_path', 'predict_images', 'num_workers')  # this command's inputs and machine


def use_trained_data(config, facts: Optional[dict], argv: Sequence[str], predicting: bool = False) -> None:
    """A checkpoint's data settings (its ``datamodule_hyper_parameters``: image size, crop,
    normalisation, batch size, augmentation, the data folder) replace the config's, unless a
    ``--data.X`` flag is on the command line: evaluated at another size or resumed with another
    batch, a run's metrics were silently not its own. Says what it changed (for predict, only
    what changes its outputs); the predict inputs and ``num_workers`` (results do not depend on
    it) are this command's."""
    data = config.get('data')
    init_args = data.get('init_args') if hasattr(data, 'get') else None
    trained = (facts or {}).get('data') or {}
    if init_args is None:
        return
    changed = []
    for key, value in trained.items():
        if (key not in init_args or key in UNRESTORED_DATA_ARGS or flag_given(argv, f'data.{key}')
                or (key == 'root' and value is None) or _comparable(init_args[key]) == _comparable(value)):
            continue
        init_args[key] = value
        changed.append(key)
    if not first_process():
        return
    if predicting:  # its images are predict_path's, one at a time as far as results go
        changed = [key for key in changed if key not in ('root', 'batch_size') and not key.endswith('_split')]
    if 'root' in changed:
        print(f"msmlp: data: {trained['root']}, which {facts['path']} was trained on "
              '(--data.root chooses other data)', flush=True)
    settings = ', '.join(f'{key}={_comparable(trained[key])}' for key in changed if key != 'root')
    if settings:
        print(f"msmlp: data: {settings}, as {facts['path']} was trained (a --data.* flag sets one)", flush=True)


def _logger_args(trainer_config) -> list:
    loggers = trainer_config.get('logger')
    if not isinstance(loggers, list):
        return []
    found = [logger.get('init_args') for logger in loggers if hasattr(logger, 'get')]
    return [args for args in found if args is not None and args.get('save_dir') is not None]


def follow_default_root_dir(trainer_config, argv: Sequence[str]) -> None:
    """``--trainer.default_root_dir D`` on the command line puts the run folders in D
    (``D/version_N``), where Lightning users look for every output: the configs' loggers name
    ``runs/<task>`` themselves, which would otherwise win. Logger flags given too are kept."""
    if (not flag_given(argv, 'trainer.default_root_dir') or flag_given(argv, 'trainer.logger', any_suffix=True)
            or trainer_config.get('default_root_dir') is None):
        return
    root = Path(trainer_config['default_root_dir'])
    for args in _logger_args(trainer_config):
        args['save_dir'], args['name'] = str(root.parent), root.name


def _logger_folder(args) -> Path:
    return Path(args['save_dir']) / (args.get('name') or '')


def _runs_with_last(folder: Path) -> List[Tuple[int, Path]]:
    """``(N, checkpoints folder)`` of each ``version_N`` run in ``folder`` that wrote a ``last.ckpt``."""
    return [(int(run.name[len('version_'):]), run / 'checkpoints') for run in folder.glob('version_*')
            if re.fullmatch(r'version_\d+', run.name) and (run / 'checkpoints' / 'last.ckpt').is_file()]


def _newest_run_checkpoints(trainer_config) -> Tuple[Optional[Path], str]:
    """The ``checkpoints`` folder of the newest run (``version_N``) of this config's loggers
    that wrote a ``last.ckpt`` (None if none did), and the loggers' folders, for messages."""
    folders = {_logger_folder(args) for args in _logger_args(trainer_config)}
    found = [run for folder in folders for run in _runs_with_last(folder)]
    where = ', '.join(sorted(str(folder) for folder in folders))
    return (max(found)[1] if found else None), where or "the loggers' folders"


def latest_last_checkpoint(trainer_config, subcommand: str) -> Optional[str]:
    """``--ckpt_path last``: the ``last.ckpt`` of the newest run folder of this config's loggers
    (``<save_dir>/<name>/version_N/checkpoints/last.ckpt``). ``fit`` without one starts a new
    run (so one command both starts and resumes a job); other subcommands need one."""
    from tasks.base import InputError
    folder, where = _newest_run_checkpoints(trainer_config)
    if folder is not None:
        return str(folder / 'last.ckpt')
    if subcommand != 'fit':
        raise InputError(f'--ckpt_path last: no run under {where} has checkpoints/last.ckpt')
    if first_process():
        print(f'msmlp: --ckpt_path last: no run under {where} has a last.ckpt yet; starting a new run', flush=True)
    return None


def latest_best_checkpoint(trainer_config) -> str:
    """``--ckpt_path best``: the best checkpoint by ``checkpoint.monitor`` of the newest run
    folder (as for ``last``). Lightning's own ``best`` means the checkpoint callback of the same
    process, which a new command does not have."""
    from tasks.base import InputError
    folder, where = _newest_run_checkpoints(trainer_config)
    if folder is None:
        raise InputError(f'--ckpt_path best: no run under {where} has checkpoints/last.ckpt')
    return best_checkpoint_in(folder, '--ckpt_path')


def best_checkpoint_in(folder: Path, flag: str) -> str:
    """The best checkpoint of a run's ``checkpoints`` folder: the one kept there, or of several
    (``--checkpoint.save_top_k 3``) the one its ``last.ckpt`` records; ``flag`` names the option
    that asked, in the message if it has none yet."""
    from msmlp import read_checkpoint
    from tasks.base import InputError
    kept = [path for path in folder.glob('*.ckpt') if not path.name.startswith('last')]
    if len(kept) == 1:
        return str(kept[0])
    states = (read_checkpoint(folder / 'last.ckpt').get('callbacks') or {}).values() if kept else ()
    recorded = [Path(state['best_model_path']).name for state in states
                if isinstance(state, dict) and state.get('best_model_path')]
    if recorded and (folder / recorded[0]).is_file():
        return str(folder / recorded[0])
    raise InputError(f'{flag} best: {folder} holds no best checkpoint yet (one is kept at each validation); '
                     f'{flag} last takes {folder / "last.ckpt"}')


def shipped_run_folders(tasks: Sequence[str]) -> List[Path]:
    """The folders the shipped configs of ``tasks`` log their runs to (``runs/cls``, ...)."""
    import yaml
    folders = set()
    for config in sorted(path for task in tasks for path in (CONFIG_DIR / task).glob('*.yaml')):
        trainer = (yaml.safe_load(config.read_text()) or {}).get('trainer') or {}
        folders |= {_logger_folder(args) for args in _logger_args(trainer)}
    return sorted(folders)


def export_checkpoint(keyword: str, openmmlab: bool) -> str:
    """``msmlp export --checkpoint last|best``: the ``last.ckpt`` (or best checkpoint) of the run
    that wrote a ``last.ckpt`` most recently among the shipped configs' run folders (det's and
    seg's for ``--format openmmlab``). Several tasks log apart, so their newest is by time."""
    from tasks.base import InputError
    folders = shipped_run_folders(('det', 'seg') if openmmlab else TASKS)
    runs = [checkpoints for folder in folders for _, checkpoints in _runs_with_last(folder)]
    if not runs:
        where = ', '.join(str(folder) for folder in folders)
        raise InputError(f'--checkpoint {keyword}: no run under {where} has checkpoints/last.ckpt '
                         '(a run logged elsewhere: pass its file)')
    newest = max(runs, key=lambda checkpoints: (checkpoints / 'last.ckpt').stat().st_mtime)
    return str(newest / 'last.ckpt') if keyword == 'last' else best_checkpoint_in(newest, '--checkpoint')


def resumed_run_folder(ckpt_path: Optional[str], trainer_config) -> Optional[Path]:
    """The ``<save_dir>/<name>/version_N`` folder of a resumed run's ``last.ckpt``, when this
    run's loggers log to ``<save_dir>/<name>``: the run then continues in that folder. Any other
    checkpoint (a ``best-*.ckpt``: an earlier point) starts a new run folder, so that no log of
    the first run is overwritten."""
    if not ckpt_path:
        return None
    ckpt = Path(ckpt_path).resolve()
    if (not ckpt.name.startswith('last') or ckpt.parent.name != 'checkpoints'
            or not re.fullmatch(r'version_\d+', ckpt.parent.parent.name)):
        return None
    folder = ckpt.parent.parent
    if any(_logger_folder(args).resolve() == folder.parent for args in _logger_args(trainer_config)):
        return folder
    return None


def share_log_version(trainer_config, run_folder: Optional[Path] = None) -> list:
    """Give the loggers that have no version the next free ``version_N`` of their folder
    (or ``run_folder``'s, for a resumed run logging there), the same for loggers sharing a
    folder, so CSV and TensorBoard logs and the checkpoints share one run folder. Returns the
    logger ``init_args`` it changed."""
    unversioned = [args for args in _logger_args(trainer_config) if args.get('version') is None]
    folders = {}
    for args in unversioned:
        folder = _logger_folder(args)
        if folder not in folders:
            if run_folder is not None and folder.resolve() == run_folder.parent:
                folders[folder] = int(run_folder.name[len('version_'):])
            else:
                taken = [int(m.group(1)) for p in folder.glob('version_*')
                         if (m := re.fullmatch(r'version_(\d+)', p.name))]
                folders[folder] = max(taken, default=-1) + 1  # Lightning names the folder version_N
        args['version'] = folders[folder]
    return unversioned


def run_folders(logger_args: list) -> List[Path]:
    return sorted({_logger_folder(args) / f'version_{args["version"]}' for args in logger_args})


def first_missing_folder(path: Path) -> Optional[Path]:
    """The outermost folder of ``path`` that does not exist yet (None if ``path`` exists)."""
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def remove_unused(folders: Sequence[Path]) -> None:
    """Remove the folders a failed run created if it saved nothing in them: only what a run
    writes as it starts (its config, TensorBoard event files, a metrics.csv without rows);
    a checkpoint, a logged row or a prediction keeps the folder."""
    if not first_process():
        return
    for folder in folders:
        if folder.is_dir() and not any(_is_output(path) for path in folder.rglob('*')):
            shutil.rmtree(folder, ignore_errors=True)


def _is_output(path: Path) -> bool:
    from tasks.checkpointing import csv_data_rows
    if not path.is_file() or path.name in ('config.yaml', 'hparams.yaml') or path.name.startswith('events.out.'):
        return False
    return path.name != 'metrics.csv' or bool(csv_data_rows(path))


def continue_logs(loggers: Sequence, run_folder: Path, log_state: dict) -> None:
    """Let a resumed run's loggers continue the logs of its folder from the checkpoint on:
    ``metrics.csv`` keeps the rows written before the checkpoint (Lightning's CSVLogger
    would delete the file), TensorBoard hides the killed run's events after its step."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from tasks.checkpointing import truncate_csv
    rows, purge_step = log_state.get('csv_rows'), log_state.get('purge_step')
    for logger in loggers:
        if Path(logger.log_dir).resolve() != run_folder:
            continue
        if isinstance(logger, TensorBoardLogger) and purge_step is not None and logger._experiment is None:
            # the killed run's events from this step on came after the checkpoint; they are redone
            # (LightningCLI passes purge_step=None unless it was given)
            if logger._kwargs.get('purge_step') is None:
                logger._kwargs['purge_step'] = int(purge_step)
        elif isinstance(logger, CSVLogger) and first_process():
            metrics = Path(logger.log_dir) / 'metrics.csv'
            kept = metrics.read_bytes() if metrics.is_file() else None
            with warnings.catch_warnings():
                warnings.filterwarnings('ignore', message='Experiment logs directory')
                writer = logger.experiment  # Lightning's writer deletes metrics.csv here
            if kept is not None:
                metrics.write_bytes(kept)
                writer.metrics_keys = truncate_csv(metrics, sys.maxsize if rows is None else rows)


def first_process() -> bool:
    """Whether this is the run's first process, before Lightning has set up its ranks (its
    ``ddp`` launcher starts the others with LOCAL_RANK and NODE_RANK; torchrun sets RANK,
    SLURM SLURM_PROCID, which Lightning's ``rank_zero_only.rank`` reads at import)."""
    from lightning.pytorch.utilities import rank_zero_only
    return rank_zero_only.rank == 0 and int(os.environ.get('NODE_RANK', os.environ.get('GROUP_RANK', 0))) == 0


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
            metrics = Path(logger.log_dir) / 'metrics.csv'
            lines.append(f'  CSV metrics:     {metrics}' if metrics.is_file() else
                         f'  CSV metrics:     none logged (no validation, and fewer steps than '
                         f'--trainer.log_every_n_steps {trainer.log_every_n_steps})')
        elif isinstance(logger, TensorBoardLogger):
            lines.append(f'  TensorBoard:     tensorboard --logdir {logger.log_dir}')
    print('\n'.join(lines))


def versions() -> str:
    """``msmlp 0.1.0 (torch ..., lightning ..., ...)``: this package's version and those of the
    libraries it runs on that are installed, for bug reports."""
    from importlib.metadata import PackageNotFoundError, version
    found = []
    for name in ('msmlp', 'torch', 'lightning', 'timm', 'mmengine', 'mmcv', 'mmdet', 'mmsegmentation', 'triton'):
        try:
            found.append(f'{name} {version(name)}')
        except PackageNotFoundError:
            pass
    return f'{found[0]} ({", ".join(found[1:])}; Python {sys.version.split()[0]})'


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``msmlp`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['benchmark']:
        from msmlp.benchmark import main as benchmark_main
        return benchmark_main(argv[1:]) or 0
    if argv[:1] == ['export']:
        from msmlp.export import main as export_main
        return export_main(argv[1:], checkpoint_keyword=export_checkpoint)
    if argv[:1] == ['--version']:
        print(versions())
        return 0
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
        print(f'msmlp: error: {task_config(task)} is missing: this installation of msmlp is incomplete '
              '(reinstall it)', file=sys.stderr)
        return 2
    from msmlp import CheckpointError
    from tasks.base import InputError
    debug = bool(os.environ.get('MSMLP_DEBUG'))  # the traceback of an input error too
    try:
        argv = resolve_config_args(argv, task)
        run_lightning(task, argv)
    except (InputError, CheckpointError) as err:
        if debug:
            raise
        print(f'msmlp: error: {_last_line(err)}', file=sys.stderr)
        return 1
    except ValueError as err:
        reason = _rejected_init_args(err)
        if reason is None or debug:
            raise
        print(f'msmlp: error: {reason}', file=sys.stderr)
        return 1
    except SIGTERMException:
        return stopped_by('SIGTERM', argv)
    except KeyboardInterrupt:  # Ctrl-C before or after the trainer's own handling
        return stopped_by('Ctrl-C', argv)
    except SystemExit as exit_:
        if isinstance(exit_.__context__, KeyboardInterrupt):  # Lightning's shutdown after Ctrl-C exits with 1
            return stopped_by('Ctrl-C', argv)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0


def stopped_by(cause: str, argv: Sequence[str]) -> int:
    """Say that a signal stopped the run, and for ``fit`` how to resume it; return the shell's
    status for the signal (130 for Ctrl-C, 143 for SIGTERM), so that ``msmlp fit ... && msmlp
    test ...`` stops there."""
    if first_process():
        resume = ('; the same command with --ckpt_path last resumes from the last checkpoint'
                  if argv[:1] == ['fit'] else '')
        print(f'msmlp: stopped by {cause}{resume}', file=sys.stderr, flush=True)
    return 128 + (signal.SIGINT if cause == 'Ctrl-C' else signal.SIGTERM)


if __name__ == '__main__':
    sys.exit(main())
