"""Loss terms against values computed by hand on a fixed batch."""

import math
from types import SimpleNamespace

import torch

from services.train.losses import LossWeights, distillation_loss


def _by_hand(student_logits, teacher_logits, labels, s_states, t_states, pairs, temperature):
    tokens = [(b, s) for b in range(labels.shape[0]) for s in range(labels.shape[1])]
    ce = kl = 0.0
    for b, s in tokens:
        z_s, z_t = student_logits[b, s].tolist(), teacher_logits[b, s].tolist()
        log_norm = math.log(sum(math.exp(v) for v in z_s))
        ce += log_norm - z_s[labels[b, s]]
        p_s = [math.exp(v / temperature) for v in z_s]
        p_t = [math.exp(v / temperature) for v in z_t]
        p_s = [v / sum(p_s) for v in p_s]
        p_t = [v / sum(p_t) for v in p_t]
        kl += sum(t * (math.log(t) - math.log(q)) for t, q in zip(p_t, p_s))
    cos_terms = []
    for si, ti in pairs:
        total = 0.0
        for b, s in tokens:
            u, v = s_states[si][b, s].tolist(), t_states[ti][b, s].tolist()
            dot = sum(a * c for a, c in zip(u, v))
            total += 1 - dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(c * c for c in v)))
        cos_terms.append(total / len(tokens))
    return ce / len(tokens), kl / len(tokens) * temperature**2, sum(cos_terms) / len(cos_terms)


def test_terms_and_total_match_hand_computation():
    torch.manual_seed(0)
    batch, seq, vocab, hidden = 2, 3, 7, 5
    student_logits, teacher_logits = torch.randn(batch, seq, vocab), torch.randn(batch, seq, vocab)
    labels = torch.randint(0, vocab, (batch, seq))
    s_states = [torch.randn(batch, seq, hidden) for _ in range(3)]
    t_states = [torch.randn(batch, seq, hidden) for _ in range(5)]
    pairs = ((0, 0), (1, 2), (2, 4))
    weights = LossWeights(ce=1.0, kl=0.5, cos=2.0, temperature=2.0)
    total, terms = distillation_loss(SimpleNamespace(logits=student_logits, hidden_states=s_states),
                                     SimpleNamespace(logits=teacher_logits, hidden_states=t_states),
                                     labels, torch.ones(batch, seq), pairs, weights)
    ce, kl, cos = _by_hand(student_logits, teacher_logits, labels, s_states, t_states, pairs, 2.0)
    assert math.isclose(terms["ce"], ce, rel_tol=1e-5)
    assert math.isclose(terms["kl"], kl, rel_tol=1e-5)
    assert math.isclose(terms["cos"], cos, rel_tol=1e-5)
    assert math.isclose(float(total), ce + 0.5 * kl + 2.0 * cos, rel_tol=1e-5)


def test_masked_tokens_do_not_count_and_zero_weights_switch_terms_off():
    torch.manual_seed(1)
    logits, labels = torch.randn(1, 4, 6), torch.randint(0, 6, (1, 4))
    out = SimpleNamespace(logits=logits, hidden_states=[torch.randn(1, 4, 3)])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    garbage = logits.clone()
    garbage[0, 2:] = 1e4
    _, terms = distillation_loss(out, out, labels, mask, ((0, 0),), LossWeights(kl=0, cos=0))
    _, garbage_terms = distillation_loss(SimpleNamespace(logits=garbage, hidden_states=out.hidden_states), out,
                                         labels, mask, ((0, 0),), LossWeights(kl=0, cos=0))
    assert set(terms) == {"ce"}
    assert math.isclose(terms["ce"], garbage_terms["ce"], rel_tol=1e-6)


def test_relative_mse_term_matches_hand_computation():
    torch.manual_seed(2)
    s_states = [torch.randn(1, 2, 3) for _ in range(2)]
    t_states = [torch.randn(1, 2, 3) for _ in range(3)]
    logits = torch.randn(1, 2, 5)
    _, terms = distillation_loss(SimpleNamespace(logits=logits, hidden_states=s_states),
                                 SimpleNamespace(logits=logits, hidden_states=t_states), torch.zeros(1, 2).long(),
                                 torch.ones(1, 2), ((0, 0), (1, 2)), LossWeights(ce=0, kl=0, cos=0, mse=1))
    expected = 0.0
    for si, ti in ((0, 0), (1, 2)):
        per_token = [sum((a - b) ** 2 for a, b in zip(s_states[si][0, k].tolist(), t_states[ti][0, k].tolist()))
                     / sum(b * b for b in t_states[ti][0, k].tolist()) for k in range(2)]
        expected += sum(per_token) / 2
    assert set(terms) == {"mse"} and math.isclose(terms["mse"], expected / 2, rel_tol=1e-5)
