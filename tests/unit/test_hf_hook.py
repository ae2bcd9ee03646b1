"""Patching does not import transformers' Trainer stack (seconds and ~90 MB: datasets and the rest), and the
Trainer still learns to resume peftkern checkpoints: its two methods are wrapped when its module is first
imported, once, however many models are patched."""
import subprocess
import sys
import textwrap


def test_patch_leaves_the_trainer_unimported_and_the_hook_arrives_with_it():
    code = textwrap.dedent("""
        import sys
        import peftkern
        from tests.helpers.models import tiny_model
        peftkern.patch(tiny_model("llama"), "lora")
        peftkern.patch(tiny_model("llama"), "pg_pos")
        print("BEFORE", "transformers.trainer" in sys.modules, "datasets" in sys.modules)
        from transformers import Trainer
        print("AFTER", getattr(Trainer._load_from_checkpoint, "_peftkern", False),
              getattr(Trainer._load_best_model, "_peftkern", False))
        from peftkern import hf
        print("FINDERS", sorted(f.name for f in sys.meta_path if isinstance(f, hf._AfterImport)))
        from trl import DPOTrainer
        print("DPO", getattr(DPOTrainer.__init__, "_peftkern", False),
              sum(isinstance(f, hf._AfterImport) for f in sys.meta_path))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert lines["BEFORE"] == "False False"
    assert lines["AFTER"] == "True True"
    assert lines["FINDERS"] == "['trl.trainer.dpo_trainer']"  # the Trainer's removed once it fired
    assert lines["DPO"] == "True 0"  # DPOTrainer's reference hook (reference.py) arrives with its module too
