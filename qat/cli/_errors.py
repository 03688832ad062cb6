"""How every command ends on an error: one line on stderr, ``error: <message>``, and exit code 1.

An error caused by the user's input (a bad setting or argument, a missing or unwritable path, a damaged
export, data that does not fit) is reported in that one line; the traceback is printed first only when the
command runs verbose (``verbose=true`` for ``qat-export`` / ``qat-eval``, ``--verbose`` for
``qat-report``, ``hydra.verbose=true`` for ``qat-train`` / ``qat-mixed``). Anything else is a bug and
keeps its full traceback. docs/errors.md lists the messages.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import NoReturn


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


HYDRA_VERBOSE_FLAG = "hydra.verbose=true"


def hydra_verbose() -> bool:
    """Whether a Hydra app (``qat-train``, ``qat-mixed``) runs with ``hydra.verbose`` set (true or logger
    names: ``hydra.verbose=qat`` keeps the other libraries' debug logging off)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and bool(HydraConfig.get().verbose)


def _user_error_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(our errors, other libraries' errors) that the user's input causes. Imported when an error happened,
    so that a quick tool (``qat-report``) does not load the training stack just to name them."""
    from hydra.errors import ConfigCompositionException, InstantiationException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from qat.config import QuantConfigError
    from qat.deploy import ExportError, ExportFormatError, VerificationError
    from qat.report import ReportError
    from qat.runs import RunDirError
    from qat.train.job import JobConfigError
    from qat.train.module import NonFiniteLossError

    ours = (
        ArgError,
        QuantConfigError,
        JobConfigError,
        NonFiniteLossError,
        RunDirError,
        ExportError,
        ExportFormatError,
        VerificationError,
        ReportError,
    )
    # A file or directory that is missing, unreadable or unwritable; a config that does not compose (an
    # unknown key or config file, a value of the wrong type); a `_target_` that rejects its arguments.
    theirs = (
        OSError,
        OmegaConfBaseException,
        ConfigCompositionException,
        OverrideParseException,
        InstantiationException,
    )
    return ours, theirs


class ArgError(ValueError):
    """A command's own key has a value it does not take; the message names the key and what is allowed."""


def check_choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ArgError(f"{key}: {value!r} is not valid; allowed: {', '.join(allowed)}")


# What a typed config node takes, by its OmegaConf node class.
_WORDS = {"BooleanNode": "true, false", "IntegerNode": "an integer", "FloatNode": "a number",
          "StringNode": "a string", "ListConfig": "a list, e.g. [a, b]",
          "DictConfig": "a mapping"}  # fmt: skip


def _composition_error(e: BaseException) -> str | None:
    """A config that does not compose, in our words: an unknown key with the keys its node has, a value of
    the wrong type with the type it must have, an unknown config file with the group's files."""
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    if not isinstance(e, ConfigCompositionException):
        return None
    cause = e.__cause__ or e.__context__
    if isinstance(e, MissingConfigException) and e.options and e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")
        return f"{group}: {name!r} is not valid; allowed: {', '.join(e.options)}"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.parent_node is not None:
        keys = [str(k) for k in cause.parent_node if k != "hydra"]
        return f"{cause.full_key}: unknown field; allowed: {', '.join(keys)}"
    if isinstance(cause, ValidationError) and cause.full_key and cause.child_node is not None:
        words = _WORDS.get(type(cause.child_node).__name__, type(cause.child_node).__name__)
        null = ", or null" if cause.child_node._is_optional() else ""
        return f"{cause.full_key}: {cause.value!r} is not valid; allowed: {words}{null}"
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:  # e.g. an element of a typed list
        return f"{cause.full_key}: {cause.msg.splitlines()[0]}"
    return None


def one_line(e: BaseException, verbose_flag: str = "") -> str:
    """The message of ``e`` on one line. Another library's error also gets its type and the flag that
    shows its traceback (ours name the key, the bad value and the allowed values already)."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    composed = _composition_error(e)
    if composed is not None:
        return composed
    if isinstance(e, MissingMandatoryValue):
        text = f"{e.full_key}: missing (??? in the config); allowed: any value, e.g. {e.full_key}=<value>"
    elif isinstance(e, OmegaConfBaseException) and e.full_key:
        text = f"{e.full_key}: {e.msg}"
    else:
        text = str(e) or type(e).__name__
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    ours, _ = _user_error_types()
    if isinstance(e, ours) or not verbose_flag:
        return text
    return f"{text} ({type(e).__name__}; {verbose_flag} shows the traceback)"


@contextmanager
def exit_on_user_error(
    verbose: bool, verbose_flag: str, codes: Mapping[type[BaseException], int] | None = None
) -> Iterator[None]:
    """Around a command's work: a user error ends it with one line and exit code 1 (``codes`` maps error
    types to other exit codes); ``verbose`` prints the traceback before that line. ``verbose_flag`` is how
    the user turns it on (named in the line of another library's error). Other errors propagate."""
    try:
        yield
    except Exception as e:
        ours, theirs = _user_error_types()
        if not isinstance(e, (*ours, *theirs)):
            raise
        if verbose:
            traceback.print_exc()
        code = next((c for t, c in (codes or {}).items() if isinstance(e, t)), 1)
        fail(one_line(e, "" if verbose else verbose_flag), code)
