"""Pretraining the reference DSA model: `python -m train.pretrain` (conf/pretrain.yaml).

The whole recipe of models/reference (this pretraining, the indexer warm-up with the distillation job,
evaluation, reference outputs) is `bash launch/pretrain.sh`.

stage=pretrain: a GlmMoeDsa built from `model` (conf/model/reference_arch.yaml) trained from scratch, or with
model.path from that model (a later phase of a recipe, e.g. a longer context: its record is kept under "init_from"),
on the packed corpus (`data`), nanoGPT style: AdamW, bf16 autocast on GPU, linear warm-up then cosine decay,
for train.max_steps steps or train.time_budget_s seconds, whichever comes first (the schedule follows
whichever is further along). Attention is dense and causal (the flash SDPA kernel); the DSA indexers are
set aside and keep their init, as in DeepSeek-V3.2, whose indexers are trained after dense training
against the frozen backbone (here: by the distillation job). Writes `<run dir>/model`: weights
(save.dtype), config, tokenizer, `heldout.safetensors` (the first validation rows, so held-out losses
are reproducible on any machine), `heldout_sources.txt` (the source of every validation document, one per line:
what the model never trained on) and `pretrain_record.json` (stages, steps, tokens, wall time, losses).

stage=corpus: the train and validation documents of `data` as jsonl files in `corpus_dir`, to pin a corpus
(such as one interpreter's standard library) for training on another machine with `data=text`.

stage=reference: `reference_outputs.json` of `reference.model_dir`, computed on the CPU in fp32 with plain
transformers: greedy tokens of a fixed prompt and the held-out losses on a CPU-sized slice of
`heldout.safetensors` with dense attention, with DSA (all-F, the shipped index_topk) and with DSA at
retention 1/8 (uniform pattern, untrained sharing). tests/train/test_reference_model.py checks the shipped model
against it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
import uuid

import hydra
import torch
import torch.nn.functional as F
import transformers
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from distill.adapters import family_of
from distill.pattern import Pattern
from train.data import SPLITS, BatchLoader, build_corpus, eval_batches, packed_datasets
from train.logger import Logger
from train.model import build_model, resolve_dtype
from train.tokenizer import has_tokenizer_files, load_tokenizer, train_bpe_tokenizer

DENSE_ATTENTION = "pretrain_dense_causal"
HELDOUT = "heldout.safetensors"
HELDOUT_SOURCES = "heldout_sources.txt"
RECORD = "pretrain_record.json"
REFERENCE_OUTPUTS = "reference_outputs.json"
STAGES = ("corpus", "pretrain", "reference")


def dense_causal_attention(module, query, key, value, attention_mask, *, scaling, dropout=0.0, **kwargs):
    """Causal attention over every earlier key: query, key [B, H, T, Dq], value [B, H, T, Dv] -> ([B, T, H, Dv], None).

    The materialised mask and the DSA top-k (`indices`) are ignored: rows are unpadded packed text, so
    `is_causal` says everything and SDPA may take its flash kernel. Under autocast the RoPE'd part of the
    query comes out fp32 (fp32 cos/sin of fp32 master weights): q and k are cast to v's dtype.
    """
    query, key = query.to(value.dtype), key.to(value.dtype)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling)
    return out.transpose(1, 2), None


AttentionInterface.register(DENSE_ATTENTION, dense_causal_attention)
AttentionMaskInterface.register(DENSE_ATTENTION, sdpa_mask)  # the attention module slices the mask it is given


class IdleIndexer(nn.Module):
    """Stands where a DSA indexer was during dense pretraining: selects no key ([B, T, 0]). No parameters."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states.new_empty(*hidden_states.shape[:2], 0, dtype=torch.int32)


@contextlib.contextmanager
def dense_attention(model: nn.Module):
    """Dense causal attention inside the block: the indexers are set aside (out of `model.parameters()`,
    so they get no gradient and no optimizer state) and put back afterwards, each through the family adapter
    (which knows where a family keeps its indexer)."""
    family = family_of(model)
    attentions = family.dsa_attentions(model)
    indexers = [family.indexer(attn) for attn in attentions]
    previous = model.config._attn_implementation
    for attn in attentions:
        family.set_indexer(attn, IdleIndexer())
    model.set_attn_implementation(DENSE_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        for attn, indexer in zip(attentions, indexers):
            family.set_indexer(attn, indexer)


def pretraining_tokenizer(tokenizer_cfg, data_cfg):
    """The tokenizer in tokenizer_cfg.path; when that directory has no tokenizer files, a byte-level BPE of
    tokenizer_cfg.vocab_size is first trained there on the train split of `data_cfg` (deterministic)."""
    path = str(tokenizer_cfg.path)
    if not has_tokenizer_files(path):
        start = time.perf_counter()
        train_bpe_tokenizer(build_corpus(data_cfg)["train"]["text"], int(tokenizer_cfg.vocab_size), path)
        print(f"[pretrain] trained a {tokenizer_cfg.vocab_size}-token BPE tokenizer into {path} "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
    return load_tokenizer({"tokenizer": path})


def export_corpus(data_cfg, out_dir: str) -> dict[str, str]:
    """Write the train and validation documents of `data_cfg` to `<out_dir>/<split>.jsonl` ({"text", "source"}
    per line, in order): the same corpus and split on any machine, through `data=text data.files=<train>
    data.validation_files=<validation>`. Returns {split: path}."""
    corpus = build_corpus(data_cfg)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split in SPLITS:
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": document["text"], "source": document["source"]}) + "\n"
                         for document in corpus[split])
        print(f"[pretrain] {len(corpus[split])} {split} documents written to {paths[split]}", flush=True)
    return paths


def check_vocabulary(model_config, tokenizer) -> None:
    """Raise if the model's vocab_size or bos/eos/pad ids differ from the tokenizer's."""
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    wrong = {k: (getattr(model_config, k), v) for k, v in ids.items() if getattr(model_config, k) != v}
    if wrong:
        raise ValueError(f"model.config does not match the tokenizer {tokenizer.name_or_path!r}: "
                         + ", ".join(f"{k} {m} (tokenizer: {t})" for k, (m, t) in wrong.items()))


def lr_at(step: int, progress: float, train_cfg) -> float:
    """train.lr times a linear warm-up over the first train.warmup_steps steps times a cosine from 1 down to
    train.min_lr_ratio over `progress` (the fraction of the step or time budget used, in [0, 1])."""
    warmup = min(1.0, (step + 1) / max(1, train_cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return train_cfg.lr * warmup * (train_cfg.min_lr_ratio + (1.0 - train_cfg.min_lr_ratio) * cosine)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (and embeddings) decay; norms and biases do not (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def lm_loss(model: nn.Module, batches: list[torch.Tensor], device: torch.device, autocast) -> float:
    """Token-mean next-token cross-entropy of `model` over `batches` [B, T] (transformers' shifted labels)."""
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            ids = ids.to(device)
            with autocast():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            count = ids.shape[0] * (ids.shape[1] - 1)
            nll, tokens = nll + loss.item() * count, tokens + count
    return nll / tokens


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def pretrain(cfg: DictConfig, run_dir: str) -> dict:
    """Train the backbone with dense attention and save it to `<run_dir>/model`; returns the record."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    t = cfg.train
    os.makedirs(run_dir, exist_ok=True)
    tokenizer = pretraining_tokenizer(cfg.tokenizer, cfg.data)
    model = build_model(cfg.model, device).train()
    check_vocabulary(model.config, tokenizer)
    start = time.perf_counter()
    data = packed_datasets(cfg.data, tokenizer, t.seq_len, os.path.join(cfg.cache_dir, "data"))
    packing_s = time.perf_counter() - start
    loader = BatchLoader(data["train"], t.batch_size, seed=cfg.seed)
    val = eval_batches(data["validation"], t.batch_size, t.eval_batches)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    logger = Logger(cfg.logger, run_dir, cfg.name, OmegaConf.to_container(cfg, resolve=True), rank=0,
                    run_id=uuid.uuid4().hex)
    tokens_per_step = t.batch_size * t.grad_accum * t.seq_len
    num_params = sum(p.numel() for p in model.parameters())
    with dense_attention(model):
        trained = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                                      fused=device.type == "cuda")
        print(f"[pretrain] {num_params / 1e6:.2f}M parameters ({trained / 1e6:.2f}M trained densely, the rest are "
              f"indexers), {len(data['train'])} train / {len(data['validation'])} validation rows of {t.seq_len} "
              f"tokens, {tokens_per_step} tokens per step, {device_name(device)}", flush=True)
        evals, step, loss, progress = [], 0, float("nan"), 0.0
        start = time.perf_counter()
        while progress < 1.0:
            lr = lr_at(step, progress, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            for _ in range(t.grad_accum):
                ids = next(loader).to(device, non_blocking=True)
                with autocast():
                    micro_loss = model(input_ids=ids, labels=ids, use_cache=False).loss / t.grad_accum
                micro_loss.backward()
                total += micro_loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - start
            progress = max(step / t.max_steps, elapsed / t.time_budget_s if t.time_budget_s else 0.0)
            last = progress >= 1.0
            if step % t.log_every == 0 or last:
                loss = total.item()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"pretraining loss is {loss} at step {step}")
                metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm.item(),
                           "train/tokens": step * tokens_per_step,
                           "train/tokens_per_s": step * tokens_per_step / elapsed,
                           "train/epoch": step * tokens_per_step / (len(data["train"]) * t.seq_len)}
                if step % t.eval_every == 0 or last:
                    model.eval()
                    metrics["eval/loss"] = lm_loss(model, val, device, autocast)
                    model.train()
                    evals.append({"step": step, "tokens": step * tokens_per_step, "loss": metrics["eval/loss"]})
                logger.log(metrics, step)
                print(f"[pretrain] step {step}: loss {loss:.4f}, lr {lr:.2e}, "
                      f"{metrics['train/tokens_per_s']:.0f} tok/s, epoch {metrics['train/epoch']:.2f}, {elapsed:.0f} s"
                      + (f", held-out loss {metrics['eval/loss']:.4f}" if "eval/loss" in metrics else ""), flush=True)
        wall_s = time.perf_counter() - start
    record = {
        "stage": "dense pretraining", "device": device_name(device), "python": sys.version.split()[0],
        "parameters": num_params, "trained_parameters": trained, "steps": step, "tokens": step * tokens_per_step,
        "tokens_per_step": tokens_per_step, "epochs": step * tokens_per_step / (len(data["train"]) * t.seq_len),
        "wall_s": wall_s, "packing_s": packing_s, "final_train_loss": loss, "heldout_evals": evals,
        "train_rows": len(data["train"]), "validation_rows": len(data["validation"]), "seq_len": t.seq_len,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "init_from": _previous_phase(cfg.model.get("path")),
    }
    logger.summary({"eval/loss": evals[-1]["loss"], "train/loss": loss})
    logger.finish()
    out = os.path.join(run_dir, "model")
    model.to(resolve_dtype(cfg.save.dtype, device)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    heldout = eval_batches(data["validation"], cfg.save.heldout_rows, 1)[0]
    save_file({"input_ids": heldout.to(torch.int32).contiguous()}, os.path.join(out, HELDOUT))
    with open(os.path.join(out, HELDOUT_SOURCES), "w") as f:
        f.writelines(f"{source}\n" for source in build_corpus(cfg.data, os.path.join(cfg.cache_dir, "data"))
                     ["validation"]["source"])
    with open(os.path.join(out, RECORD), "w") as f:
        json.dump(record, f, indent=2)
    print(f"[pretrain] {step} steps, {step * tokens_per_step / 1e6:.1f}M tokens in {wall_s:.0f} s; held-out loss "
          f"{evals[-1]['loss']:.4f}; saved to {out}", flush=True)
    return record


def _previous_phase(model_dir: str | None) -> dict | None:
    """{"path", "record"} of the model a phase starts from (model.path; its pretrain_record.json, if it has one), or
    None for a model trained from scratch."""
    if not model_dir:
        return None
    path = os.path.join(model_dir, RECORD)
    record = None
    if os.path.isfile(path):
        with open(path) as f:
            record = json.load(f)
        record.pop("config", None)  # the earlier phase's whole config: its record keeps the numbers
    return {"path": str(model_dir), "record": record}


def heldout_tokens(model_dir: str) -> torch.Tensor:
    """The shipped held-out rows [N, T] (int64) of a model directory."""
    path = os.path.join(model_dir, HELDOUT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the model directory ships no held-out tokens")
    return load_file(path)["input_ids"].long()


def reference_outputs(model_dir: str, prompt: str, new_tokens: int, rows: int, tokens: int) -> dict:
    """Greedy tokens of `prompt` and held-out losses of the model in `model_dir`, CPU fp32, plain transformers.

    Losses on heldout[:rows, :tokens] (a CPU-sized slice of the shipped held-out rows). dense: index_topk
    raised to `tokens` (every causal key); dsa_all_full: the shipped config; dsa_uniform_1_8: indexer_types
    of Pattern.uniform(layers, 8), shared layers reusing their owner's top-k (untrained sharing).
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    heldout = heldout_tokens(model_dir)
    if not (0 < rows <= heldout.shape[0] and 1 < tokens <= heldout.shape[1]):
        raise ValueError(f"the held-out slice [:{rows}, :{tokens}] does not fit the shipped "
                         f"{tuple(heldout.shape)} rows")
    heldout = heldout[:rows, :tokens]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = model.generate(prompt_ids, max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)[0, prompt_ids.shape[1]:].tolist()
    uniform = Pattern.uniform(model.config.num_hidden_layers, 8)
    variants = {"dense": {"index_topk": tokens}, "dsa_all_full": {},
                "dsa_uniform_1_8": {"indexer_types": uniform.indexer_types()}}
    losses = {}
    for name, overrides in variants.items():
        variant = model if not overrides else AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, **overrides).eval()
        losses[name] = lm_loss(variant, [heldout], torch.device("cpu"), contextlib.nullcontext)
    return {"prompt": prompt, "greedy_tokens": greedy, "greedy_text": tokenizer.decode(greedy),
            "heldout_slice": {"rows": rows, "tokens": tokens}, "heldout_loss": losses,
            "uniform_1_8_pattern": str(uniform), "index_topk": model.config.index_topk, "device": "cpu",
            "dtype": "float32", "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


@hydra.main(config_path="../conf", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.stage not in STAGES:
        raise ValueError(f"stage {cfg.stage!r} is not one of {STAGES}")
    if cfg.stage == "corpus":
        export_corpus(cfg.data, cfg.corpus_dir)
        return
    if cfg.stage == "pretrain":
        pretrain(cfg, hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
        return
    r = cfg.reference
    outputs = reference_outputs(r.model_dir, r.prompt, r.new_tokens, r.heldout_rows, r.heldout_tokens)
    with open(os.path.join(cfg.reference.model_dir, REFERENCE_OUTPUTS), "w") as f:
        json.dump(outputs, f, indent=2)
    print(json.dumps(outputs, indent=2))


if __name__ == "__main__":
    main()
