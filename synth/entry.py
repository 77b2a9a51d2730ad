"""What the entry points share: a one-line error and a non-zero exit for bad input, multirun-safe."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from synth.config import group_options
from synth.sweep import FAILED_MARKER

log = logging.getLogger("synth")
USER_ERRORS = (ValueError, FileNotFoundError)
# OSErrors that mean "this folder cannot take the outputs" (read-only, not a folder, full), not a bug.
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST, errno.EISDIR,
                errno.ENOTDIR}
_task_errors: list[BaseException] = []  # what a task raised: the entry point's wrapper lets these through as they are


def run_entry_point(main: Callable, script: str, groups: tuple[str, ...], text_keys=(), list_keys=()) -> None:
    """`python infer.py|train.py ...`: the command line checked and prepared, then Hydra's main(), with every
    failure outside the task itself as one line on stderr.

    Free-text values are quoted for Hydra (synth.cli_args), an override Hydra's grammar cannot read and an
    unknown group choice are refused before Hydra starts; composition errors (an unknown key, a missing
    config), a run folder that cannot be written and Ctrl-C become one line. An exception the task raised
    (a bug) propagates unchanged. With HYDRA_FULL_ERROR=1 set by the user, Hydra's own reports are kept.
    """
    from synth import cli_args

    keep_hydra_reports = bool(os.environ.get("HYDRA_FULL_ERROR"))
    try:
        try:
            argv = cli_args.prepare_argv(sys.argv[1:], text_keys, list_keys)
            cli_args.check_syntax(argv, script)
        except USER_ERRORS as error:
            fail(first_line(error))
        check_group_choices(argv, groups)
        sys.argv[1:] = argv
        cli_args.quote_sweep_jobs()
        if not keep_hydra_reports:
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its block: one line below
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if keep_hydra_reports or any(error is task_error for task_error in _task_errors):
            raise
        report = startup_error(error, script, sys.argv[1:])
        if report is None:
            raise
        fail(*report)


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def startup_error(error: Exception, script: str, argv: list[str]) -> tuple[str, int] | None:
    """One line (and exit code) for a failure of Hydra before or between tasks, or None for anything else."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    os_error = _os_cause(error)
    if os_error is not None:
        return f"cannot write the run folder: {_describe_os_error(os_error)}; choose a writable hydra.run.dir " \
               "(hydra.sweep.dir with -m)", 1
    if isinstance(error, MissingConfigException):
        group, _, choice = str(error.missing_cfg_file).rpartition("/")
        options = f"choose one of: {', '.join(error.options)}" if error.options else f"conf/{group}/ has none yet"
        return f"{group}={choice}: no such {group} config; {options}", 2
    key = getattr(error.__cause__, "full_key", None)
    if isinstance(error, HydraException) and key and "is not in struct" in str(error.__cause__):
        arg = next((a for a in argv if a.split("=", 1)[0].lstrip("+~") == key), key)
        guess = _nearest_key(key, script, argv)
        hint = f"; did you mean {guess}?" if guess else ""
        return f"{arg}: {key} is not a key of {script}{hint} (python {script} --help lists the keys)", 2
    if isinstance(error, (HydraException, OmegaConfBaseException)):
        cause = f" ({first_line(error.__cause__)})" if isinstance(error.__cause__, OmegaConfBaseException) else ""
        return first_line(error) + cause, 2
    return None


def _os_cause(error: BaseException | None) -> OSError | None:
    """The OSError behind error (Hydra and logging wrap it), if it is one about writing to a folder."""
    from hydra.errors import HydraException

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        # ENOENT too: before the task, a missing path is the run folder Hydra could not create
        if isinstance(error, OSError) and not isinstance(error, HydraException) and error.errno in {*WRITE_ERRNOS, errno.ENOENT}:
            return error
        error = error.__cause__ or error.__context__
    return None


def _describe_os_error(error: OSError) -> str:
    if not error.filename:
        return str(error)
    if error.errno == errno.EEXIST:  # mkdir of a path that is a file: "File exists" would not say what is wrong
        return f"{error.filename}: a file is there, not a folder"
    return f"{error.filename}: {error.strerror}"


def _nearest_key(key: str, script: str, argv: list[str]) -> str | None:
    """The key of the config (composed with the command line's group choices) nearest to a mistyped one."""
    from hydra import compose, initialize_config_dir

    from synth import cli_args
    from synth.config import CONF_DIR

    config_name = Path(script).stem
    groups = [a for a in argv if re.fullmatch(r"[a-z_]+=[\w.-]+", a) and (CONF_DIR / a.split("=")[0]).is_dir()]
    for overrides in (groups, []):
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name=config_name, overrides=overrides)
            return cli_args.nearest_key(key, cli_args.config_keys(cfg))
        except Exception:  # noqa: BLE001  (only a suggestion: a config that does not compose gives none)
            continue
    return None


def check_group_choices(argv: list[str], groups: tuple[str, ...]) -> None:
    """Refuse an unknown config-group choice (model=foo) in one line, before Hydra composes anything."""
    for arg in argv:
        match = re.fullmatch(r"([a-z_]+)=([^(\[]*)", arg)  # leaves sweeps like range(...) to Hydra
        if match is None or match.group(1) not in groups:
            continue
        group, options = match.group(1), group_options(match.group(1))
        for choice in filter(None, match.group(2).split(",")):
            if choice not in options:
                choices = f"choose one of: {', '.join(options)}" if options else f"conf/{group}/ has none yet"
                fail(f"unknown {group} {choice!r}; {choices}")


def run_task(task: Callable, cfg):
    """Run task(cfg); a user error becomes one line on stderr and exit code 2.

    In a multirun any failure is logged and marked in the job's folder (the contact sheet shows it as an
    empty cell), and the sweep goes on with the next job.
    """
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun and "joblib" in str(HydraConfig.get().launcher.get("_target_", "")).lower():
        pin_gpu(Path(HydraConfig.get().sweep.dir))
    try:
        return task(cfg)
    except Exception as error:
        message = first_line(error)
        write_error = isinstance(error, OSError) and error.errno in WRITE_ERRNOS
        if write_error:
            message = f"cannot write the outputs: {_describe_os_error(error)}"
        if multirun:
            log.error("job failed: %s", message, exc_info=not isinstance(error, USER_ERRORS) and not write_error)
            try:
                (Path(HydraConfig.get().runtime.output_dir) / FAILED_MARKER).write_text(message + "\n")
            except OSError:  # the job's folder itself cannot be written: the log line above is all there is
                pass
            return None
        if write_error:
            fail(message, 1)
        if not isinstance(error, USER_ERRORS):
            _task_errors.append(error)
            raise
        fail(message)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def pin_gpu(sweep_dir: Path, gpu_count: int | None = None) -> int | None:
    """Give this worker process one GPU of several (CUDA_VISIBLE_DEVICES), for launchers that run jobs in
    parallel worker processes (joblib). Each worker claims the next free slot in the sweep folder once,
    before CUDA starts; with more workers than GPUs the slots wrap around. Returns the GPU index, or None
    where there is nothing to choose."""
    if "SYNTH_PINNED_GPU" in os.environ:
        return int(os.environ["SYNTH_PINNED_GPU"])
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count()  # asks the driver without starting CUDA in this process
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in visible.split(",") if i.strip()] if visible else [str(i) for i in range(gpu_count)]
    if len(ids) < 2:
        return None  # one GPU or none: nothing to choose
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for slot in itertools.count():
        try:
            os.close(os.open(sweep_dir / f".gpu-slot-{slot}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            continue
    gpu = ids[slot % len(ids)]
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["SYNTH_PINNED_GPU"] = gpu
    log.info("worker %d runs on GPU %s of %s", os.getpid(), gpu, ",".join(ids))
    return int(gpu)
