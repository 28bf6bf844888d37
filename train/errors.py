"""User errors: a config, pattern, model, data, plan or checkpoint that the job refuses. `exit_on_user_error` turns
one into a single `error: <message>` line on stderr (rank 0) and exit status 2, with no traceback;
HYDRA_FULL_ERROR=1 lets it through, so that Hydra prints the traceback."""
from __future__ import annotations

import contextlib
import os
import sys
import time

from distill.adapters.family import NotDSAModelError
from distill.export import ExportError
from distill.files import CheckpointFileError
from distill.pattern import PatternError
from distill.source import ModelConfigError
from train.checkpoint import CheckpointError
from train.data import DataError
from train.distributed import is_rank0
from train.plan import PlanError
from train.run_dir import RunDirInUse

EXIT_STATUS = 2
# the other ranks exit this much later than rank 0: torch.distributed.run stops every worker once one has failed,
# and rank 0, which meets the same error at about the same time, is to say it first
OTHER_RANKS_DELAY_S = 2.0


class ConfigError(ValueError):
    """A config key, or a combination of keys, that the job cannot run with."""


# every error a user's setting, file or second launch causes (Fp8FormatError is a ModelConfigError,
# DamagedCheckpoint a CheckpointError)
USER_ERRORS = (ConfigError, ModelConfigError, NotDSAModelError, PatternError, CheckpointError, CheckpointFileError,
               DataError, PlanError, ExportError, RunDirInUse)


@contextlib.contextmanager
def exit_on_user_error():
    """A user error raised inside: its message once (rank 0, or wherever the rank is not known) and exit status 2.
    Under HYDRA_FULL_ERROR=1 it propagates with its traceback."""
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if is_rank0():
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(OTHER_RANKS_DELAY_S)
        sys.exit(EXIT_STATUS)
