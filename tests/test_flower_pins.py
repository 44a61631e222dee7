"""The Flower internals fedtune's speed-ups rely on, pinned: an upgrade that changes them fails here.

client/supernode.py patches the SuperNode's sleeps; server/polling.py re-implements the Grid's
`send_and_receive` on its public `push_messages`, and server/reply_parts.py its `pull_messages` in
two steps; common/flower_patch.py shortens
the retries of a message's object pulls and lets a ClientApp use an installed bundle as is. All were written against flwr 1.39.0. When one of these tests fails, read the new Flower code, adapt the patch or the
Grid wrapper, and update the digests.
"""

from __future__ import annotations

import ast
import io
import inspect
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from importlib.metadata import version

import flwr.supernode.start_client_internal as supernode_internal
import pytest
from flwr.cli import install
from flwr.cli.build import build_fab_from_disk
from flwr.common import config as flower_config
from flwr.supercore import constant as flower_constants
from flwr.supercore.inflatable import inflatable_utils
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.supernode.runtime import run_clientapp

from client import supernode
from common import flower_patch
from common.config import REPO_ROOT
from server import control, link_chores
from server.polling import PollingGrid
from server.reply_parts import PULL_MESSAGES
from server.round_log import RecordingGrid

# What PollingGrid assumes of Flower's Grid: push_messages returns the instructions' ids, each
# pull_messages returns only replies not returned before (it confirms their receipt), a reply
# names its instruction in reply_to_message_id, and send_and_receive is push + pull-until-done;
# and the pull_messages whose requests HttpReplies makes step by step.
HTTP_GRID = {
    "push_messages": "9aa5938ad18d36f91fc788748303da90b37905fe20b8cb89448d86a05d3c53fa",
    **PULL_MESSAGES,
    "send_and_receive": "699c9f048f3cff746bf5f743771c17dcbb60cd45b6b778adb5600ffc81ee37b2",
}


def test_the_installed_flower_is_the_one_pinned_in_pyproject_and_patched():
    pins = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "flwr[simulation]==" + flower_patch.FLOWER_VERSION in pins
    assert version("flwr") == flower_patch.FLOWER_VERSION


def test_the_supernode_functions_the_patch_relies_on_are_unchanged():
    assert {name: flower_patch.source_digest(getattr(supernode_internal, name)) for name in supernode.PATCHED} == supernode.PATCHED
    assert flower_patch.mismatch(supernode_internal, supernode.PATCHED) is None


def test_the_object_pulls_and_their_retry_defaults_are_the_ones_the_patch_shortens():
    assert flower_patch.mismatch(inflatable_utils, flower_patch.OBJECT_PULLS) is None
    assert {"max_tries_per_object": flower_constants.PULL_MAX_TRIES_PER_OBJECT,
            "initial_backoff": flower_constants.PULL_INITIAL_BACKOFF,
            "backoff_cap": flower_constants.PULL_BACKOFF_CAP} == flower_patch.FLOWER_RETRIES
    # Every caller that pulls a message relies on the defaults: none passes its own.
    for module in ("flwr.superlink.grid.http_grid", "flwr.supernode.start_client_internal",
                   "flwr.supernode.runtime.run_clientapp"):
        source = inspect.getsource(__import__(module, fromlist=["_"]))
        assert "pull_objects(" in source or "pull_and_inflate_object_from_tree(" in source, module
        assert "initial_backoff" not in source and "backoff_cap" not in source, module


def test_shortened_object_pulls_retry_soon_and_keep_flowers_patience(monkeypatch):
    functions = [getattr(inflatable_utils, name) for name in flower_patch.OBJECT_PULLS]
    for function in functions:  # this test process keeps Flower's defaults afterwards
        monkeypatch.setattr(function, "__kwdefaults__", dict(function.__kwdefaults__))
    assert flower_patch.shorten_object_pulls() is None
    assert flower_patch.shorten_object_pulls() is None  # twice is harmless
    flower = flower_patch.FLOWER_RETRIES
    for function in functions:
        defaults = function.__kwdefaults__
        assert defaults["initial_backoff"] == flower_patch.FIRST_RETRY < flower["initial_backoff"]
        assert defaults["backoff_cap"] < flower["backoff_cap"]
        assert defaults["max_tries_per_object"] * defaults["backoff_cap"] == flower["max_tries_per_object"] * flower["backoff_cap"]


def test_the_supernode_module_uses_time_for_its_three_sleeps_only():
    """The patch swaps the module's `time`: any other use of it there would be changed too."""
    tree = ast.parse(inspect.getsource(supernode_internal))
    uses = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "time"]
    sleeps = sorted(ast.literal_eval(call.args[0]) for call in ast.walk(tree) if isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute) and call.func in uses)
    assert [use.attr for use in uses] == ["sleep"] * 3
    assert sleeps == [supernode.REPLY_SLEEP, supernode.REPLY_SLEEP, supernode.IDLE_SLEEP]


def test_the_launcher_refuses_to_patch_another_flower(monkeypatch):
    monkeypatch.setattr(flower_patch, "version", lambda _package: "1.40.0")
    assert "1.40.0" in flower_patch.mismatch(supernode_internal, supernode.PATCHED)
    assert "1.40.0" in flower_patch.shorten_object_pulls()
    assert "1.40.0" in flower_patch.reuse_installed_bundles()


def test_the_launcher_refuses_to_patch_changed_code(monkeypatch):
    monkeypatch.setitem(supernode.PATCHED, "_push_messages", "0" * 64)
    assert "_push_messages changed" in flower_patch.mismatch(supernode_internal, supernode.PATCHED)


def test_the_grid_polling_relies_on_is_unchanged():
    assert {name: flower_patch.source_digest(getattr(HttpGrid, name)) for name in HTTP_GRID} == HTTP_GRID


def test_the_grid_wrappers_forward_every_method_of_flowers_grid():
    """A method Flower adds to Grid and a wrapper does not forward fails at instantiation, here."""
    abstract = set(Grid.__abstractmethods__)
    assert abstract == {"set_run", "run", "create_message", "get_node_ids", "push_messages", "pull_messages",
                        "send_and_receive"}
    for wrapper in (PollingGrid, RecordingGrid):
        assert not wrapper.__abstractmethods__, wrapper


def test_the_fleet_server_is_built_with_the_node_auth_interceptor_the_superlink_replaces():
    """server/superlink.py records refused keys by replacing `NodeAuthServerInterceptor` in the module
    whose lifespan builds the Fleet server; that only works while the lifespan looks it up there."""
    import sys

    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan

    from server.superlink import KeyRefusalsRecorded

    module = sys.modules[SuperLinkLifespan.__module__]
    assert "NodeAuthServerInterceptor(self.state_factory)" in inspect.getsource(SuperLinkLifespan._start_legacy_fleet_grpc_rere)
    assert issubclass(KeyRefusalsRecorded, module.NodeAuthServerInterceptor)


def test_the_installer_and_its_clientapp_caller_are_the_code_the_reuse_patch_repeats():
    assert flower_patch.mismatch(install, flower_patch.BUNDLE_INSTALL) is None
    assert flower_patch.mismatch(run_clientapp, flower_patch.CLIENTAPP_RUN) is None
    assert flower_patch.mismatch(flower_config, flower_patch.PROJECT_DIR) is None


def test_the_cli_code_the_coordinator_runs_in_process_is_pinned(monkeypatch, request):
    """server/control.py runs `flwr ls` / `flwr supernode ls`'s own functions; changed ones send it back to the CLI."""
    assert control.unpinned() is None
    assert control.ask(Path("/nonexistent"), Path("/nonexistent"), "stop", "7") is None  # not a read: the CLI's
    monkeypatch.setitem(control.PINS[control.RUNS_CODE], "_to_json", "0" * 64)
    control.unpinned.cache_clear()  # digested once per process: again for the broken pin, and after the test
    request.addfinalizer(control.unpinned.cache_clear)
    assert "_to_json changed in flwr.cli.ls" in control.unpinned()
    assert control.ask(Path("/nonexistent"), Path("/nonexistent"), "ls") is None  # the CLI's turn: nothing read


def test_the_superlink_chores_paced_are_the_pinned_code():
    """server/link_chores.py: the sweep (and the expiry checks that make a late one harmless) and the
    log stream, which sleeps on its module's LOG_STREAM_INTERVAL."""
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.superlink.servicer.control import control_handlers

    assert flower_patch.mismatch(SqlCoreState, link_chores.SWEEP_PINS) is None
    assert flower_patch.mismatch(link_chores.task_auth, link_chores.AUTH_PINS) is None
    assert flower_patch.mismatch(control_handlers, link_chores.LOG_STREAM_PINS) is None
    sleeps = [node for node in ast.walk(ast.parse(inspect.getsource(control_handlers._stream_logs)))
              if isinstance(node, ast.Call) and ast.unparse(node.func) == "time.sleep"]
    assert [ast.unparse(node.args[0]) for node in sleeps] == ["LOG_STREAM_INTERVAL"]


def test_pacing_wraps_flowers_own_sweep_once_and_slows_the_log_stream(monkeypatch):
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.superlink.servicer.control import control_handlers

    flowers = SqlCoreState._cleanup_expired_task_tokens
    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", flowers)  # put back after the test
    monkeypatch.setattr(control_handlers, "LOG_STREAM_INTERVAL", control_handlers.LOG_STREAM_INTERVAL)
    assert link_chores.pace() is None and link_chores.pace() is None
    assert SqlCoreState._cleanup_expired_task_tokens.__wrapped__ is flowers
    assert control_handlers.LOG_STREAM_INTERVAL == link_chores.LOG_STREAM_SECONDS


def test_a_paced_sweep_runs_at_most_once_a_period_across_threads():
    now = [100.0]
    swept = []
    paced = link_chores.paced_sweep(lambda state: swept.append(state), every=1.0, clock=lambda: now[0])
    paced("a")
    now[0] += 0.5
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(paced, "bcde"))
    assert swept == ["a"]
    now[0] += 0.5  # a period after the last sweep that ran
    paced("f")
    paced("g")
    assert swept == ["a", "f"]


def test_an_installed_bundle_is_used_as_is_and_any_other_is_installed_by_flower(tmp_path, monkeypatch):
    """The patched installer gives the folder Flower itself installed the bundle in, without unzipping
    it again; a bundle not installed yet, or not a bundle at all, goes to Flower's installer."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setattr(run_clientapp, "install_from_fab", run_clientapp.install_from_fab)  # restored afterwards
    bundle = build_fab_from_disk(REPO_ROOT)
    assert flower_patch.installed_folder(bundle) is None  # not installed yet
    assert flower_patch.reuse_installed_bundles() is None
    unzipped = []
    flower_extract = install.safe_extract_zip
    monkeypatch.setattr(install, "safe_extract_zip", lambda *args: unzipped.append(1) or flower_extract(*args))

    folder = run_clientapp.install_from_fab(bundle, skip_prompt=True)  # Flower installs it
    assert unzipped == [1] and (folder / "pyproject.toml").is_file()
    assert flower_patch.installed_folder(bundle) == folder
    assert run_clientapp.install_from_fab(bundle, skip_prompt=True) == folder and unzipped == [1]  # used as is

    other = other_app(tmp_path, "other")  # the same name and version, other code: another bundle, not installed
    assert other != bundle and flower_patch.installed_folder(other) is None
    assert run_clientapp.install_from_fab(other, skip_prompt=True) != folder and unzipped == [1, 1]
    with pytest.raises(zipfile.BadZipFile):  # Flower's own answer to a broken bundle
        run_clientapp.install_from_fab(b"not a zip", skip_prompt=True)


def other_app(tmp_path: Path, marker: str) -> bytes:
    """A bundle of fedtune's name and version with other code: its `server/__init__.py` says `marker`."""
    app = tmp_path / marker
    for pattern in ("common", "common/models", "client", "client/privacy", "server"):  # fab-include's folders
        (app / pattern).mkdir(parents=True)
        (app / pattern / "__init__.py").write_text(f"MARKER = {marker!r}\n" if pattern == "server" else "")
    (app / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    return build_fab_from_disk(app)


def test_a_folder_holding_another_bundle_or_a_cut_short_install_is_never_used_for_a_bundle(tmp_path, monkeypatch):
    """Flower names an installed bundle's folder by 8 hex digits of its hash and reuses what it finds
    there. Played here with those digits shortened to none, so that two approved bundles of one name
    and version share a folder as two whose hashes collide would: each runs its own code."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setattr(run_clientapp, "install_from_fab", run_clientapp.install_from_fab)  # restored afterwards
    monkeypatch.setattr(flower_config, "FAB_HASH_TRUNCATION", 0)
    monkeypatch.setattr(install, "FAB_HASH_TRUNCATION", 0)
    assert flower_patch.reuse_installed_bundles() is None
    first, second = other_app(tmp_path, "first"), other_app(tmp_path, "second")
    assert flower_patch.bundle_folder(first) == flower_patch.bundle_folder(second)  # the collision

    def installed_code(bundle: bytes) -> str:
        folder = run_clientapp.install_from_fab(bundle, skip_prompt=True)
        return (folder / "server" / "__init__.py").read_text()

    assert "first" in installed_code(first) and "second" in installed_code(second)
    assert "first" in installed_code(first)  # back again, not the folder as the second left it
    assert flower_patch.installed_folder(second) is None

    folder = flower_patch.installed_folder(first)
    (folder / flower_patch.INSTALLED_HASH).unlink()  # as a kill before the hash was recorded leaves it
    (folder / "server" / "__init__.py").write_text("MARKER = 'half-written'\n")
    assert "first" in installed_code(first)


def test_a_bundle_naming_a_folder_outside_flowers_apps_folder_has_none(tmp_path, monkeypatch):
    """The bundle's own pyproject names the folder: a version with a path in it must not point the
    installer (which empties a folder before it installs there) anywhere else."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    version = tomllib.loads(pyproject)["project"]["version"]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("pyproject.toml", pyproject.replace(f'version = "{version}"', 'version = "1/../../../victim"', 1))
    assert flower_patch.bundle_folder(archive.getvalue()) is None
    assert flower_patch.bundle_folder(build_fab_from_disk(REPO_ROOT)).parent == tmp_path / "flwr-home" / "apps"
