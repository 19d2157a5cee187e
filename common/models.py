"""Loading tokenizers and models, the optimizer, and the start of a run's outputs: what every script does the same way.

What it holds and guarantees:
  - load_tokenizer: the tokenizer, with a pad token (the EOS token where it has none), or a one-line error;
  - load_model: a model in fp32 (autocast casts on the fly) with every dropout off, whatever its config calls it, so
    log-ratios and KL estimates compare one deterministic function (TRL #744); a one-line error for a model that
    cannot be loaded or embeds fewer tokens than the tokenizer has; remote code only with --trust_remote_code;
  - adamw: AdamW over the parameters that train (all, or LoRA's adapters), one fused kernel for the update on CUDA;
  - start_run: output_dir, args.json, the resumed step and the metrics writer, in the order that leaves nothing
    behind when an earlier step fails.
"""
import json
import os
from dataclasses import asdict

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from common import data, dist, lora


def load_tokenizer(path, trust_remote_code=False):
    if path == "runs/sft" and not os.path.exists(path):
        data.fail("runs/sft not found: run algos/sft.py first, or pass --model")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        data.fail(f"cannot load tokenizer {path!r}: {str(e).splitlines()[0]}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(path, trust_remote_code=False):
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        data.fail(f"cannot load model {path!r}: {str(e).splitlines()[0]}")


def load_model(path, tok, device, trust_remote_code=False, cls=AutoModelForCausalLM, attn=None, dropout=False,
               **config):
    """A model of class cls in fp32 on the CPU (dist.shard places it), with the given config fields set.
    dropout=False: every dropout rate of the config is 0 before the model is built (attention dropout is often a rate,
    not a module) and every nn.Dropout gets p = 0. attn: the attention implementation, by default dist.attn_impl's."""
    cfg = load_config(path, trust_remote_code)
    try:
        if not dropout:
            for c in (cfg, cfg.get_text_config()):
                c.update({k: 0.0 for k, v in c.to_dict().items() if "dropout" in k and isinstance(v, float)})
        cfg.update(config)
        model = cls.from_pretrained(path, config=cfg, dtype=torch.float32, attn_implementation=attn or
                                    dist.attn_impl(device), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        data.fail(f"cannot load model {path!r}: {str(e).splitlines()[0]}")
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tok) > n_embed:
        data.fail(f"tokenizer has {len(tok)} tokens but model {path!r} embeds only {n_embed}")
    if not dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def adamw(model, args, device):
    """AdamW over the parameters that train: all of them, or with LoRA the adapters (common.lora)."""
    return torch.optim.AdamW(lora.trainable(model), lr=args.lr, weight_decay=args.weight_decay,
                             fused=device.type == "cuda")


def start_run(args, model, opt, sched, rank, unit="step"):
    """-> (step to start from, metrics writer, checkpoint path). Creates output_dir, loads the checkpoint under
    --resume, writes args.json (rank 0). Called once the data and models are loaded and checked. unit: what the
    resumed count counts, as the message names it (rft checkpoints rounds)."""
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt = os.path.join(args.output_dir, "checkpoint")
    start = dist.load_checkpoint(ckpt, model, opt, sched, rank) if args.resume else 0
    if rank == 0:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    metrics = data.Metrics(args.output_dir, rank == 0, resume_step=start, report_to=args.report_to,
                           config=asdict(args))
    if start and rank == 0:
        tqdm.write(f"resumed from {ckpt} at {unit} {start}")
    return start, metrics, ckpt
