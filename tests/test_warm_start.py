"""ClientApps forked warm from the bundle gate (client/warm_start.py): they run the approved
bundle's code, not the gate's, and show up in `ps` as flwr-clientapp (common/proctitle.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from common.config import REPO_ROOT


def test_a_warm_clientapp_imports_fedtune_from_the_bundle_not_from_the_gate(tmp_path: Path):
    """The gate imported this installation's fedtune code; a ClientApp forked from it must run the
    approved bundle's, as a fresh process would (client/warm_start.py)."""
    bundle = tmp_path / "bundle"
    (bundle / "client").mkdir(parents=True)
    (bundle / "client" / "__init__.py").write_text("")
    (bundle / "client" / "app.py").write_text("FROM = 'bundle'\n")
    script = textwrap.dedent(f"""
        import sys
        import client.app, common.config, client.warm_start as warm
        assert not hasattr(client.app, "FROM")
        warm.forget_fedtune_modules()
        assert not [name for name in sys.modules if name.partition(".")[0] in warm.FEDTUNE_PACKAGES]
        assert "pydantic" in sys.modules  # third-party libraries stay loaded
        sys.path.insert(0, {str(bundle)!r})  # what Flower does with the installed bundle
        import client.app
        print(client.app.FROM)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "bundle", result.stderr


def test_a_process_shows_the_command_line_it_is_given():
    script = ("import os, sys; from common.proctitle import set_command_line; "
              "assert set_command_line(['flwr-clientapp', '--token-file', 'F']); "
              "print(open(f'/proc/{os.getpid()}/cmdline', 'rb').read().rstrip(bytes(1)).split(bytes(1)))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[b'flwr-clientapp', b'--token-file', b'F']", result.stderr


def test_the_gate_preloads_the_model_kinds_and_its_pinned_models_code_then_freezes_them(tmp_path: Path):
    """What every training message would otherwise import (peft: seconds; transformers imports a
    model's `modeling_*` lazily) or build (transformers' table of checkpoint renamings, on the first
    `from_pretrained` of a process) is made once, and kept out of the collector's sight so that a
    fork's collections do not copy the gate's pages."""
    script = textwrap.dedent(f"""
        import gc, sys
        from pathlib import Path
        from client.warm_start import WarmExecutor
        from common.model_files import default_model_path
        assert "peft" not in sys.modules
        executor = WarmExecutor(Path({str(tmp_path)!r}), Path(default_model_path("classification")))
        executor.loader.join(timeout=300)
        from transformers import conversion_mapping
        print(not executor.loader.is_alive(), "peft" in sys.modules,
              "transformers.models.bert.modeling_bert" in sys.modules, gc.get_freeze_count() > 0,
              conversion_mapping._checkpoint_conversion_mapping_cache is not None)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=360)
    assert result.stdout.split() == ["True"] * 5, result.stderr


def test_a_warm_fork_builds_the_pinned_model_from_the_gates_copy_and_loads_it_only_once(tmp_path: Path):
    """Later rounds pay no model load: the gate loads the node's pinned model once, and the training
    message's ClientApp (a fork that forgot fedtune's modules) adapts that copy instead of loading the
    folder, with the same weights as a model built from disk. A folder that is not the pinned one is
    not preloaded, and a second build in the same process loads its own copy."""
    script = textwrap.dedent("""
        import hashlib, os, sys
        from pathlib import Path
        import torch
        from common.config import ModelConfig
        from common.model_files import default_model_path, model_digest
        from common.models import encoder
        from common.models.loading import preload_model, take_loaded

        def digest(model):
            hashed = hashlib.sha256()
            for name, tensor in sorted(model.state_dict().items()):
                hashed.update(name.encode() + tensor.numpy().tobytes())
            return hashed.hexdigest()

        folder = Path(default_model_path("classification")).resolve()
        config = ModelConfig(path=str(folder), sha256=model_digest(folder))
        assert "not the pinned model" in preload_model(folder, "0" * 64)
        from_disk = digest(encoder.build_model(config, ["a", "b"], torch.device("cpu")))  # nothing was preloaded
        assert preload_model(folder, config.sha256) is None
        others = [config.model_copy(update=change) for change in
                  ({"sha256": "0" * 64}, {"path": str(folder.parent)}, {"task": "causal_lm"})]
        assert [take_loaded(other) for other in others] == [None] * 3  # another digest, folder or task: not this copy
        read, write = os.pipe()
        if os.fork() == 0:
            import client.warm_start as warm
            warm.forget_fedtune_modules()
            import transformers
            loads = []
            real = transformers.AutoModel.from_pretrained.__func__
            transformers.AutoModel.from_pretrained = classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k))
            from common.models import encoder as bundle_encoder  # the bundle's module, not the gate's
            first = digest(bundle_encoder.build_model(config, ["a", "b"], torch.device("cpu")))
            after_first = len(loads)
            bundle_encoder.build_model(config, ["a", "b"], torch.device("cpu"))
            os.write(write, f"{first} {after_first} {len(loads)}".encode())
            os._exit(0)
        os.wait()
        print(from_disk, os.read(read, 1000).decode())
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    from_disk, in_fork, loads_after_first, loads_after_second = result.stdout.split()
    assert in_fork == from_disk, result.stderr  # the gate's copy, adapted: the same model as one loaded from disk
    assert (loads_after_first, loads_after_second) == ("0", "1")
