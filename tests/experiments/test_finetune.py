import pytest
import torch
from analytic import BinaryAffine

from pyboundary.experiments.finetune import directional_margins, finetune_experiment
from pyboundary.zoo import build, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("method", ["deepfool", "line"])
def test_directional_margins_on_affine_model(method):
    model = BinaryAffine(torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 0.3)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 4, 4, generator=g, dtype=torch.float64)
    d = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    w = model.w.detach()
    s = x.flatten(1) @ w + 0.3
    unit = d.flatten(1) / d.flatten(1).norm(dim=1, keepdim=True)
    expected = s.abs() / (unit @ w).abs()
    got = directional_margins(model, x, 3.0 * d, method=method, max_radius=1e4)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-9)
    with pytest.raises(ValueError, match="method"):
        directional_margins(model, x, d, method="grid")
    with pytest.raises(ValueError, match="non-zero"):
        directional_margins(model, x, torch.zeros_like(d))


def test_finetune_experiment_moves_the_boundary_along_the_replaced_directions():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(160, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].mean((1, 2)) > x[:, 0, 3:].mean((1, 2))).long()
    torch.manual_seed(0)
    model = build("mlp", (1, 6, 6), 2, hidden=32)
    train(model, x, y, epochs=20, train_batch_size=32, lr=3e-3, progress=False)
    pred = model(x).argmax(1)
    ok = (pred == y).nonzero().squeeze(1)
    p_idx, u_idx = ok[:20], ok[20:40]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = finetune_experiment(model, x, y, p_idx, u_idx, epochs=10,
                                  train_kwargs={"train_batch_size": 32, "lr": 3e-3, "progress": False})
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, state[k])
    assert res.before_p.shape == (20,) and res.after_u.shape == (20,)
    gain_p = (res.after_p / res.before_p).median()
    gain_u = (res.after_u / res.before_u).median()
    # training on x + delta with the original label pushes the boundary further along delta
    assert float(gain_p) > 1.0 and float(gain_p) > float(gain_u)
    s = res.summary()
    assert set(s) == {"before_p", "after_p", "before_u", "after_u"}
    with pytest.raises(ValueError, match="disjoint"):
        finetune_experiment(model, x, y, p_idx, p_idx)
