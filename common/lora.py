"""LoRA through peft, imported only when a run asks for it (--lora_r > 0): the trained model's linear layers keep their
weights frozen and learn a low-rank update W + (α/r)·B·A (arXiv:2106.09685), A random and B zero at the start, so
the model begins exactly where its base is.

What it holds and guarantees:
  - wrap: the model with adapters on --lora_targets (by default every linear layer but the output head; a
    classification head, as rm.py's and ppo.py's critic have, is trained whole), before it is sharded;
    with --lora_r 0, the default, the model itself: full fine-tuning, every parameter trained;
  - adapters_off: the same model with its adapters disabled, called as a model: the reference of a run that
    starts from it, without a second copy in memory;
  - trainable: the parameters the optimizer updates (the adapters, and a classification head);
  - save_adapter: the adapter in peft's format (adapter_config.json, adapter_model.safetensors) in output_dir,
    loadable with PeftModel.from_pretrained or AutoModelForCausalLM.from_pretrained with peft installed;
  - merged: the base with the saved adapter folded in, a plain transformers model that common.dist.save_model writes
    to output_dir/merged under --merge_lora (what merge.py and evaluation load).
"""
import os
import shutil
import warnings

import torch

from common import data

def peft():
    try:
        import peft as module
    except ImportError:
        data.fail("--lora_r needs peft: pip install peft")
    return module


def wrap(model, args):
    """The model with LoRA adapters (args.lora_r > 0), or the model as it is. Called on the whole, unsharded model."""
    if not args.lora_r:  # (--merge_lora without adapters is refused by data.parse)
        return model
    p = peft()
    targets = "all-linear" if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    names = [n for n, _ in model.named_modules()]
    for t in targets if targets != "all-linear" else []:  # peft itself fails only when no name matches
        if not any(n == t or n.endswith("." + t) for n in names):
            data.fail(f"--lora_targets {args.lora_targets!r}: the model has no module {t!r}")
    task, head = "CAUSAL_LM", None
    if hasattr(model, "score") or hasattr(model, "classifier"):  # rm.py's reward model, ppo.py's critic
        task = "SEQ_CLS" if "SequenceClassification" in type(model).__name__ else "TOKEN_CLS"
        head = ["score", "classifier"]  # new, so trained whole (peft's modules_to_save for these tasks), not adapted
    cfg = p.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets, lora_dropout=0.0,
                       task_type=task, exclude_modules=head)
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question about checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return p.get_peft_model(model, cfg)
    except ValueError as e:
        data.fail(f"--lora_targets {args.lora_targets!r}: {str(e).splitlines()[0]}")


def is_lora(model):
    return hasattr(model, "peft_config")


class AdaptersOff:
    """Called like the model, runs it with its adapters disabled: the starting model's function, with no weights of
    its own. Everything else (config, generate's helpers) is the model's."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def adapters_off(model):
    return AdaptersOff(model)


def trainable(model):
    """The parameters an optimizer updates: all of them, or with LoRA the adapters (and a classification head)."""
    return [p for p in model.parameters() if p.requires_grad]


def save_adapter(model, sd, tok, output_dir):
    """On rank 0, from the full state dict sd: the adapter and the tokenizer in output_dir, config last."""
    tmp = os.path.join(output_dir, ".tmp_adapter")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=sd)  # peft keeps the adapter's entries (and a trained head's)
    tok.save_pretrained(tmp)
    for f in sorted(os.listdir(tmp), key=lambda f: f == "adapter_config.json"):
        os.replace(os.path.join(tmp, f), os.path.join(output_dir, f))
    os.rmdir(tmp)


def merged(model, adapter_dir):
    """On rank 0: the base model reloaded from its path on the CPU, the saved adapter applied and folded into its
    weights, W + (α/r)·B·A, by peft: a plain transformers model."""
    base = model.get_base_model()
    path = model.peft_config["default"].base_model_name_or_path
    fresh = type(base).from_pretrained(path, config=base.config, dtype=torch.float32, attn_implementation="sdpa")
    return peft().PeftModel.from_pretrained(fresh, adapter_dir).merge_and_unload()
