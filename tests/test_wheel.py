"""The installed package stands alone: a wheel (not an editable install) in a fresh virtual
environment, outside the repository, runs `python -m ddep_jax.main --helpfull` and imports every
`ddep_jax` module.

Nothing is downloaded: the wheel is built with the setuptools of this environment
(`--no-build-isolation`), installed with `--no-deps --no-index`, and the fresh environment sees
this environment's site-packages (jax, TensorFlow, ...) through a `.pth` file, after its own.
That directory's `.pth` files (the editable install of the repository) are not run, so
`ddep_jax` can only come from the wheel, which the test checks.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'ddep_jax'


def _run(argv, cwd, env=None, timeout=300, ok_codes=(0,)):
  result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
  assert result.returncode in ok_codes and 'Traceback' not in result.stderr, (f'{argv} failed ({result.returncode}):\n'
                                  f'{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
  return result


def _source_modules() -> list[str]:
  """Every module of the package in the source tree: what the wheel must ship."""
  modules = []
  for directory, dirnames, filenames in os.walk(os.path.join(REPO, PACKAGE)):
    dirnames[:] = sorted(d for d in dirnames if d != '__pycache__')
    package = os.path.relpath(directory, REPO).replace(os.sep, '.')
    for filename in sorted(filenames):
      if filename.endswith('.py'):
        stem = filename[:-3]
        modules.append(package if stem == '__init__' else f'{package}.{stem}')
  return sorted(modules)


_IMPORT_ALL = textwrap.dedent("""\
    import importlib, json, pkgutil, sys
    import ddep_jax
    names = sorted(['ddep_jax'] + [m.name for m in pkgutil.walk_packages(ddep_jax.__path__,
                                                                         'ddep_jax.')])
    for name in names:
      importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('configs', 'experiments'))
    print(json.dumps({'file': ddep_jax.__file__, 'modules': names, 'leaked': leaked}))
    """)


def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
  # The wheel, built from a copy of what setup.py packages (nothing is written into the repo).
  source = tmp_path / 'source'
  source.mkdir()
  for name in ('setup.py', 'README.md'):
    shutil.copy(os.path.join(REPO, name), source / name)
  shutil.copytree(os.path.join(REPO, PACKAGE), source / PACKAGE,
                  ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  wheels = tmp_path / 'wheels'
  _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
        '--quiet', '-w', str(wheels), str(source)], cwd=tmp_path)
  (wheel,) = [w for w in os.listdir(wheels) if w.endswith('.whl')]
  assert wheel.startswith(f'{PACKAGE}-') and 'py3' in wheel, wheel

  # A fresh environment over this one's site-packages, the wheel installed into it.
  venv = tmp_path / 'venv'
  _run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], cwd=tmp_path)
  python = str(venv / 'bin' / 'python')
  site_packages = _run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                       cwd=tmp_path).stdout.strip()
  with open(os.path.join(site_packages, '_parent_env.pth'), 'w', encoding='utf-8') as f:
    f.write(sysconfig.get_paths()['purelib'] + '\n')
  _run([sys.executable, '-m', 'pip', '--python', python, 'install', '--no-deps', '--no-index',
        '--quiet', str(wheels / wheel)], cwd=tmp_path)

  # Outside the repository, with nothing of it on the path.
  outside = tmp_path / 'elsewhere'
  outside.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  # absl prints the help of every flag and exits with status 1.
  help_text = _run([python, '-m', 'ddep_jax.main', '--helpfull'], cwd=outside, env=env,
                   ok_codes=(0, 1)).stdout
  # absl heads the trainer's flags with the path of the main.py it ran: the wheel's.
  main_py = os.path.join(os.path.realpath(site_packages), PACKAGE, 'main.py')
  assert f'{main_py}:' in help_text, help_text[:2000]
  assert '--config' in help_text and '--workdir' in help_text, help_text[-2000:]

  report = _run([python, '-c', _IMPORT_ALL], cwd=outside, env=env).stdout
  report = json.loads(report.strip().splitlines()[-1])
  assert os.path.realpath(report['file']).startswith(os.path.realpath(site_packages)), report
  assert report['modules'] == _source_modules()
  assert report['leaked'] == []  # The package imports neither configs nor experiments.
