"""LouisKV on the real model: exactness at a full budget, the resident bound, the trigger, the store."""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttnCall
from kvstore.config import StoreConfig
from kvstore.store import TieredStore
from retrieval.bench import BenchConfig, long_output
from retrieval.calibrate import (
    calibrate_queries,
    calibrate_tau,
    decode_queries,
    step_trigger_counts,
    trigger_rates,
)
from retrieval.kmeans import groups, kmeans
from retrieval.louiskv import ANCHOR_TAU, ANSWER_TAU, DEFAULT_TAU, LouisKV, LouisKVConfig
from retrieval.tasks import needle, qa_prompts

NEW = 12
SMALL = dict(window=32, max_segment=16, n_sink=4)


@pytest.fixture(scope="module")
def probe(engine, texts):
    return needle(engine.tokenizer, texts, 320, depth=0.5, seed=3)


@pytest.fixture(scope="module")
def full_tokens(engine, probe):
    new, _ = engine.generate(probe.ids, NEW, stop=set())
    return new


def host_store() -> TieredStore:
    return TieredStore(StoreConfig(host_bytes=1 << 30, write_behind=False))


def retrieving_layers(engine, r: LouisKV, ids: list[int], new: int) -> list[list[int]]:
    """Decode `new` tokens with `r`, checking the resident bound at every call; per decode step, the
    layers that retrieved."""
    steps: list[list[int]] = []

    def checked(call: AttnCall) -> torch.Tensor:
        before = r.stats.retrievals
        out = r.attention(call)
        if call.layer == 0:
            steps.append([])
        if r.stats.retrievals > before:
            steps[-1].append(call.layer)
        assert r.resident_bytes() <= r.budget_bytes
        return out

    cache, logits = r.prefill(ids)
    engine.decode(logits, cache, new, attention=checked, stop=set())
    return steps


def test_budget_holding_everything_gives_the_full_cache_tokens(engine, probe, full_tokens):
    r = LouisKV(engine, LouisKVConfig(budget=1024, **SMALL), host_store())
    assert r.generate(probe.ids, NEW, stop=set()) == full_tokens
    # The middle of the prompt really went through the store and came back.
    assert r.stats.units_fetched > 0 and r.stats.tokens_fetched >= len(probe.ids) - 36
    assert r.stats.retrieval_rate < 1.0  # the default tau reused selections on some (layer, step) pairs


def test_resident_bytes_never_exceed_the_budget(engine, probe):
    r = LouisKV(engine, LouisKVConfig(budget=96, tau=0.9, **SMALL), host_store())
    seen = []

    def checked(call: AttnCall) -> torch.Tensor:
        out = r.attention(call)
        seen.append(call.kv.nbytes())
        assert r.resident_bytes() <= r.budget_bytes
        return out

    cache, logits = r.prefill(probe.ids)
    offloaded = r.stats.units_offloaded
    engine.decode(logits, cache, 40, attention=checked, stop=set())
    assert len(seen) == 39 * engine.spec.num_layers
    assert r.stats.peak_resident_bytes <= r.budget_bytes
    assert r.budget_bytes < (len(probe.ids) + 40) * engine.spec.kv_bytes_per_token / 3
    assert r.stats.units_offloaded > offloaded  # generated segments left the window for the store
    assert max(seen) <= r.budget_bytes // engine.spec.num_layers


def test_segments_leaving_the_window_stay_resident_between_retrievals(engine, probe):
    """With one retrieval only (the first step), the text that leaves the window afterwards displaces
    the lowest-ranked retrieved units instead of vanishing: the whole recent text stays resident."""
    r = LouisKV(engine, LouisKVConfig(budget=96, tau=-1.5, **SMALL), host_store())
    cache, logits = r.prefill(probe.ids)
    engine.decode(logits, cache, 40, attention=r.attention, stop=set())
    assert r.stats.retrievals == engine.spec.num_layers
    # The prompt's tail is the window's first segments; the first one leaves it (at step 1) before the
    # step's retrieval, which then chooses among all units; the later ones leave after the retrieval.
    first_left = len(probe.ids) - SMALL["window"] + SMALL["max_segment"]
    for layer in r.layers:
        assert layer.local_start - first_left >= 32  # at least two segments left after the retrieval
        recent = set(range(first_left, layer.local_start))
        for h in range(layer.heads):
            assert recent <= set(layer.working.positions[h].tolist()), f"layer {layer.index} head {h}"
    assert r.stats.peak_resident_bytes <= r.budget_bytes


@pytest.mark.parametrize("scope", ["layer", "step"])
@pytest.mark.parametrize("tau", [1.5, -1.5])
def test_tau_outside_the_cosine_range(engine, probe, tau, scope):
    cfg = LouisKVConfig(budget=128, tau=tau, scope=scope, step_layers=2, **SMALL)
    r = LouisKV(engine, cfg, host_store())
    r.generate(probe.ids, 8, stop=set())
    layers = engine.spec.num_layers
    assert r.stats.steps == 7 and r.stats.layer_steps == 7 * layers
    assert r.stats.first_layer_steps == r.stats.first_retrievals == layers  # the first step always does
    if tau > 1:
        assert r.stats.retrievals == r.stats.layer_steps and r.stats.retrieval_steps == 7
        assert r.stats.retrieval_rate_after_first == r.stats.step_retrieval_rate_after_first == 1.0
    else:
        assert r.stats.retrievals == layers and r.stats.retrieval_steps == 1
        assert r.stats.retrieval_rate == r.stats.step_retrieval_rate == 1 / 7
        assert r.stats.retrieval_rate_after_first == r.stats.step_retrieval_rate_after_first == 0.0


@pytest.mark.parametrize("period", [1, 3, 4])
def test_periodic_trigger_retrieves_on_its_schedule_only(engine, probe, period):
    """trigger="periodic": every layer retrieves at steps 0, period, 2 * period, .. and at no other."""
    r = LouisKV(engine, LouisKVConfig(budget=96, trigger="periodic", period=period, **SMALL), host_store())
    steps = retrieving_layers(engine, r, probe.ids, 14)
    layers = list(range(engine.spec.num_layers))
    assert len(steps) == 13
    assert [i for i, s in enumerate(steps) if s] == list(range(0, 13, period))
    assert all(s in ([], layers) for s in steps)
    assert r.stats.retrieval_steps == len(range(0, 13, period))
    assert r.stats.retrieval_rate == pytest.approx(len(range(0, 13, period)) / 13)


STEP_TAUS = [round(-0.5 + 0.01 * i, 2) for i in range(150)]


def test_step_trigger_decides_for_all_layers_within_the_budget(engine, probe):
    """scope="step": the first `step_layers` layers decide, every later layer follows, so at each step
    layers 2.. all retrieve or none; the stats count those steps, and resident bytes stay in the budget."""
    r = LouisKV(engine, LouisKVConfig(budget=96, tau=0.8, scope="step", step_layers=2, **SMALL), host_store())
    steps = retrieving_layers(engine, r, probe.ids, 24)
    layers = list(range(engine.spec.num_layers))
    assert len(steps) == r.stats.steps == 23 and steps[0] == layers
    assert all(s in ([], layers, layers[1:]) for s in steps), steps
    assert r.stats.retrieval_steps == sum(bool(s) for s in steps)
    assert 1 < r.stats.retrieval_steps < 23  # tau 0.8 neither always nor never fires here
    assert r.stats.peak_resident_bytes <= r.budget_bytes
    with pytest.raises(ValueError, match="scope"):
        LouisKVConfig(scope="token")
    with pytest.raises(ValueError, match="step_layers"):
        LouisKVConfig(step_layers=0)
    with pytest.raises(ValueError, match="step_layers 31"):
        LouisKV(engine, LouisKVConfig(scope="step", step_layers=31))


@pytest.mark.parametrize("trigger", ["anchor", "adjacent"])
def test_step_calibration_meets_its_target_and_replays_louiskv(engine, probe, trigger):
    """`calibrate_queries(scope="step")` bounds the share of retrieving steps (the first counted), and
    its offline replay counts the steps LouisKV's step trigger really retrieves on (target 0.5: layer 0's
    adjacent cosines here come in near-ties, so 0.3 of 11 steps leaves only the first)."""
    ids, new = probe.ids[:240], 12
    queries = decode_queries(engine, ids, new)
    cal = calibrate_queries([queries], 0.5, STEP_TAUS, trigger, include_first=True, scope="step")
    assert cal.samples == new - 1 and cal.rates[cal.taus.index(cal.tau)] <= 0.5
    cfg = LouisKVConfig(budget=1024, tau=cal.tau, trigger=trigger, scope="step", **SMALL)
    r = LouisKV(engine, cfg)  # holds the whole cache: the queries are the full cache's
    r.generate(ids, new, stop=set())
    replayed = step_trigger_counts(queries, torch.tensor([cal.tau]), trigger, 1)
    assert r.stats.retrieval_steps == 1 + int(replayed[0]) > 1
    assert r.stats.retrievals == engine.spec.num_layers * r.stats.retrieval_steps
    assert r.stats.step_retrieval_rate <= 0.5


def test_shared_kmeans_labels_give_the_same_tokens(engine, probe):
    """Another LouisKV's k-means labels of the same prompt (different budget and tau), or its prompt units
    in the store, give exactly the units it would make itself: the bench offloads a probe once for all
    its LouisKV variants."""
    out = engine.forward(probe.ids)
    first = LouisKV(engine, LouisKVConfig(budget=256, tau=2.0, **SMALL), host_store())
    first.offload(out.cache.clone())
    runs, offloaded = [], []
    for labels, units_from in ((None, None), (first.labels, None), (None, first)):
        store = first.store if units_from is not None else host_store()
        r = LouisKV(engine, LouisKVConfig(budget=96, tau=0.9, **SMALL), store)
        cache = r.offload(out.cache.clone(), labels=labels, units_from=units_from)
        offloaded.append(r.stats.units_offloaded)
        new, _ = engine.decode(out.logits[0, -1], cache, 10, attention=r.attention, stop=set())
        pool = [len(p) for p in r.layers[5].pool.keys]
        runs.append((new, r.stats.retrievals, r.stats.tokens_fetched, pool))
        assert all(torch.equal(a, b) for a, b in zip(first.labels, r.labels, strict=True))
        r.release()
    assert runs[0] == runs[1] == runs[2]
    # Reading the first one's units, the third wrote none of the prompt's; its release left them there.
    assert offloaded[0] == offloaded[1] == first.stats.units_offloaded > 0 and offloaded[2] == 0
    assert len(first.store.keys()) == len(first.units)
    with pytest.raises(ValueError, match="units_from"):
        LouisKV(engine, LouisKVConfig(budget=96, **SMALL), host_store()).offload(
            out.cache.clone(), units_from=first
        )
    with pytest.raises(ValueError, match="labels"):
        LouisKV(engine, LouisKVConfig(budget=96, **SMALL)).offload(out.cache.clone(), labels=first.labels[:3])
    with pytest.raises(ValueError, match="labels of shape"):
        LouisKV(engine, LouisKVConfig(budget=96, window=64)).offload(out.cache.clone(), labels=first.labels)


def test_calibration_counting_the_first_step_bounds_louiskvs_reported_rate(engine, probe):
    """`include_first=True` counts the mandatory first-step retrieval as LouisKV's `retrieval_rate`
    does, so on decodes of the calibrated length the per-layer taus keep that rate within the target
    (without it, a 10-token decode adds 1/9 per layer on top of the target)."""
    ids, new = probe.ids[:240], 10
    queries = [decode_queries(engine, ids, new)]
    strict = calibrate_queries(queries, 0.3, trigger="adjacent", include_first=True)
    loose = calibrate_queries(queries, 0.3, trigger="adjacent")
    assert strict.samples == loose.samples + engine.spec.num_layers
    assert all(a <= b for a, b in zip(strict.layer_taus, loose.layer_taus, strict=True))
    r = LouisKV(engine, LouisKVConfig(budget=1024, tau=tuple(strict.layer_taus), trigger="adjacent", **SMALL))
    r.generate(ids, new, stop=set())
    steps = new - 1
    for layer_rate in _layer_rates(r, engine.spec.num_layers, steps, queries[0], strict.layer_taus):
        assert layer_rate <= 0.3
    assert r.stats.retrieval_rate <= 0.3
    assert r.stats.first_retrievals == engine.spec.num_layers


def _layer_rates(r, layers, steps, queries, taus):
    replayed = trigger_rates(queries, torch.tensor(taus), "adjacent").diagonal()
    assert int(replayed.sum()) + layers == r.stats.retrievals  # the replay is what LouisKV did
    return [(1 + c) / steps for c in replayed.tolist()]


def test_answer_taus_are_stricter_than_the_long_output_taus(engine):
    """ANSWER_TAU (calibrated on 16-token answers, first step counted) sits at or below DEFAULT_TAU
    (96-token outputs) at every layer: short answers move the query more. ANCHOR_TAU (the same
    calibration for the anchor trigger) sits at or below ANSWER_TAU: the query drifts further from the
    last retrieval's query than from the previous step's."""
    assert len(ANSWER_TAU) == len(DEFAULT_TAU) == len(ANCHOR_TAU) == engine.spec.num_layers
    assert all(a <= d for a, d in zip(ANSWER_TAU, DEFAULT_TAU, strict=True))
    assert all(a <= d for a, d in zip(ANCHOR_TAU, ANSWER_TAU, strict=True))
    prompts = qa_prompts(engine.tokenizer, 600, slice(100, 102))
    assert len(prompts) == 2 and all(len(p) <= 600 for p in prompts)
    assert engine.tokenizer.decode(prompts[0]).rstrip().endswith("assistant")


def test_offloaded_kv_lives_in_the_store_and_is_released(engine, probe):
    store = host_store()
    r = LouisKV(engine, LouisKVConfig(budget=128, tau=1.5, **SMALL), store)
    cache, logits = r.prefill(probe.ids)
    host = store.stats()["tiers"]["host"]
    assert host["entries"] == len(r.units) > 0 and host["puts"] == len(r.units)
    assert host["bytes"] >= (len(probe.ids) - 36) * engine.spec.kv_bytes_per_token
    engine.decode(logits, cache, 4, attention=r.attention, stop=set())
    assert store.stats()["tiers"]["host"]["hits"] == r.stats.units_fetched > 0
    held = len(r.units)
    assert held > host["entries"]  # window segments were offloaded during the decode
    assert store.stats()["tiers"]["host"]["entries"] == held
    assert r.release() == held
    assert store.keys() == []


def test_units_spill_to_disk_and_come_back_exactly(engine, probe, full_tokens, tmp_path):
    store = TieredStore(StoreConfig(host_bytes=200_000, disk_path=str(tmp_path), write_behind=False))
    r = LouisKV(engine, LouisKVConfig(budget=1024, **SMALL), store)
    assert r.generate(probe.ids, NEW, stop=set()) == full_tokens
    disk = store.stats()["tiers"]["disk"]
    assert disk["entries"] > 0 and disk["hits"] > 0 and disk["corrupt"] == 0
    assert len(list(tmp_path.rglob("*.kvf"))) == disk["entries"]
    store.close()


def test_bad_configs_and_calls(engine, probe):
    with pytest.raises(ValueError, match="budget"):
        LouisKVConfig(budget=40, window=64)
    with pytest.raises(ValueError, match="period"):
        LouisKVConfig(trigger="periodic", period=0)
    with pytest.raises(ValueError, match="max_segment"):
        LouisKVConfig(max_segment=100, window=64)
    with pytest.raises(TypeError, match="LouisKVConfig"):
        LouisKV(engine, {"budget": 10})
    r = LouisKV(engine, LouisKVConfig(budget=128, **SMALL), host_store())
    cache, _ = r.prefill(probe.ids[:100])
    with pytest.raises(ValueError, match="one token per step"):
        engine.forward([1, 2], cache=cache, attention=r.attention)
    with pytest.raises(ValueError, match="already managed"):
        r.offload(cache)
    with pytest.raises(TypeError, match="offload"):
        engine.forward(probe.ids[:8], attention=r.attention)


@pytest.mark.parametrize("trigger", ["anchor", "adjacent"])
def test_calibrated_tau_meets_its_target_rate_and_replays_louiskv(engine, probe, trigger):
    ids, new = probe.ids[:200], 8
    cal = calibrate_tau(engine, [ids], max_new_tokens=new, target_rate=0.3, trigger=trigger)
    layers = engine.spec.num_layers
    assert cal.samples == (new - 2) * layers  # decode steps after LouisKV's always-retrieving first one
    assert cal.rates[cal.taus.index(cal.tau)] <= 0.3
    assert len(cal.layer_taus) == layers
    # The offline replay counts what LouisKV really does with those taus (a budget holding the whole
    # cache keeps its queries those of the full cache).
    r = LouisKV(engine, LouisKVConfig(budget=1024, tau=tuple(cal.layer_taus), trigger=trigger, **SMALL))
    r.generate(ids, new, stop=set())
    replayed = trigger_rates(
        decode_queries(engine, ids, new), torch.tensor(cal.layer_taus), trigger
    ).diagonal()  # row i of the grid is layer i's own tau
    assert r.stats.retrievals == layers + int(replayed.sum())
    assert all(count <= 0.3 * (new - 2) for count in replayed.tolist())
    with pytest.raises(ValueError, match="target_rate"):
        calibrate_tau(engine, [probe.ids[:50]], target_rate=0)
    with pytest.raises(ValueError, match="trigger"):
        LouisKVConfig(trigger="boundary")
    with pytest.raises(ValueError, match="values for a 30-layer"):
        LouisKV(engine, LouisKVConfig(tau=(0.8, 0.9)))


def test_kmeans_units_partition_the_tokens():
    torch.manual_seed(0)
    x = torch.randn(3, 200, 16)
    labels = kmeans(x, 12)
    assert labels.shape == (3, 200) and int(labels.max()) < 12
    for h in range(3):
        units = groups(labels[h], max_size=10)
        assert all(u.numel() <= 10 for u in units)
        assert sorted(torch.cat(units).tolist()) == list(range(200))
        assert all(bool((labels[h][u] == labels[h][u[0]]).all()) for u in units)


def test_token_units_select_the_exact_top_tokens(engine, probe):
    """With one token per unit, a retrieval picks per KV head exactly the tokens with the highest
    group-mean softmax attention (among the offloaded ones), at their original positions, and attends
    over sinks + those tokens + the window: the machinery behind any unit size, checked exactly."""
    cfg = LouisKVConfig(budget=96, tau=2.0, cluster_tokens=1, **SMALL)
    out = engine.forward(probe.ids)
    full_k = [layer.k[0].clone() for layer in out.cache.layers]
    full_v = [layer.v[0].clone() for layer in out.cache.layers]
    r = LouisKV(engine, cfg, host_store())
    cache = r.offload(out.cache)
    checked = []

    def compare(call: AttnCall) -> torch.Tensor:
        got = r.attention(call)
        layer = call.kv
        if call.layer in (0, 14, 29):
            k, v = full_k[call.layer], full_v[call.layer]  # [kv_heads, prompt, d]
            sinks, local = set(range(cfg.n_sink)), set(layer.local_positions.tolist())
            # Offloaded: the prompt's middle as one-token units, plus the window's oldest segment that
            # the first step pushed out (one unit, scored by its mean key).
            start = len(probe.ids) - cfg.window
            units = [[p] for p in range(cfg.n_sink, start)] + [list(range(start, start + cfg.max_segment))]
            assert sinks | local | {p for u in units for p in u} == set(range(len(probe.ids) + 1))
            means = torch.stack([k[:, u].mean(1) for u in units], 1)  # [kv_heads, units, d]
            q = call.q[0, :, -1].view(k.shape[0], -1, k.shape[2])  # [kv_heads, group, d]
            probs = (torch.einsum("hgd,hud->hgu", q, means) * call.scale).softmax(-1).mean(1)
            group = q.shape[1]
            for h in range(k.shape[0]):
                order = probs[h].argsort(descending=True).tolist()
                sizes = torch.tensor([len(units[u]) for u in order]).cumsum(0)
                want = {
                    p
                    for u, total in zip(order, sizes.tolist(), strict=True)
                    if total <= cfg.selection
                    for p in units[u]
                }
                have = layer.working.positions[h]
                assert set(have[have >= 0].tolist()) == want, f"layer {call.layer} head {h}"
                # Exact attention over sinks + selected + window (the new token's row is the last one).
                rows = torch.tensor(sorted(sinks | want | (local - {len(probe.ids)})))
                keys = torch.cat([k[h, rows], layer.k[0, h, -1:]])
                values = torch.cat([v[h, rows], layer.v[0, h, -1:]])
                ref = (q[h] @ keys.T * call.scale).softmax(-1) @ values
                torch.testing.assert_close(got[0, h * group : (h + 1) * group, -1], ref, rtol=1e-4, atol=1e-5)
            checked.append(call.layer)
        return got

    engine.forward([int(out.logits[0, -1].argmax())], cache=cache, attention=compare)
    assert checked == [0, 14, 29]


def test_follow_brings_the_tokens_after_each_selected_unit(engine, probe):
    """With `follow`, a selected unit comes with the units holding the `follow` tokens after each of its
    members (a number copied out of the prompt stays resident while the query barely moves); the budget
    still holds, and the best unit is the one the paper's selection puts first."""
    follow = 3
    runs = {}
    for f in (0, follow):
        r = LouisKV(engine, LouisKVConfig(budget=160, tau=-1.5, follow=f, **SMALL), host_store())
        cache, logits = r.prefill(probe.ids)
        engine.decode(logits, cache, 2, attention=r.attention, stop=set())  # one step: one selection
        assert r.stats.retrievals == engine.spec.num_layers
        assert r.stats.peak_resident_bytes <= r.budget_bytes
        runs[f] = r
    checked = 0
    for plain, layer in zip(runs[0].layers, runs[follow].layers, strict=True):
        pool = layer.pool
        for h in range(layer.heads):
            best = layer.priority[h][0]
            assert best == plain.priority[h][0]
            resident = set(layer.working.positions[h].tolist())
            after = {p + d for p in pool._positions[h][best] for d in range(1, follow + 1)}
            stored = {p for p in after if p in pool._at[h]}  # the rest is in the window or past the prompt
            assert stored <= resident, f"layer {layer.index} head {h}"
            checked += len(stored)
    assert checked > 0
    with pytest.raises(ValueError, match="follow"):
        LouisKVConfig(follow=-1)


def test_long_output_runs_the_chosen_variants_against_the_full_cache(engine, texts):
    """`long_output` measures the default and every step, plus the variants `methods` names; every
    step at a budget that holds the whole cache matches the full cache on all its tokens."""
    cfg = BenchConfig(
        budgets=(1024,),
        long_prompt_tokens=300,
        long_output_tokens=6,
        long_budget=1024,
        methods=("louiskv-periodic-follow-1024",),
    )
    out = long_output(engine, cfg, texts)
    assert set(out) >= {"louiskv", "every_step", "louiskv-periodic-follow-1024"}
    assert out["tokens"] == 6 and out["prompt_tokens"] <= 1024 - 6  # the whole cache fits the budget
    assert out["every_step"]["match_length"] == 6 and out["every_step"]["same_tokens"] == 1.0
    periodic = out["louiskv-periodic-follow-1024"]
    assert periodic["step_retrieval_rate"] == pytest.approx(2 / 5)  # steps 0 and 4 of 5
    assert 0 <= periodic["match_length"] <= 6
