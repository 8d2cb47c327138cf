"""Checks of APE against full prefill on a few NQ items of bench/blend.py (one JSON line per item).

    .venv/bin/python bench/blend_ape_probe.py variants 12   # the bench's first 12 items, 5 APE variants
    .venv/bin/python bench/blend_ape_probe.py sweep 24      # (T, S) grid on held-out items 200..223
    .venv/bin/python bench/blend_ape_probe.py count 8       # APE / parallel / full reuse at 2-15 passages

variants: APE (T = S = 0.9), plain parallel, "swapped" (T on the prefix + question logits and S*T on their
LSE, the contexts plain: the part APE's Mistral and Gemma files temper), "sink_q" (SmolLM2's bos token
<|im_start|> at the head of the question part: APE's code tokenizes the query with the tokenizer's
special tokens on, so on Llama-3/Mistral/Gemma the query starts with a second BOS) and S = 0.7. Each
with first-token fidelity, the 32-token output and its gold scores.
sweep: label-free choice of (T, S) (KL between full prefill's and APE's next-token distributions) on
items that are not among the 200 the bench reports: mean KL over the first 8 steps of full prefill's
greedy continuation, teacher forced under APE's attention.
count: fidelity of APE, parallel encoding and full reuse as the number of passages grows.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import blend.fuse as fuse_mod  # noqa: E402
from blend.ape import APEAttention, APEConfig, _weighted  # noqa: E402
from blend.fuse import Fuser  # noqa: E402
from engine.chat import ChatPrompt, build_chat  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.runner import Engine  # noqa: E402
from kvstore import KVConnector, KVLayout, Namespace, StoreConfig, TieredStore  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_blend", REPO / "bench" / "blend.py")
bb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bb)  # type: ignore[union-attr]


class SwappedAPE(APEAttention):
    """T on the prefix + question logits, S*T on their LSE, contexts plain (exact causal mask kept)."""

    def __call__(self, call):
        group = call.q.shape[1] // call.k.shape[1]
        k, v = call.k.repeat_interleave(group, dim=1), call.v.repeat_interleave(group, dim=1)
        s = (call.q @ k.transpose(-1, -2)).float() * call.scale
        keys = torch.arange(k.shape[-2])
        in_ctx = (keys >= self.start) & (keys < self.end)
        visible = keys[None, :] <= call.q_index[:, None]
        t, sc = self.config.temperature, self.config.scale
        ctx = s.masked_fill(~in_ctx, float("-inf"))
        other = s.masked_fill(in_ctx | ~visible, float("-inf")) / t
        lc, lo = torch.logsumexp(ctx, -1, keepdim=True), torch.logsumexp(other, -1, keepdim=True)
        w = torch.softmax(torch.cat([lc, sc * t * lo], -1), -1)
        return (w[..., :1] * _weighted(ctx, lc, v) + w[..., 1:] * _weighted(other, lo, v)).to(call.q.dtype)


class Probe:
    def __init__(self) -> None:
        torch.set_num_threads(1)
        loaded = load_model()
        self.engine, self.tok = Engine(loaded), loaded.tokenizer
        self.store = TieredStore(StoreConfig(host_bytes=6 << 30))
        namespace = Namespace(loaded.model_id, KVLayout.for_spec(loaded.spec), salt="ape-probe")
        self.fuser = Fuser(self.engine, KVConnector(self.store, namespace))
        self.stop = self.engine.stop_ids()

    def fuse(self, prompt, method, acfg=None, swapped=False):
        if swapped:  # Fuser builds its APE attention by name: swap the class for this call only
            fuse_mod.APEAttention = SwappedAPE  # type: ignore[misc]
        try:
            return self.fuser.fuse(prompt, method, None, acfg)
        finally:
            fuse_mod.APEAttention = APEAttention  # type: ignore[misc]

    def run(self, prompt, method, acfg=None, swapped=False):
        f = self.fuse(prompt, method, acfg, swapped)
        toks, _ = self.engine.decode(f.logits, f.cache, 32, f.decode_attention)
        return f.logits, toks, self.tok.decode([t for t in toks if t not in self.stop]).strip()

    def forced(self, fused, tokens):
        """Next-token logits at each step of `tokens` fed after the fused prompt."""
        out = [fused.logits]
        for t in tokens[:-1]:
            out.append(
                self.engine.forward([t], cache=fused.cache, attention=fused.decode_attention).logits[0, -1]
            )
        return out


def variants(probe: Probe, n: int):
    bos = probe.tok.convert_tokens_to_ids("<|im_start|>")
    for it in bb.nq_items(n, 15):
        prompt = build_chat(probe.tok, it["question"], it["passages"])
        ref_l, ref_t, ref_x = probe.run(prompt, "full_prefill")
        rec = {"key": it["key"], "full": bb.gold_scores(ref_x, it["answers"]) | {"text": ref_x}}
        sink_q = ChatPrompt(prompt.prefix, prompt.passages, [bos] + prompt.question)
        for name, (p, m, a, sw) in {
            "ape": (prompt, "ape", APEConfig(0.9, 0.9), False),
            "parallel": (prompt, "parallel", None, False),
            "swapped": (prompt, "ape", APEConfig(0.9, 0.9), True),
            "sink_q": (sink_q, "ape", APEConfig(0.9, 0.9), False),
            "ape_s07": (prompt, "ape", APEConfig(0.9, 0.7), False),
        }.items():
            logits, toks, text = probe.run(p, m, a, sw)
            rec[name] = (
                bb.fidelity(ref_l, ref_t, logits, toks) | bb.gold_scores(text, it["answers"]) | {"text": text}
            )
        yield rec


def sweep(probe: Probe, n: int, first: int = 200, steps: int = 8):
    grid = [(t, s) for t in (0.6, 0.7, 0.8, 0.9, 1.0) for s in (0.7, 0.8, 0.9, 1.0)]
    for it in bb.nq_items(first + n, 15)[first:]:
        prompt = build_chat(probe.tok, it["question"], it["passages"])
        full = probe.fuse(prompt, "full_prefill")
        toks, _ = probe.engine.decode(full.logits, full.cache.clone(), steps)
        ref = probe.forced(full, toks)
        rec = {"key": it["key"], "steps": len(toks)}
        for t, s in grid:
            got = probe.forced(probe.fuse(prompt, "ape", APEConfig(t, s)), toks)
            kls = [bb.kl(a, b) for a, b in zip(ref, got, strict=True)]
            rec[f"{t}:{s}"] = {
                "kl1": kls[0],
                "kl": sum(kls) / len(kls),
                "top1": float(int(got[0].argmax()) == int(ref[0].argmax())),
                "agree": sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(ref, got, strict=True))
                / len(kls),
            }
        yield rec


def count(probe: Probe, n: int):
    for k in (2, 5, 10, 15):
        for it in bb.nq_items(n, k):
            prompt = build_chat(probe.tok, it["question"], it["passages"])
            ref_l, ref_t, _ = probe.run(prompt, "full_prefill")
            rec = {"key": it["key"], "k": k, "tokens": len(prompt.ids)}
            for name, a in (("ape", APEConfig(0.9, 0.9)), ("parallel", None), ("full_reuse", None)):
                logits, toks, _ = probe.run(prompt, name, a)
                rec[name] = bb.fidelity(ref_l, ref_t, logits, toks)
            yield rec


def main() -> None:
    mode, n = sys.argv[1], int(sys.argv[2])
    probe = Probe()
    for rec in {"variants": variants, "sweep": sweep, "count": count}[mode](probe, n):
        print(json.dumps(rec), flush=True)
        print(f"{rec['key']} done {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)
    probe.store.close()


if __name__ == "__main__":
    main()
