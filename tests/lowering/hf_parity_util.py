"""Shared by the test_hf_parity_* files: a tiny random transformers model and the reference model
built from its config (through plait.ir.hf) with the same weights (through lowering/weights.py)."""
import torch
import transformers

from plait.ir.hf import model_from_hf_config
from plait.lowering.build import build_model
from plait.lowering.weights import load_hf_weights


def randomise(hf_model, std=0.3, keep=()):
    """HF initialises norms to one and some weights to zero; draw every tensor at random so the
    comparison exercises all of them (norm-like vectors stay positive, around one). Parameters whose
    names end with one of ``keep`` keep transformers' own initialisation."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith(tuple(keep)):
                continue
            p.normal_(0.0, std) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for name, buf in hf_model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # the expert bias changes the selection
                buf.normal_(0.0, 0.1)


def hf_and_reference(cfg: dict, std=0.3, keep=()):
    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    # experts_implementation="eager": transformers' per-expert loop, the plain reference (its
    # default grouped_mm path needs 16-byte-aligned widths on CPU)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, experts_implementation="eager").eval()
    randomise(hf, std, keep)
    spec = model_from_hf_config(hf_cfg.to_dict())  # the config.json transformers would save
    ref = build_model(spec, seed=1).eval()
    load_hf_weights(ref, hf.state_dict(), spec, cfg["model_type"])
    return hf, ref


def max_logit_diff(hf, ref, vocab, seq=32, batch=2):
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(tokens, use_cache=False).logits - ref(tokens)).abs().max().item()
