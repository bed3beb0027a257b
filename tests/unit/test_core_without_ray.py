"""The core must import and run where Ray is not installed (a bare GPU box, an inference server)."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCK_RAY = textwrap.dedent("""
    import sys, importlib.abc
    class BlockRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ImportError(f"ray is blocked in this test (import of {name})")
    sys.meta_path.insert(0, BlockRay())
""")


def test_core_imports_and_trains_with_ray_blocked(tmp_path):
    script = BLOCK_RAY + textwrap.dedent(f"""
        import raygpt, raygpt.config, raygpt.model, raygpt.tokenizer, raygpt.train, raygpt.checkpoint
        import raygpt.generate, raygpt.local, raygpt.runs, raygpt.cli, raygpt.data.corpus, raygpt.data.sources
        import raygpt.tracking, raygpt.tune_space, raygpt.tune_report, raygpt.parallel, raygpt.hf, raygpt.pretrained
        import raygpt.offline_io
        import raygpt.serve, raygpt.serve.api, raygpt.serve.server
        from raygpt.config import load_config
        from raygpt.local import train_local
        cfg = load_config(None, ["model.n_layer=1", "model.n_head=1", "model.n_embd=16", "model.block_size=16",
                                 "train.max_steps=3", "optim.warmup_steps=1", "train.batch_size=2",
                                 "data.max_chars=20000", "data.split=tail", "train.out_dir={tmp_path}", "train.device=cpu"])
        result = train_local(cfg, print_fn=lambda s: None)
        print(raygpt.load(result.checkpoint).generate("def", max_new_tokens=5, seed=0) is not None)
        assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules), "ray got imported"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "ok"]
