"""The package's layering: every module imports only its own layer and the layers below it.

Read from the source (every `import` / `from ... import`, those inside functions too), so a lazy
import cannot hide an upward dependency.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'ipsr_jax'

# Lowest first. A module may import from its own layer and any layer before it.
LAYERS = (
    ('runtime',),                       # devices, console, paths, run folders, checkpoints
    ('ops',),                           # array operations: resizing, pixels, batching
    ('models',),                        # networks and their weight readers
    ('data',),                          # image I/O, sources, the Grain pipeline, degradation
    ('serving',),                       # trained models as batched functions, export
    ('evaluation',),                    # protocols, metrics, reports
    ('config',),                        # the config's checks (of every part's settings)
    ('training',),                      # the loop, the trainers, losses, the AOT compile
    ('experiments',),                   # the staged runs
    ('api', 'main', 'tools'),           # what users call
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _part(module: str) -> str | None:
  """'ipsr_jax.training.train' -> 'training'; None outside the package or for the package itself."""
  parts = module.split('.')
  return parts[1] if parts[0] == 'ipsr_jax' and len(parts) > 1 else None


def _imports(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == 'ipsr_jax':  # from ipsr_jax import api
        for alias in node.names:
          yield node.lineno, f'ipsr_jax.{alias.name}'
      else:
        yield node.lineno, node.module


def _modules():
  return sorted(p for p in PACKAGE.rglob('*.py') if p.name != '__init__.py' or p.parent != PACKAGE)


def test_every_module_belongs_to_a_layer():
  parts = {_part('.'.join(('ipsr_jax',) + p.relative_to(PACKAGE).with_suffix('').parts)) for p in _modules()}
  assert parts <= set(LAYER), sorted(parts - set(LAYER))


@pytest.mark.parametrize('path', _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_upward(path):
  own = _part('.'.join(('ipsr_jax',) + path.relative_to(PACKAGE).with_suffix('').parts))
  upward = [f'line {line}: {module}' for line, module in _imports(path)
            if _part(module) is not None and LAYER[_part(module)] > LAYER[own]]
  assert not upward, f'{path.relative_to(PACKAGE)} ({own}) imports a higher layer: {upward}'


def test_the_check_sees_an_upward_import(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def f():\n  from ipsr_jax.training import train\n  from ipsr_jax import api\n')
  assert [m for _, m in _imports(bad)] == ['ipsr_jax.training', 'ipsr_jax.api']
  assert LAYER[_part('ipsr_jax.training')] > LAYER['runtime'] and LAYER[_part('ipsr_jax.api')] > LAYER['runtime']
