"""ppalli (빨리, "quickly"): fast, lean, self-planning LoRA / QLoRA fine-tuning.

Importing ppalli has no side effects: nothing is patched, probed or downloaded until a verb runs.
"""

__version__ = "0.1.0"
