"""A Google Cloud Storage emulator on 127.0.0.1 for tests that put work directories on `gs://`.

`running()` starts `gcp_storage_emulator` (PyPI) in a child process, in memory, with one bucket,
and yields the environment variables that point the GCS clients of this codebase at it:

* `TENSORSTORE_GCS_HTTP_URL` (+ a fixed test token): TensorStore, which Orbax writes arrays with
  and `checkpoints.verify_checkpoint` reads them with;
* `EPATH_USE_TF=false` + `STORAGE_EMULATOR_HOST`: `etils.epath`, which Orbax and `ddep_jax.fileio`
  use for every other file, then goes through fsspec's `gcsfs`, which honours the emulator host.

TensorFlow's own GCS client (`tf.io.gfile`, `tf.data`, `tf.summary`) has no endpoint setting (its
host is compiled in, https only), so what reaches GCS through TensorFlow cannot be tested here.

The child reads its stdin until EOF and then exits, so it ends with the test process even when
that is killed; `running()` also stops it on exit and bounds the start-up wait.
"""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

BUCKET = 'ddep-test'
START_TIMEOUT_S = 30

# Serves until stdin closes: no emulator outlives the test process that started it.
# The emulator's downloads lack the `x-goog-generation` header of real GCS, which TensorStore's
# OCDBT driver reads back ("Malformed StorageGeneration" otherwise): the wrapper adds it.
_SERVER = '''
import os, sys
from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects
download = objects.download

def download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = obj['generation']
  except Exception:  # Not found: download() answers 404.
    pass
  return download(request, response, storage, *args, **kwargs)

objects.download = download_with_generation
server.HANDLERS = tuple((regex, {method: download_with_generation if f is download else f
                                 for method, f in handlers.items()})
                        for regex, handlers in server.HANDLERS)
server.create_server(sys.argv[1], int(sys.argv[2]), in_memory=True,
                     default_bucket=sys.argv[3]).start()
sys.stdin.read()
os._exit(0)
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
  """Variables that point TensorStore, etils.epath / gcsfs (and google-cloud-storage) at `url`."""
  return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          # TensorStore asks for credentials before each request; this token skips the look-up
          # of real ones (metadata server, gcloud files).
          'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator', 'EPATH_USE_TF': 'false',
          # gcsfs would ask the real control plane (gRPC, no emulator) whether the bucket is zonal.
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}


@contextlib.contextmanager
def running():
  """Starts the emulator; yields the environment (a dict) that points the clients at it."""
  port = _free_port()
  with tempfile.TemporaryFile('w+') as log:
    # The emulator prints a traceback for every client that hangs up early: keep them out of
    # the test output, and show them only if the start fails.
    process = subprocess.Popen([sys.executable, '-c', _SERVER, '127.0.0.1', str(port), BUCKET],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                               text=True)
    try:
      deadline = time.monotonic() + START_TIMEOUT_S
      while True:
        try:
          socket.create_connection(('127.0.0.1', port), timeout=1).close()
          break
        except OSError:
          if process.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise RuntimeError(f'GCS emulator did not start on 127.0.0.1:{port}:\n{log.read()}')
          time.sleep(0.1)
      yield environment(f'http://127.0.0.1:{port}')
    finally:
      process.stdin.close()
      try:
        process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def patched_environ(variables: dict[str, str]):
  """Sets `variables` in os.environ for the block, restoring the previous values after."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  previous = {k: os.environ.get(k) for k in variables}
  os.environ.update(variables)
  # etils reads EPATH_USE_TF once per process; processes started with it set need no such reset.
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  try:
    yield
  finally:
    for k, v in previous.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
