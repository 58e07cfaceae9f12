"""Stage-1 objectives behave as the paper describes."""

import torch
import torch.nn.functional as F

from trainer import losses


def _feats(B=8, Q=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    txt = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    img = F.normalize(torch.randn(B, Q, D, generator=g) * 0.3 + txt[:, None, :], dim=-1)
    return img, txt


def test_itc_prefers_aligned_pairs():
    img, txt = _feats()
    temp = torch.tensor(0.07)
    aligned = losses.itc_loss(*losses.itc_similarities(img, txt, img, txt, temp), 0)
    perm = torch.roll(torch.arange(8), 1)
    shuffled = losses.itc_loss(*losses.itc_similarities(img, txt[perm], img, txt[perm], temp), 0)
    assert aligned < shuffled - 1.0


def test_itc_similarity_is_max_over_queries():
    img, txt = _feats(B=3, Q=5)
    sim_i2t, sim_t2i = losses.itc_similarities(img, txt, img, txt, torch.tensor(1.0))
    assert torch.allclose(sim_i2t[1, 2], (img[1] @ txt[2]).max())
    assert torch.allclose(sim_t2i[2, 1], (img[1] @ txt[2]).max())


def test_identical_captions_are_not_negatives():
    ids = torch.tensor([[1, 7, 8, 2], [1, 7, 8, 2], [1, 9, 2, 0]])
    att = (ids != 0).long()
    same = losses.same_text(ids, att, ids, att)
    assert same.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    img, txt = _feats(B=3)
    sims = losses.itc_similarities(img, txt, img, txt, torch.tensor(0.07))
    # making the duplicate column arbitrarily attractive does not change the masked loss
    a = losses.itc_loss(sims[0], sims[1], 0, same)
    boosted = [s.clone() for s in sims]
    boosted[0][0, 1] += 50
    boosted[1][0, 1] += 50
    assert torch.allclose(a, losses.itc_loss(boosted[0], boosted[1], 0, same))


def test_hard_negatives_never_pick_the_positive_or_a_duplicate():
    B = 16
    img, txt = _feats(B=B)
    ids = torch.randint(6, 20, (B, 5))
    ids[3] = ids[4]  # a duplicate caption
    att = torch.ones_like(ids)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        neg_t, neg_i = losses.sample_hard_negatives(img, txt, torch.tensor(0.07), ids, att, g, 0, B)
        assert (neg_t != torch.arange(B)).all() and (neg_i != torch.arange(B)).all()
        assert neg_t[3] != 4 and neg_t[4] != 3 and neg_i[3] != 4 and neg_i[4] != 3


def test_hard_negatives_prefer_similar_texts():
    B = 8
    img, txt = _feats(B=B)
    txt = txt.clone()
    txt[1] = txt[0]  # text 1 looks exactly like image 0's caption: the hardest negative for image 0
    ids = torch.arange(B)[:, None] + 6
    att = torch.ones_like(ids)
    picks = [losses.sample_hard_negatives(img, txt, torch.tensor(0.02), ids, att,
                                          torch.Generator().manual_seed(s), 0, B)[0][0].item() for s in range(30)]
    assert picks.count(1) > 20


def test_hard_negatives_are_the_same_for_each_rank_slice():
    B = 8
    img, txt = _feats(B=B)
    ids = torch.arange(B)[:, None] + 6
    att = torch.ones_like(ids)
    full = losses.sample_hard_negatives(img, txt, torch.tensor(0.07), ids, att, torch.Generator().manual_seed(3), 0, B)
    half = losses.sample_hard_negatives(img, txt, torch.tensor(0.07), ids, att, torch.Generator().manual_seed(3), 4, 4)
    assert torch.equal(full[0][4:], half[0]) and torch.equal(full[1][4:], half[1])


def test_itg_mask_is_causal_for_text_and_hides_text_from_queries():
    att = torch.tensor([[1, 1, 1, 0]])
    m = losses.itg_mask(2, att)[0]
    assert m[:2, :2].all() and not m[:2, 2:].any()  # queries never see text
    assert m[2:, :2].all()  # text sees every query
    assert m[3, 2] and m[3, 3] and not m[3, 4] and not m[2, 3]  # causal
    assert not m[4, 5]  # padding is never attended
    u = losses.unimodal_mask(2, att)[0]
    assert not u[:2, 2:].any() and not u[2:, :2].any()


def test_prefix_split_moves_words_between_encoder_and_decoder():
    ids = torch.tensor([[10, 11, 12, 2, 0]])  # three words, </s>, pad
    att = (ids != 0).long()
    enc, _, labels = losses.prefix_split(ids, att, torch.tensor([0]), 2, 0)
    assert enc.tolist() == [[2]] and labels.tolist() == [[10, 11, 12, 2]]
    enc, _, labels = losses.prefix_split(ids, att, torch.tensor([3]), 2, 0)  # odd: split after 1 word
    assert enc.tolist() == [[10, 2]] and labels.tolist() == [[11, 12, 2]]
