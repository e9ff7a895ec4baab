"""``deepflow data prepare NAME``: a TFDS dataset downloaded and written as ArrayRecord, the
format deepflow reads without TensorFlow (``tfds:NAME`` sources).

This is the one step that needs network (and, for the TFDS builders that parse their archives
with it, TensorFlow); training on the prepared directory needs neither. Failures a user can fix
(an unknown name, no network, files to download by hand, files other than those TFDS records
the checksums of, TensorFlow missing) are one-line ``ConfigError``s saying what to do.
"""
from __future__ import annotations

import importlib
import re
import socket
from typing import Any, Sequence

from deepflow.registry import ConfigError

FILE_FORMAT = "array_record"


def prepare(spec: str, data_dir: str, *, manual_dir: str | None = None,
            imports: Sequence[str] = ()) -> tuple[Any, bool]:
  """Prepares TFDS dataset ``spec`` (``NAME[/CONFIG][:VERSION]``) in ``data_dir`` as ArrayRecord,
  after importing the modules ``imports`` (which register builders of one's own); returns the
  builder and whether it was prepared now (False: it already was)."""
  import tensorflow_datasets as tfds
  for module in imports:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ConfigError(f"--imports: cannot import {module!r}: {e}") from e
  name = spec.split("/")[0].split(":")[0]
  try:
    builder = tfds.builder(spec, data_dir=data_dir, file_format=FILE_FORMAT)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(f"unknown TFDS dataset {name!r} (names as in the TFDS catalog, e.g. "
                      f"cifar10, imagenet2012; a builder of one's own: --imports MODULE)") from e
  except (ValueError, AssertionError) as e:  # an unknown config or version of a known dataset
    raise ConfigError(f"TFDS dataset {spec!r}: {_first_line(e)}") from e
  if builder.is_prepared():
    return builder, False
  tfds.display_progress_bar(True)
  try:
    builder.download_and_prepare(
        file_format=FILE_FORMAT,
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # noqa: BLE001  (those a user can fix become one line; others raise)
    message = _explain(e, name, data_dir, manual_dir)
    if message is None:
      raise
    raise ConfigError(message) from e
  return builder, True


def report(builder: Any, spec: str, data_dir: str, now: bool) -> str:
  """One line: what was prepared where, its splits, and how to train on it."""
  splits = ", ".join(f"{name} {split.num_examples}" for name, split in builder.info.splits.items())
  return (f"{builder.info.full_name} {'prepared' if now else 'already prepared'} in {data_dir} "
          f"({splits}); train on it with --config.data.source=tfds:{spec} "
          f"--config.data.data_dir={data_dir}")


def _explain(error: BaseException, name: str, data_dir: str, manual_dir: str | None
             ) -> str | None:
  """What to do about a failed preparation, or None when it is not one a user can fix."""
  for e in _chain(error):
    if isinstance(e, ImportError) and (e.name or "").split(".")[0] == "tensorflow":
      return (f"TFDS builds {name!r} with TensorFlow, which is not installed: `pip install "
              f"tensorflow` for this step (training on the prepared data never needs it)")
    if _is_network_error(e):
      return (f"could not download {name!r} ({type(e).__name__}): preparing needs network to "
              f"the dataset's hosts; run this where there is network and copy {data_dir} over")
    if type(e).__name__ == "NonMatchingChecksumError":  # tfds.core.download.download_manager
      return _wrong_checksum(str(e), name, manual_dir)
    if isinstance(e, AssertionError) and "Manual directory" in str(e):
      where = f"--manual_dir {manual_dir} is empty or missing" if manual_dir else (
          "pass --manual_dir DIR")
      return (f"{name!r} needs files downloaded by hand (see its TFDS catalog page) in a "
              f"directory: {where}")
  return None


def _wrong_checksum(message: str, name: str, manual_dir: str | None) -> str:
  """TFDS ships the size and SHA-256 of every file a dataset is built from: a file that differs
  (another mirror, recompressed, a newer release) is not the data the dataset describes."""
  path = re.search(r"downloaded to (.+?), has wrong checksum", message)
  sizes = re.findall(r"UrlInfo\(size=([^,]+),", message)
  what = path.group(1) if path else "a file"
  if len(sizes) == 2:
    what += f" ({sizes[1]}; TFDS expects {sizes[0]})"
  fix = (f"`tfds build {name} --manual_dir {manual_dir} --register_checksums` records theirs "
         f"in place of TFDS's own") if manual_dir else "retry, or download them by hand"
  return (f"{what} does not have the checksum TFDS records for {name!r}: the file comes from "
          f"another source or was repackaged; use the original files (the dataset's TFDS "
          f"catalog page names them) or, if these are right, {fix}")


def _chain(error: BaseException):
  """The error and the ones it was raised from or during."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _is_network_error(e: BaseException) -> bool:
  if isinstance(e, (socket.gaierror, socket.timeout, ConnectionError)):
    return True
  try:
    import requests
  except ImportError:
    return False
  return isinstance(e, (requests.ConnectionError, requests.Timeout))


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__
