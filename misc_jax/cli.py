"""What the project's commands share: path flags that expand `~` and environment variables, and console
scripts (misc-jax-evaluate, misc-jax-predict) whose --help shows the command's description and flags as
`python -m` does."""

import os
import sys

from absl import app
from absl import flags


def expand(path: str | None) -> str | None:
  """'~/x' and '$HOME/x' -> the paths they name; URLs (gs://...) and None unchanged."""
  if not path or '://' in str(path):
    return path
  return os.path.expandvars(os.path.expanduser(str(path)))


class _PathParser(flags.ArgumentParser):
  """A string flag whose value has `~` and $VARIABLES expanded (quoted values reach the program as
  typed: `--workdir '$RUN'` or `--output=~/x.json`)."""

  def parse(self, argument):
    return expand(argument)

  def flag_type(self):
    return 'path'


def _module_name(name: str) -> str:
  """absl files flags under the module that defined them; a module run as __main__ goes by sys.argv[0]."""
  return sys.argv[0] if name == '__main__' else name


def DEFINE_path(name: str, default: str | None, help: str, **kwargs):  # pylint: disable=invalid-name,redefined-builtin
  """flags.DEFINE_string for a file or directory: the value is expanded (`expand`)."""
  module = _module_name(sys._getframe(1).f_globals['__name__'])  # pylint: disable=protected-access
  return flags.DEFINE(_PathParser(), name, default, help, serializer=flags.ArgumentSerializer(),
                      module_name=module, **kwargs)


def run(main, define_flags, module_name: str) -> None:
  """Runs a command from its console script: defines its flags and lets --help show the module's
  docstring and flags (absl's help shows those of __main__, which a console script is not)."""
  define_flags()
  module = sys.modules[module_name]
  main_module = sys.modules['__main__']
  if main_module is not module:
    main_module.__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(_module_name(module_name)):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main)
