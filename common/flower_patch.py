"""What fedtune changes inside Flower at run time (`pace = "fast"`), and the guard on each change.

Flower 1.39 has no setting for the waits that made a deployed round slow (BENCHMARKS.md). A patch
here, or in client/supernode.py, runs only on `FLOWER_VERSION` and only when the functions it
relies on have the source digests it was written against; otherwise it says why and Flower runs
as it is. tests/test_flower_pins.py fails when an upgrade changes any of them.

The patch in this module: Flower splits every message into content-addressed objects, and a
receiver that looks before the sender finished uploading them retries each missing object after
1 s, doubling up to 10 s (`PULL_INITIAL_BACKOFF`, `PULL_BACKOFF_CAP` in flwr/supercore/constant.py).
With short polls a receiver nearly always looks that early for a heavy message (the global weights,
a masked update), so each one waited 1-3 s on that backoff. `shorten_object_pulls()` makes the
first retry come after `FIRST_RETRY` and the longest wait `RETRY_CAP`, with as many tries as keep
Flower's patience (its tries times its cap), in the process that calls it: the coordinator's
ServerApp, the SuperNode and the bundle gate, whose forked ClientApps inherit it.

And `reuse_installed_bundles()`, in the bundle gate for its forks: every ClientApp (one per message)
calls Flower's `install_from_fab`, which unzips the whole bundle into a temporary folder, hashes
every file against the bundle's manifest, and then, finding the bundle's folder already installed,
returns that folder and deletes what it unzipped (0.02-0.06 s a message). The patched one reads
only the bundle's `pyproject.toml`, asks Flower's `get_project_dir` for the bundle's folder (named
as `validate_and_install` names it), and returns that folder when it holds this bundle; otherwise
Flower installs it. Flower names the folder by only 8 hex digits of the bundle's SHA-256 and reuses
whatever it finds there, so two approved bundles of one name and version whose hashes share those
digits (2^32 tries to make) would run one's code for the other, and a half-finished install would be
used as it is: the patched installer writes the full hash into the folder (`INSTALLED_HASH`) once
Flower has installed the bundle, and installs afresh into a folder without this bundle's hash.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import os
import shutil
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

FLOWER_VERSION = "1.39.0"

# The two functions that pull a message's objects (the Grid and the SuperNode call the first,
# a ClientApp the second), with their retry defaults as Flower 1.39.0 ships them.
OBJECT_PULLS = {
    "pull_objects": "31bb2de46b450e6acfadb7a8bb15e3f2074bb112199826a40a5eaa648bad5b2b",
    "pull_and_inflate_object_from_tree": "139811483a15e4a6c1f8523614c12f28dd3049194e5713816be0931387adb1cf",
}
FLOWER_RETRIES = {"max_tries_per_object": 500, "initial_backoff": 1, "backoff_cap": 10}
FIRST_RETRY = 0.02
RETRY_CAP = 0.5
# What `shorten_object_pulls` sets: a short first retry, and Flower's total patience (its tries times its cap).
SHORT_RETRIES = {
    "max_tries_per_object": int(FLOWER_RETRIES["max_tries_per_object"] * FLOWER_RETRIES["backoff_cap"] / RETRY_CAP),
    "initial_backoff": FIRST_RETRY,
    "backoff_cap": RETRY_CAP,
}


def source_digest(function) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def mismatch(owner, pins: dict[str, str], distribution: str = "flwr", pinned: str = FLOWER_VERSION) -> str | None:
    """Why `owner` (a module) is not the code pinned in `pins` (name -> source digest) of `distribution`
    at version `pinned` (Flower's, unless named), or None."""
    installed = version(distribution)
    if installed != pinned:
        return f"{distribution} {installed} is installed, the patch is for {pinned} only"
    changed = [name for name, digest in pins.items()
               if not hasattr(owner, name) or source_digest(getattr(owner, name)) != digest]
    return f"{', '.join(changed)} changed in {owner.__name__}" if changed else None


def shorten_object_pulls() -> str | None:
    """Retry a message's missing objects soon; returns why it did not (the code is not the pinned one), or None."""
    from flwr.supercore.inflatable import inflatable_utils  # pylint: disable=import-outside-toplevel

    reason = mismatch(inflatable_utils, OBJECT_PULLS)
    if reason is None:
        for name in OBJECT_PULLS:
            getattr(inflatable_utils, name).__kwdefaults__.update(SHORT_RETRIES)
    return reason


# Flower's installer, whose early return the patch takes sooner, and the ClientApp that calls it.
BUNDLE_INSTALL = {
    "install_from_fab": "481bd04cde5823220658a8a3e84e827a5ef38254223972e4e14c4cb3968e917e",
    "validate_and_install": "628b69fb852ae8584e978595f2e8451175a3e60acbad678df3f8e08fe27f13c6",
}
CLIENTAPP_RUN = {"run_clientapp": "0df7b3272ecdc6e6b52fa24a72d6e394c42a412ebed0cfbad31990e7abebf59b"}
PROJECT_DIR = {"get_project_dir": "155c70517e73e59826aed10b3e3a0ba06e02feb3573fee44d23a32798edb632c"}  # the folder name both use


INSTALLED_HASH = ".fedtune-bundle-sha256"  # in an installed bundle's folder: the SHA-256 of the bundle it holds


def bundle_folder(bundle: bytes) -> Path | None:
    """Where Flower installs `bundle`: Flower's `get_project_dir`, the folder `flwr-clientapp` loads the
    app from (`validate_and_install` names it the same way); None for what is not a bundle, or names
    a folder anywhere but in Flower's apps folder."""
    # pylint: disable=import-outside-toplevel
    from flwr.common.config import APP_DIR, get_flwr_home, get_metadata_from_config, get_project_dir

    try:
        with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
            config = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
        folder = get_project_dir(*get_metadata_from_config(config), hashlib.sha256(bundle).hexdigest())
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, AttributeError):
        return None  # Flower's installer says what is wrong with it
    return folder if folder.parent == get_flwr_home() / APP_DIR else None


def installed_folder(bundle: bytes) -> Path | None:
    """The folder Flower installed `bundle` in, if it holds this bundle (its full hash recorded there)."""
    folder = bundle_folder(bundle)
    try:
        recorded = (folder / INSTALLED_HASH).read_text(encoding="ascii") if folder is not None else None
    except OSError:
        return None
    return folder if recorded == hashlib.sha256(bundle).hexdigest() else None


def _install_afresh(flower_install, bundle: bytes) -> Path:
    """Flower's install of `bundle` into an emptied folder, its full hash recorded there afterwards."""
    folder = bundle_folder(bundle)
    if folder is not None and folder.exists():  # another bundle's, or an install cut short
        shutil.rmtree(folder)
    installed = flower_install(bundle, None, True)
    record = installed / f"{INSTALLED_HASH}.{os.getpid()}"
    record.write_text(hashlib.sha256(bundle).hexdigest(), encoding="ascii")
    record.replace(installed / INSTALLED_HASH)
    return installed


def reuse_installed_bundles() -> str | None:
    """Let this process's ClientApps use an installed bundle's folder as is; why not (the code is not the
    pinned one), or None."""
    # pylint: disable=import-outside-toplevel
    from flwr.cli import install
    from flwr.common import config
    from flwr.supernode.runtime import run_clientapp

    reason = (mismatch(install, BUNDLE_INSTALL) or mismatch(run_clientapp, CLIENTAPP_RUN)
              or mismatch(config, PROJECT_DIR))
    if reason is not None:
        return reason
    flower_install = install.install_from_fab

    @functools.wraps(flower_install)
    def install_from_fab(fab_file, install_dir=None, skip_prompt=False):
        if isinstance(fab_file, bytes) and install_dir is None and skip_prompt:
            if (folder := installed_folder(fab_file)) is not None:
                return folder
            if bundle_folder(fab_file) is not None:
                return _install_afresh(flower_install, fab_file)
        return flower_install(fab_file, install_dir, skip_prompt)

    run_clientapp.install_from_fab = install_from_fab
    return None
