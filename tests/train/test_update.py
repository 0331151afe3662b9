"""RLTrainer.make_batch / update on hand-built trajectories, against independent implementations:
the AEPO entropy-aware advantage (z over the batch or per micro-batch), per-turn
EPO history, hard tree attribution, and the entropy of clipped tokens."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_qwen3

from aepo.algos import EntropyHistory
from aepo.config import load_config
from aepo.data.datasets import TaskRow
from aepo.train.batch import collate, response_turn_ids
from aepo.train.rl import RLTrainer, step_seed, tree_links
from aepo.types import SegmentRecord, Trajectory

torch.set_num_threads(1)
# capture_grads wraps optimizer.step after the LR scheduler was built; torch warns about that
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")

VOCAB = 40
ALPHA = 0.5


def tiny_model(seed=0, vocab=VOCAB):
    return tiny_qwen3(vocab, seed=seed, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                      initializer_range=0.2).eval()  # entropies spread out


def trainer_for(model, tmp_path, **over):
    ov = ["algo=grpo", "trainer.ppo_mini_batch_size=4", "trainer.ppo_micro_batch_size=4",
          "trainer.grad_clip=1e9", "trainer.total_steps=10"] + [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(None, ov)
    tasks = [TaskRow("t", "q?", ["a"], "demo")]
    return RLTrainer(cfg, model, SimpleNamespace(pad_token_id=0), tasks, lambda calls: [], tmp_path)


def ref_forward(model, traj):
    """log pi and entropy of each response token, from one unpadded full forward of the row."""
    ids = torch.tensor([list(traj.prompt_ids) + list(traj.response_ids)])
    lp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    p, r = len(traj.prompt_ids), len(traj.response_ids)
    rows = lp[p - 1 : p - 1 + r]
    logp = rows.gather(-1, ids[0, p:].unsqueeze(-1)).squeeze(-1)
    ent = -(rows.exp() * rows).sum(-1)
    return logp, ent


def make_trajs(model, rewards, seed=0, old_shift=None):
    """One group of rows with a tool result in the middle; the sampler's entropies are junk
    (unrelated to the model), its log-probs are the model's (so r = 1) plus `old_shift`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, rew in enumerate(rewards):
        n1, n_tool, n2 = 3 + i % 2, 2, 3
        resp = torch.randint(2, VOCAB, (n1 + n_tool + n2,), generator=g).tolist()
        t = Trajectory("p", i, [5, 6, 7], resp, [1] * n1 + [0] * n_tool + [1] * n2,
                       [0.0] * len(resp), (torch.rand(len(resp), generator=g) * 3).tolist(),
                       segments=[SegmentRecord("model", 0, n1), SegmentRecord("tool", n1, n1 + n_tool),
                                 SegmentRecord("model", n1 + n_tool, len(resp))])
        t.reward = rew
        with torch.no_grad():
            lp, _ = ref_forward(model, t)
        shift = torch.zeros(len(resp)) if old_shift is None else old_shift(i, len(resp))
        t.logprobs = [float(x) if m else 0.0 for x, m in zip(lp + shift, t.response_mask)]
        out.append(t)
    return out


def grpo_rows(rewards):
    r = torch.tensor(rewards, dtype=torch.float64)
    return ((r - r.mean()) / (r.std() + 1e-6)).tolist()


def capture_grads(trainer):
    """Record the gradient the optimizer steps with (grad_clip is huge, so it is the raw one)."""
    grads = []
    orig = trainer.optimizer.step

    def step(*a, **k):
        grads.append([p.grad.detach().clone() for p in trainer.model.parameters()])
        return orig(*a, **k)

    trainer.optimizer.step = step
    return grads


def ref_grads(model, trajs, micro_rows, entropy_source, alpha=ALPHA, eps=0.2):
    """Independent AEPO-advantage PPO gradient: z-score per micro-batch over its valid tokens of
    `entropy_source(row, model_entropy)`, token-mean over the whole mini-batch."""
    model.zero_grad()
    adv_rows = grpo_rows([t.reward for t in trajs])
    n_tokens = sum(sum(t.response_mask) for t in trajs)
    total = 0.0
    for rows in micro_rows:
        parts = []
        for i in rows:
            logp, ent = ref_forward(model, trajs[i])
            m = torch.tensor(trajs[i].response_mask, dtype=torch.bool)
            h = entropy_source(i, ent.detach())
            parts.append((i, logp[m], torch.as_tensor(h, dtype=torch.float32)[m]))
        h_all = torch.cat([h for _, _, h in parts]).double()
        mean, std = h_all.mean(), h_all.std()
        loss = 0.0
        for i, lp, h in parts:
            adv = adv_rows[i] * (1 + alpha * (h.double() - mean) / std)
            old = torch.tensor([x for x, mk in zip(trajs[i].logprobs, trajs[i].response_mask) if mk])
            r = torch.exp(lp.double() - old.double())
            loss = loss + torch.maximum(-adv * r, -adv * r.clamp(1 - eps, 1 + eps)).sum()
        (loss / n_tokens).backward()
        total += float(loss.detach()) / n_tokens
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad()
    return grads, total


def assert_grads_close(a, b, atol=1e-6, rtol=1e-4):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y.to(x.dtype), atol=atol, rtol=rtol)


def grads_differ(a, b):
    return any(not torch.allclose(x, y.to(x.dtype), atol=1e-6, rtol=1e-3) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- AEPO advantage


def test_aepo_batch_carries_the_group_part_only_with_micro_scope(tmp_path):
    model = tiny_model()
    trajs = make_trajs(model, [1.0, 0.0, 0.5, 0.0])
    tr = trainer_for(model, tmp_path, **{"actor.adv_estimator": "aepo", "actor.adv_entropy_scope": "micro"})
    batch = tr.make_batch(trajs)
    rows = torch.tensor(grpo_rows([t.reward for t in trajs]), dtype=torch.float32)
    torch.testing.assert_close(batch.advantages, rows[:, None] * batch.loss_mask)


def test_aepo_batch_scope_shapes_the_batch_advantage_by_hand(tmp_path):
    """actor.adv_entropy_scope=batch (default): A_i (1 + alpha_H z(H_t)), z over every valid
    token of the batch, H from the policy before the update (one unpadded forward per row)."""
    model = tiny_model()
    trajs = make_trajs(model, [1.0, 0.0, 0.5, 0.0])
    tr = trainer_for(model, tmp_path, **{"actor.adv_estimator": "aepo", "actor.entropy_adv_alpha": ALPHA,
                                         "trainer.ppo_micro_batch_size": 1})
    assert tr.cfg.actor.adv_entropy_scope == "batch"
    batch = tr.make_batch(trajs)
    with torch.no_grad():
        ents = [ref_forward(model, t)[1][torch.tensor(t.response_mask, dtype=torch.bool)] for t in trajs]
    h_all = torch.cat(ents).double()
    rows = grpo_rows([t.reward for t in trajs])
    for i, e in enumerate(ents):
        want = rows[i] * (1 + ALPHA * (e.double() - h_all.mean()) / h_all.std())
        got = batch.advantages[i][batch.loss_mask[i].bool()]
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_aepo_advantage_uses_the_training_forward_entropy(tmp_path):
    model = tiny_model()
    trajs = make_trajs(model, [1.0, 0.0, 0.5, 0.0])
    with torch.no_grad():
        ents = [ref_forward(model, t)[1][torch.tensor(t.response_mask, dtype=torch.bool)] for t in trajs]
    h_all = torch.cat(ents).double()
    rows = grpo_rows([t.reward for t in trajs])
    shaped = torch.cat([rows[i] * (1 + ALPHA * (e.double() - h_all.mean()) / h_all.std())
                        for i, e in enumerate(ents)])
    model_h = ref_grads(model, trajs, [range(4)], lambda i, h: h)
    sampler_h = ref_grads(model, trajs, [range(4)], lambda i, h: trajs[i].entropies)
    assert grads_differ(model_h[0], sampler_h[0])  # the test can tell the two apart

    tr = trainer_for(model, tmp_path, **{"actor.adv_estimator": "aepo", "actor.entropy_adv_alpha": ALPHA})
    grads = capture_grads(tr)
    out = tr.update(tr.make_batch(trajs), 0)
    assert len(grads) == 1
    assert_grads_close(grads[0], model_h[0])
    assert grads_differ(grads[0], sampler_h[0])
    assert out["actor/pg_loss"] == pytest.approx(model_h[1], abs=1e-6)
    # the logged advantages are the ones the loss used (the shaped ones), token-weighted
    assert out["actor/adv_mean"] == pytest.approx(float(shaped.mean()), abs=1e-6)
    assert out["actor/adv_abs_mean"] == pytest.approx(float(shaped.abs().mean()), abs=1e-6)


@pytest.mark.parametrize("scope", ["micro", "batch"])
def test_aepo_entropy_zscore_scope(tmp_path, scope):
    """scope micro: z per micro-batch (the released actor), so the micro-batch size changes the
    gradient; scope batch: z over the whole batch, the same gradient at any micro-batch size."""
    model = tiny_model(seed=3)
    trajs = make_trajs(model, [1.0, 0.0, 0.0, 1.0, 0.5, 0.0], seed=1)
    tr = trainer_for(model, tmp_path, **{"actor.adv_estimator": "aepo", "actor.entropy_adv_alpha": ALPHA,
                                         "trainer.ppo_mini_batch_size": 6, "trainer.ppo_micro_batch_size": 2,
                                         "actor.adv_entropy_scope": scope})
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(step_seed(tr.cfg.trainer.seed, 0, 3)))
    micro = [perm[s : s + 2].tolist() for s in range(0, 6, 2)]
    per_micro = ref_grads(model, trajs, micro, lambda i, h: h)
    whole = ref_grads(model, trajs, [range(6)], lambda i, h: h)
    assert grads_differ(per_micro[0], whole[0])
    grads = capture_grads(tr)
    tr.update(tr.make_batch(trajs), 0)
    want, other = (per_micro, whole) if scope == "micro" else (whole, per_micro)
    assert_grads_close(grads[0], want[0])
    assert grads_differ(grads[0], other[0])


def test_grpo_update_is_unchanged_by_entropies(tmp_path):
    """For other estimators the micro-batch advantages are the batch's, whatever the entropies."""
    model = tiny_model()
    trajs = make_trajs(model, [1.0, 0.0, 0.5, 0.0])
    expect = ref_grads(model, trajs, [range(4)], lambda i, h: h, alpha=0.0)
    tr = trainer_for(model, tmp_path)
    grads = capture_grads(tr)
    tr.update(tr.make_batch(trajs), 0)
    assert_grads_close(grads[0], expect[0])


# ----------------------------------------------------------------------------- EPO per turn


def traj_with_turns(pattern, prompt=(5, 6)):
    """pattern: 'm' model token, 't' tool token; a segment per run of equal letters."""
    n = len(pattern)
    segs, start = [], 0
    for j in range(1, n + 1):
        if j == n or pattern[j] != pattern[start]:
            segs.append(SegmentRecord("model" if pattern[start] == "m" else "tool", start, j))
            start = j
    return Trajectory("p", 0, list(prompt), [3] * n, [int(c == "m") for c in pattern], [0.0] * n, [0.0] * n,
                      segments=segs)


def test_turn_ids_from_segments_and_collate():
    a = traj_with_turns("mmttmmmtm")
    b = traj_with_turns("mm", prompt=(5, 6, 7, 8))
    c = Trajectory("q", 1, [5], [3, 3], [1, 1], [0.0, 0.0], [0.0, 0.0])  # no segments: turn 0
    assert response_turn_ids(a) == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert response_turn_ids(b) == [0, 0] and response_turn_ids(c) == [0, 0]
    batch = collate([a, b, c], pad_id=0)
    # column j scores token j + 1: the response starts at column len(prompt) - 1
    assert batch.turn_ids.tolist() == [
        [-1, 0, 0, 0, 0, 1, 1, 1, 1, 2],
        [-1, -1, -1, 0, 0, -1, -1, -1, -1, -1],
        [0, 0, -1, -1, -1, -1, -1, -1, -1, -1],
    ]
    sub = batch.select([2, 1])  # trimmed to the longest selected row (6 tokens, 5 columns)
    assert sub.turn_ids.tolist() == [[0, 0, -1, -1, -1], [-1, -1, -1, 0, 0]]
    assert sub.to("cpu").turn_ids.dtype == torch.long
    # a branch row copied its parent's segments up to the fork: the same turn numbering
    child = traj_with_turns("mmttmm")
    child.parent_row_id, child.branch_position = 0, 4
    assert response_turn_ids(child) == [0, 0, 0, 0, 1, 1]


def test_epo_band_uses_each_turns_own_history(tmp_path):
    model = tiny_model(seed=5)
    trajs = make_trajs(model, [1.0, 0.0, 0.5, 0.0], seed=2)
    tr = trainer_for(model, tmp_path, **{"actor.epo": True, "actor.epo_entropy_coef": 0.0})
    # entropies of the current model per turn (turn 0 before the tool result, turn 1 after)
    h = {0: [], 1: []}
    with torch.no_grad():
        for t in trajs:
            _, ent = ref_forward(model, t)
            for e, m, k in zip(ent.tolist(), t.response_mask, response_turn_ids(t)):
                if m:
                    h[k].append(e)
    h0, h1 = (sum(v) / len(v) for v in (h[0], h[1]))
    hist = EntropyHistory()
    hist.update((h0 + h1) / 2)  # a global history: with turn ids it plays no part
    hist.update(2.4 * h0, turn=0)  # turn 0: band from 1.2 h0, H = h0 below it by 0.2 h0
    hist.update(h1 / 3, turn=1)  # turn 1: band up to 1.5 h1 / 3 = h1 / 2, H = h1 above by h1 / 2
    hist.update(h1 / 3, turn=1)
    tr.entropy_history = hist
    out = tr.update(tr.make_batch(trajs), 3)
    expected = ((0.2 * h0) ** 2 + (h1 / 2) ** 2) / 2
    assert out["actor/epo_band_turns"] == 2.0
    assert out["actor/epo_band_penalty"] == pytest.approx(expected, rel=1e-4)
    # history: one more value per turn (this step's mean entropy of that turn)
    assert hist.value(0) == pytest.approx((2.4 * h0 + h0) / 2, rel=1e-4)
    assert hist.value(1) == pytest.approx((2 * h1 / 3 + h1) / 3, rel=1e-4)
    assert hist.turns() == [0, 1]


def test_entropy_history_per_turn_survives_checkpoint_and_resume(tmp_path):
    from aepo.train.checkpoint import save_checkpoint

    model = tiny_model(seed=6)
    trajs = make_trajs(model, [1.0, 0.0, 0.5, 0.0], seed=4)
    tr = trainer_for(model, tmp_path, **{"actor.epo": True})
    tr.update(tr.make_batch(trajs), 0)
    tr.update(tr.make_batch(trajs), 1)
    assert tr.entropy_history.turns() == [0, 1]
    # what fit() saves at a checkpoint step
    save_checkpoint(tmp_path / "checkpoints", 2, tr.model, SimpleNamespace(save_pretrained=lambda d: None),
                    tr.optimizer, tr.scheduler, {"entropy_history": tr.entropy_history.state_dict()}, 2)
    fresh = trainer_for(tiny_model(seed=6), tmp_path, **{"actor.epo": True})
    assert fresh.resume() == 2
    for turn in (None, 0, 1):
        assert fresh.entropy_history.value(turn) == tr.entropy_history.value(turn)
    assert fresh.entropy_history.state_dict() == tr.entropy_history.state_dict()


# ----------------------------------------------------------------------------- hard attribution


def tree_trajs():
    """Row 0 (root), row 1 forked from row 0 at response offset 3, row 2 forked from row 1 at 5,
    row 3 another root; prompts of 2 tokens, so response offset o is column 1 + o."""
    mk = lambda rid, resp, par=None, pos=None, rew=0.0: Trajectory(
        "p", rid, [5, 6], resp, [1] * len(resp), [-1.0] * len(resp), [1.0] * len(resp),
        parent_row_id=par, branch_position=pos, reward=rew)
    return [mk(0, [10, 11, 12, 13, 14], rew=1.0),
            mk(1, [10, 11, 12, 20, 21, 22], 0, 3, rew=0.0),
            mk(2, [10, 11, 12, 20, 21, 33], 1, 5, rew=0.5),
            mk(3, [30, 31], rew=0.0)]


def test_tree_links_map_rows_to_batch_columns():
    trajs = tree_trajs()
    order = [trajs[2], trajs[0], trajs[3], trajs[1]]  # batch order is not row order
    assert tree_links(order) == ([3, -1, -1, 1], [1 + 5, 0, 0, 1 + 3])
    orphan = Trajectory("p", 7, [5, 6], [10], [1], [0.0], [0.0], parent_row_id=99, branch_position=1)
    assert tree_links([orphan]) == ([-1], [0])  # parent not in the batch: a root
    bad = tree_trajs()
    bad[1].response_ids[0] = 33
    with pytest.raises(ValueError, match="not those of its parent"):
        tree_links(bad)


def test_hard_attribution_in_make_batch(tmp_path):
    trajs = tree_trajs()
    model = tiny_model()
    soft = trainer_for(model, tmp_path).make_batch(trajs)
    hard = trainer_for(model, tmp_path, **{"actor.tree_attribution": "hard"}).make_batch(trajs)
    a = grpo_rows([1.0, 0.0, 0.5, 0.0])
    col = lambda o: 1 + o
    # soft: every row trains all its tokens with its own advantage
    assert soft.loss_mask.sum() == 5 + 6 + 6 + 2
    # hard: offsets 0-2 are shared by rows 0, 1, 2 (owner row 0); offsets 3-4 by rows 1, 2 (owner 1)
    expect_adv = torch.zeros_like(hard.advantages)
    expect_mask = torch.zeros_like(hard.loss_mask)
    for o in range(3):
        expect_adv[0, col(o)] = (a[0] + a[1] + a[2]) / 3
    for o in (3, 4):
        expect_adv[0, col(o)] = a[0]
        expect_adv[1, col(o)] = (a[1] + a[2]) / 2
    expect_adv[1, col(5)] = a[1]
    expect_adv[2, col(5)] = a[2]
    expect_adv[3, col(0)] = expect_adv[3, col(1)] = a[3]
    expect_mask[0, col(0) : col(5)] = 1.0  # row 0 owns all 5 of its tokens
    expect_mask[1, col(3) : col(6)] = 1.0  # row 1 owns offsets 3-5
    expect_mask[2, col(5)] = 1.0  # row 2 owns offset 5 only
    expect_mask[3, col(0) : col(2)] = 1.0
    torch.testing.assert_close(hard.advantages, expect_adv)
    torch.testing.assert_close(hard.loss_mask, expect_mask)
    assert hard.loss_mask.sum() == 5 + 3 + 1 + 2  # each physical token once
    # the update trains on the hard batch without error, and only on owned tokens
    tr = trainer_for(model, tmp_path, **{"actor.tree_attribution": "hard"})
    out = tr.update(tr.make_batch(trajs), 0)
    assert math.isfinite(out["actor/pg_loss"])


def test_hard_attribution_on_arpo_tree_rollouts(tmp_path):
    """Real ARPO tree rollouts (scripted policy, every tool step branches): with hard attribution
    each physical token is trained once, by the row that generated it, with the mean advantage
    of the rows holding it; computed here by walking the parent links in plain python."""
    import random

    from scripted_sampler import CharTokenizer, FakeTools, Reply, ScriptedSampler, nats

    from aepo.config import RolloutConfig
    from aepo.rollout.strategies import rollout

    chars = CharTokenizer()

    def script(ctx, draw):
        k = ctx.count("<result>")
        if k < 2:
            return Reply(f"<search>q{k}.{draw}</search>", nats(0.3, chars))
        return Reply(f"<answer>a{draw}</answer>", nats(0.3, chars))

    prompts = [("A", chars.encode("A?")), ("B", chars.encode("Bb?"))]
    cfg = RolloutConfig(n=4, initial_rollouts=1, branch_alpha=1.0, branch_beta=0.0, branch_children=1,
                        max_response_tokens=60)
    trajs, stats = rollout("arpo", prompts, ScriptedSampler(chars, script), chars, FakeTools(), cfg,
                           random.Random(0))
    assert stats["branches"] > 0 and sum(t.parent_row_id is not None for t in trajs) >= 4
    for t in trajs:
        t.reward = float((t.row_id * 7 + len(t.prompt_ids)) % 3) / 2
    model = tiny_model(vocab=len(chars))
    hard = trainer_for(model, tmp_path, **{"actor.tree_attribution": "hard"}).make_batch(trajs)
    soft = trainer_for(model, tmp_path).make_batch(trajs)

    by_id = {(t.prompt_id, t.row_id): i for i, t in enumerate(trajs)}

    def owner(i, o):  # the row that generated token o of row i
        t = trajs[i]
        while t.parent_row_id is not None and o < t.branch_position:
            i = by_id[(t.prompt_id, t.parent_row_id)]
            t = trajs[i]
        return i

    holders: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(trajs):
        for o, m in enumerate(t.response_mask):
            if m:
                holders.setdefault((owner(i, o), o), []).append(i)
    expect_adv = torch.zeros_like(hard.advantages)
    expect_mask = torch.zeros_like(hard.loss_mask)
    for (i, o), rows in holders.items():
        c = len(trajs[i].prompt_ids) - 1 + o
        expect_adv[i, c] = sum(float(soft.advantages[j, len(trajs[j].prompt_ids) - 1 + o]) for j in rows) / len(rows)
        expect_mask[i, c] = 1.0
    torch.testing.assert_close(hard.advantages, expect_adv)
    torch.testing.assert_close(hard.loss_mask, expect_mask)
    assert hard.loss_mask.sum() < soft.loss_mask.sum()
    assert any(len(rows) > 1 for rows in holders.values())
    tr = trainer_for(model, tmp_path, **{"actor.tree_attribution": "hard", "actor.recompute_old_log_prob": True})
    out = tr.update(tr.make_batch(trajs), 0)
    assert math.isfinite(out["actor/pg_loss"]) and out["actor/grad_norm"] > 0


# ----------------------------------------------------------------------------- clipped-token entropy


def test_entropy_of_clipped_and_all_tokens(tmp_path):
    model = tiny_model(seed=7)
    rewards = [1.0, 0.0, 1.0, 0.0]  # A > 0 on rows 0, 2; A < 0 on rows 1, 3

    # r = pi / pi_old: old = logp - 0.5 gives r = 1.65 (> 1.2), old = logp + 0.5 gives r = 0.61 (< 0.8)
    def shift(i, n):
        s = torch.zeros(n)
        if i == 0:
            s[0], s[1] = -0.5, 0.5  # A > 0: token 0 clipped (upper); token 1 r < 0.8 is not clipped
        if i == 1:
            s[0], s[1] = 0.5, -0.5  # A < 0: token 0 clipped (lower); token 1 r > 1.2 is not clipped
        if i == 3:
            s[-1] = 0.5  # A < 0, last token clipped (lower)
        return s

    trajs = make_trajs(model, rewards, seed=3, old_shift=shift)
    ents = []
    with torch.no_grad():
        for t in trajs:
            ents.append(ref_forward(model, t)[1])
    clipped = [ents[0][0], ents[1][0], ents[3][-1]]
    valid = torch.cat([e[torch.tensor(t.response_mask, dtype=torch.bool)] for e, t in zip(ents, trajs)])
    tr = trainer_for(model, tmp_path)
    out = tr.update(tr.make_batch(trajs), 0)
    assert out["actor/entropy_clipped"] == pytest.approx(float(sum(clipped) / 3), rel=1e-5)
    assert out["actor/entropy_all"] == pytest.approx(float(valid.mean()), rel=1e-5)
    n_valid = valid.numel()
    assert out["actor/clipfrac_upper"] + out["actor/clipfrac_lower"] == pytest.approx(3 / n_valid)
    # on-policy batch (r = 1): nothing clipped, so no entropy_clipped value (not a misleading 0)
    tr2 = trainer_for(tiny_model(seed=7), tmp_path)
    out2 = tr2.update(tr2.make_batch(make_trajs(tr2.model, rewards, seed=3)), 0)
    assert "actor/entropy_clipped" not in out2 and out2["actor/entropy_all"] == pytest.approx(out["actor/entropy_all"], rel=1e-5)


def _epo_trainer(model, tmp_path, micro, **over):
    return trainer_for(model, tmp_path, **{"actor.epo": True, "actor.epo_entropy_coef": 0.01,
                                           "trainer.ppo_mini_batch_size": 6, "trainer.ppo_micro_batch_size": micro,
                                           **over})


def _banded_history(model, trajs):
    """A history that puts turn 0 below its band and turn 1 above it (by a margin)."""
    h = {0: [], 1: []}
    with torch.no_grad():
        for t in trajs:
            _, ent = ref_forward(model, t)
            for e, m, k in zip(ent.tolist(), t.response_mask, response_turn_ids(t)):
                if m:
                    h[k].append(e)
    h0, h1 = (sum(v) / len(v) for v in (h[0], h[1]))
    hist = EntropyHistory()
    hist.update(2.4 * h0, turn=0)
    hist.update(h1 / 3, turn=1)
    return hist, h0, h1


def test_epo_band_is_the_mini_batchs_whatever_the_micro_batch(tmp_path):
    """The band of the mini-batch's turn means (the paper's 'batch entropy'): the same gradient
    and penalty with 3 micro-batches of 2 rows as with one of 6; the squared hinge of each
    micro-batch's means (the former per-micro-batch band) gives another gradient."""
    model = tiny_model(seed=7)
    trajs = make_trajs(model, [1.0, 0.0, 0.5, 0.0, 1.0, 0.0], seed=5)
    hist, h0, h1 = _banded_history(model, trajs)
    results = {}
    for micro in (6, 2):
        tr = _epo_trainer(model, tmp_path, micro)
        tr.entropy_history = EntropyHistory()
        tr.entropy_history.load_state_dict(hist.state_dict())
        grads = capture_grads(tr)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        out = tr.update(tr.make_batch(trajs), 3)
        model.load_state_dict(sd)  # undo the step: both runs start from the same parameters
        results[micro] = (grads[0], out)
    assert_grads_close(results[2][0], results[6][0], atol=1e-6, rtol=1e-4)
    expected = ((2.4 * 0.5 * h0 - h0) ** 2 + (h1 - 1.5 * h1 / 3) ** 2) / 2  # by hand
    for micro in (6, 2):
        assert results[micro][1]["actor/epo_band_penalty"] == pytest.approx(expected, rel=1e-4)
    # the former per-micro-batch band: each micro-batch's own means, weighted by row share
    from aepo.algos import epo_regularizer
    tr = _epo_trainer(model, tmp_path, 2)
    batch = tr.make_batch(trajs)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(step_seed(tr.cfg.trainer.seed, 3, 3)))
    model.zero_grad()
    for s in range(0, 6, 2):
        mu = batch.select(perm[s : s + 2])
        from aepo.train.batch import token_logprobs_and_entropy
        _, ent = token_logprobs_and_entropy(model, mu.input_ids, None, 1.0, mask=mu.loss_mask)
        reg, _ = epo_regularizer(ent, mu.loss_mask, hist, 3, 10, entropy_coef=0.01, turn_ids=mu.turn_ids)
        (reg / 3).backward()
    band_only_old = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad()
    pg = ref_grads(model, trajs, [range(6)], lambda i, h: h, alpha=0.0)[0]
    old_total = [a + b for a, b in zip(pg, band_only_old)]
    assert grads_differ(results[2][0], old_total)


def test_epo_start_step_gates_the_regulariser(tmp_path):
    model = tiny_model(seed=7)
    trajs = make_trajs(model, [1.0, 0.0, 0.5, 0.0, 1.0, 0.0], seed=5)
    hist, _, _ = _banded_history(model, trajs)
    grads = {}
    for name, over in (("gated", {"actor.epo_start_step": 25}), ("on", {}), ("off", {"actor.epo": False})):
        tr = _epo_trainer(model, tmp_path, 6, **over)
        tr.entropy_history = EntropyHistory()
        tr.entropy_history.load_state_dict(hist.state_dict())
        g = capture_grads(tr)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        out = tr.update(tr.make_batch(trajs), 3)
        model.load_state_dict(sd)
        grads[name] = g[0]
        if name == "gated":
            assert "actor/epo_band_penalty" not in out
            assert tr.entropy_history.value(0) != hist.value(0)  # the history is kept before the gate
    assert_grads_close(grads["gated"], grads["off"])
    assert grads_differ(grads["gated"], grads["on"])
